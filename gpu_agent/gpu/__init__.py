"""GPU probes: one interface, backed by NVML on a real desktop or by the simulated GPU."""
