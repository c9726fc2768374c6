"""The agent's one error tree. Catch at the depth you care about.

    GpuAgentError
    ├── ConfigError            bad settings; the CLI exits with EXIT_BAD_CONFIG
    ├── ProbeError             a GPU probe cannot be read at all (no driver, NVML gone)
    └── SimError               misuse of the simulated desktop
        └── SimOutOfMemory     an allocation larger than the simulated GPU's free memory
"""

from __future__ import annotations


class GpuAgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(GpuAgentError):
    """The settings are invalid; the message names the field."""


class ProbeError(GpuAgentError):
    """A GPU probe could not be read at all (as opposed to one unsupported field)."""


class SimError(GpuAgentError):
    """The simulated desktop was used in a way it does not support."""


class SimOutOfMemory(SimError):
    """An allocation on the simulated GPU did not fit, as a CUDA allocation would fail."""

    def __init__(self, requested_bytes: int, free_bytes: int) -> None:
        super().__init__(
            f"tried to allocate {requested_bytes} bytes with {free_bytes} bytes free on the GPU"
        )
        self.requested_bytes = requested_bytes
        self.free_bytes = free_bytes
