"""gpu_common: what the GPU agent, the controller and the simulated desktop share.

The wire schema and state names both services speak, one error base with one JSON error shape,
the HTTP middlewares and strict JSON parsing, OpenAPI, the host policy, layered settings, the
reconnect backoff, the one clock seam and small statistics helpers. It imports nothing from
`gpu_agent` or `controller`.
"""
