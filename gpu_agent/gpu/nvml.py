"""The NVML GPU probe (adapter layer): real GPU readings through NVIDIA's `nvidia-ml-py` binding.

Failures come in two tiers, as nvitop draws them:

* NVML cannot be used at all (library missing, driver not loaded, no permission, the GPU fell off
  the bus, NVML uninitialised under us): `ProbeError` with a reason a person can act on. After a
  mid-run loss the next `read()` initialises NVML again, so the agent recovers by itself once the
  driver is back.
* One field a card does not support or will not show (`NotSupported`, `NoPermission`, ...): that
  field is `None` and the rest of the reading stands.

The binding module is a constructor argument so tests can hand in a fake module with the same
function names and error classes; production code passes nothing and gets `pynvml`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from gpu_common.errors import ProbeError
from gpu_common.probe import GpuProcessReading, GpuReading

log = logging.getLogger(__name__)

# Errors after which no call on any device can succeed until NVML is initialised again.
_FATAL_ERROR_NAMES = (
    "NVMLError_GpuIsLost",
    "NVMLError_Uninitialized",
    "NVMLError_DriverNotLoaded",
    "NVMLError_LibraryNotFound",
    "NVMLError_LibRmVersionMismatch",
    "NVMLError_ResetRequired",
)

# Errors meaning "this driver or binding has no memory info v2": fall back to v1 for good.
_MEMORY_V1_FALLBACK_NAMES = (
    "NVMLError_FunctionNotFound",
    "NVMLError_NotSupported",
    "NVMLError_ArgumentVersionMismatch",
)

# Human reasons for `nvmlInit` failing, keyed by the binding's error class name.
_INIT_REASONS = {
    "NVMLError_LibraryNotFound": "no NVIDIA driver: libnvidia-ml.so.1 not found",
    "NVMLError_DriverNotLoaded": "NVIDIA driver not loaded (is the nvidia kernel module loaded?)",
    "NVMLError_NoPermission": "no permission to open the NVIDIA device (check /dev/nvidia* access)",
    "NVMLError_LibRmVersionMismatch": (
        "NVML library and NVIDIA kernel driver versions differ (reboot after a driver update)"
    ),
    "NVMLError_GpuIsLost": "the GPU has fallen off the bus",
}

_MW_PER_W = 1000.0


class NvmlProbe:
    """Reads every NVIDIA GPU through NVML. Implements `GpuProbe`; all methods block.

    Construction initialises NVML and raises `ProbeError` when it cannot. Thread-safe: one lock
    serialises NVML use, so `close()` waits for a read in progress.
    """

    def __init__(self, nvml: Any | None = None) -> None:
        if nvml is None:
            try:
                import pynvml
            except ImportError as exc:  # the dependency is declared; this is a broken install
                raise ProbeError("the nvidia-ml-py package is not installed") from exc
            nvml = pynvml
        self._nvml = nvml
        self._lock = threading.Lock()
        self._initialised = False
        self._closed = False
        # None until a device has answered one way or the other; then reused for every read.
        self._memory_v2: bool | None = None
        self._driver_version: str | None = None
        self._error_base: type[BaseException] = getattr(nvml, "NVMLError", Exception)
        self._fatal_errors = _error_classes(nvml, _FATAL_ERROR_NAMES)
        # TypeError/AttributeError: a binding too old to take `version=` or to know v2 at all.
        self._v1_fallback_errors: tuple[type[BaseException], ...] = (
            TypeError,
            AttributeError,
            *_error_classes(nvml, _MEMORY_V1_FALLBACK_NAMES),
        )
        with self._lock:
            self._init_locked()

    @property
    def backend(self) -> str:
        return "nvml"

    def driver_version(self) -> str | None:
        """`nvidia-smi --query-gpu=driver_version`, read when NVML was last initialised."""
        return self._driver_version

    def read(self) -> list[GpuReading]:
        """Read every GPU (`nvidia-smi --query-gpu=...` plus `--query-compute-apps=...`).

        Raises `ProbeError` when NVML is unusable; the next call tries to initialise it again.
        """
        with self._lock:
            if self._closed:
                raise ProbeError("the NVML probe is closed")
            if not self._initialised:
                self._init_locked()
            try:
                return self._read_all_locked()
            except self._error_base as exc:
                # Only errors from the count/handle calls or fatal ones reach here; a card that
                # cannot show its memory raised `ProbeError` and leaves NVML initialised.
                self._drop_locked()
                raise ProbeError(f"NVML stopped answering: {_describe(exc)}") from exc

    def close(self) -> None:
        """Shut NVML down (`nvmlShutdown`) once; later calls do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop_locked()

    # -- lifecycle -------------------------------------------------------------------------

    def _init_locked(self) -> None:
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except self._error_base as exc:
            reason = _INIT_REASONS.get(type(exc).__name__)
            raise ProbeError(reason or f"NVML init failed: {_describe(exc)}") from exc
        self._initialised = True
        self._memory_v2 = None
        try:
            self._driver_version = _text(nvml.nvmlSystemGetDriverVersion())
        except self._error_base as exc:
            log.debug("NVML driver version unavailable: %s", _describe(exc))
            self._driver_version = None
        log.debug("NVML initialised, driver %s", self._driver_version)

    def _drop_locked(self) -> None:
        """Shut NVML down after a fatal error or on close, so the next init starts clean."""
        if not self._initialised:
            return
        self._initialised = False
        try:
            self._nvml.nvmlShutdown()
        except self._error_base as exc:
            # Shutting down a lost GPU can fail too; the library state is reset either way.
            log.debug("nvmlShutdown failed: %s", _describe(exc))

    # -- reading ---------------------------------------------------------------------------

    def _read_all_locked(self) -> list[GpuReading]:
        nvml = self._nvml
        count = int(nvml.nvmlDeviceGetCount())
        handles = [nvml.nvmlDeviceGetHandleByIndex(index) for index in range(count)]
        return [self._read_device(index, handle) for index, handle in enumerate(handles)]

    def _read_device(self, index: int, handle: Any) -> GpuReading:
        nvml = self._nvml
        name = _text(self._required(index, "name", nvml.nvmlDeviceGetName, handle))
        uuid = _text(self._required(index, "UUID", nvml.nvmlDeviceGetUUID, handle))
        total, used, free, reserved = self._memory(index, handle)
        util = self._optional(nvml.nvmlDeviceGetUtilizationRates, handle)
        temperature = self._optional(
            nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
        )
        power_mw = self._optional(nvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = self._optional(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        return GpuReading(
            index=index,
            uuid=uuid,
            name=name,
            memory_total_bytes=total,
            memory_used_bytes=used,
            memory_free_bytes=free,
            memory_reserved_bytes=reserved,
            utilization_gpu_percent=None if util is None else int(util.gpu),
            utilization_memory_percent=None if util is None else int(util.memory),
            temperature_c=None if temperature is None else int(temperature),
            power_w=None if power_mw is None else int(power_mw) / _MW_PER_W,
            power_limit_w=None if limit_mw is None else int(limit_mw) / _MW_PER_W,
            processes=self._processes(handle),
        )

    def _memory(self, index: int, handle: Any) -> tuple[int, int, int, int | None]:
        """`nvidia-smi --query-gpu=memory.total,memory.used,memory.free,memory.reserved`.

        Memory info v2 splits the driver's reserved memory out of `used`; drivers or bindings
        without it give v1, where `used` includes the reserved part and `reserved` is `None`.
        """
        nvml = self._nvml
        if self._memory_v2 is not False:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
            except self._fatal_errors:
                raise
            except self._v1_fallback_errors as exc:
                log.info("NVML memory info v2 unavailable (%s); using v1", _describe(exc))
                self._memory_v2 = False
            except self._error_base as exc:
                raise ProbeError(f"GPU {index}: memory info unreadable: {_describe(exc)}") from exc
            else:
                self._memory_v2 = True
                return int(info.total), int(info.used), int(info.free), int(info.reserved)
        info = self._required(index, "memory info", nvml.nvmlDeviceGetMemoryInfo, handle)
        return int(info.total), int(info.used), int(info.free), None

    def _processes(self, handle: Any) -> tuple[GpuProcessReading, ...]:
        """`nvidia-smi --query-compute-apps=pid,used_memory`, plus graphics clients (Xorg).

        A process that is both compute and graphics ("C+G" in `nvidia-smi`) is listed by both
        calls with the same total, so the lists merge by pid without adding.
        """
        nvml = self._nvml
        merged: dict[int, int | None] = {}
        for call in (
            nvml.nvmlDeviceGetComputeRunningProcesses,
            nvml.nvmlDeviceGetGraphicsRunningProcesses,
        ):
            infos = self._optional(call, handle) or []
            for info in infos:
                pid = int(info.pid)
                used = info.usedGpuMemory
                used_bytes = None if used is None else int(used)
                known = merged.get(pid)
                if pid not in merged or known is None:
                    merged[pid] = used_bytes
                elif used_bytes is not None:
                    merged[pid] = max(known, used_bytes)
        return tuple(GpuProcessReading(pid, merged[pid]) for pid in sorted(merged))

    def _optional(self, call: Callable[..., Any], *args: Any) -> Any:
        """Run one per-field NVML call: unsupported → `None`, fatal errors propagate."""
        try:
            return call(*args)
        except self._fatal_errors:
            raise
        except self._error_base as exc:
            log.debug("NVML field unavailable: %s", _describe(exc))
            return None

    def _required(self, index: int, what: str, call: Callable[..., Any], *args: Any) -> Any:
        """Run an NVML call the reading cannot do without; failure is a `ProbeError`."""
        try:
            return call(*args)
        except self._fatal_errors:
            raise
        except self._error_base as exc:
            raise ProbeError(f"GPU {index}: {what} unreadable: {_describe(exc)}") from exc


def _error_classes(nvml: Any, names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    # A binding older than an error code lacks its class; skip it rather than fail.
    return tuple(cls for name in names if (cls := getattr(nvml, name, None)) is not None)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _text(value: str | bytes) -> str:
    # Older bindings return bytes for strings.
    return value.decode() if isinstance(value, bytes) else str(value)
