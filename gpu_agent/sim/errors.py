"""Errors of the simulated desktop, on the shared base in `gpu_common.errors`.

ServiceError (gpu_common.errors)
└── SimError             misuse of the simulated desktop
    └── SimOutOfMemory   an allocation larger than the simulated GPU's free memory
"""

from __future__ import annotations

from gpu_common.errors import ServiceError


class SimError(ServiceError):
    """The simulated desktop was used in a way it does not support."""


class SimOutOfMemory(SimError):
    """An allocation on the simulated GPU did not fit, as a CUDA allocation would fail."""

    def __init__(self, requested_bytes: int, free_bytes: int) -> None:
        super().__init__(
            f"tried to allocate {requested_bytes} bytes with {free_bytes} bytes free on the GPU"
        )
        self.requested_bytes = requested_bytes
        self.free_bytes = free_bytes
