"""The agent's one error tree. Catch at the depth you care about.

    GpuAgentError
    ├── ConfigError            bad settings; the CLI exits with EXIT_BAD_CONFIG
    ├── ProbeError             a GPU probe cannot be read at all (no driver, NVML gone)
    ├── RequestError           a caller's request cannot be served as asked (4xx)
    │   ├── BadRequest         malformed or invalid input
    │   ├── Unauthorized       missing or wrong bearer token
    │   ├── NotFound           no such route, model, prompt or output
    │   ├── Conflict           the state forbids it now (a busy model)
    │   └── PayloadTooLarge    the body exceeds the configured limit
    ├── OllamaError            talking to Ollama failed
    │   ├── OllamaUnavailable  connection refused, timed out, or a 5xx
    │   ├── ModelNotFound      Ollama does not have the model
    │   ├── OllamaRejected     Ollama answered 4xx for another reason
    │   └── UnloadTimeout      the memory never came back after an unload
    ├── ComfyUIError           talking to ComfyUI failed
    │   ├── ComfyUIUnavailable connection refused, timed out, or a 5xx answer
    │   ├── WorkflowRejected   400 from POST /prompt: keeps ComfyUI's `error` and `node_errors`
    │   ├── PromptNotFound     the adapter tracks no prompt with this id
    │   └── OutputNotFound     no such output index, or /view has no such file
    ├── FreeTimeout            ComfyUI's memory never came back after /free
    └── SimError               misuse of the simulated desktop
        └── SimOutOfMemory     an allocation larger than the simulated GPU's free memory

Each class carries the `code` and HTTP status the agent's API answers with, so the API converts any
of them in one place.
"""

from __future__ import annotations


class GpuAgentError(Exception):
    """Base of every error the agent raises on purpose."""

    code = "internal"
    http_status = 500


class ConfigError(GpuAgentError):
    """The settings are invalid; the message names the field."""


class ProbeError(GpuAgentError):
    """A GPU probe could not be read at all (as opposed to one unsupported field)."""


class RequestError(GpuAgentError):
    """The request cannot be served as asked; the caller should change it."""

    code = "bad_request"
    http_status = 400


class BadRequest(RequestError):
    code = "bad_request"
    http_status = 400


class Unauthorized(RequestError):
    code = "unauthorized"
    http_status = 401


class NotFound(RequestError):
    code = "not_found"
    http_status = 404


class Conflict(RequestError):
    code = "conflict"
    http_status = 409


class PayloadTooLarge(RequestError):
    code = "payload_too_large"
    http_status = 413


class OllamaError(GpuAgentError):
    """Talking to Ollama failed."""

    code = "ollama_error"
    http_status = 502


class OllamaUnavailable(OllamaError):
    code = "ollama_unavailable"
    http_status = 503


class ModelNotFound(OllamaError):
    code = "model_not_found"
    http_status = 404


class OllamaRejected(OllamaError):
    code = "ollama_rejected"
    http_status = 400


class UnloadTimeout(OllamaError):
    code = "unload_timeout"
    http_status = 504


class FreeTimeout(GpuAgentError):
    code = "free_timeout"
    http_status = 504


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


# -- ComfyUI adapter -------------------------------------------------------------------------


class ComfyUIError(GpuAgentError):
    """Talking to ComfyUI failed (base of the ComfyUI adapter's errors)."""

    code = "comfyui_error"
    http_status = 502


class ComfyUIUnavailable(ComfyUIError):
    """ComfyUI could not be reached in time or answered 5xx.

    `prompt_id` is set when a submission's fate is unknown (the POST may have been queued):
    submitting again with the same id is safe, as it asks ComfyUI before posting again.
    """

    code = "comfyui_unavailable"
    http_status = 503

    def __init__(self, message: str, *, prompt_id: str | None = None) -> None:
        super().__init__(message)
        self.prompt_id = prompt_id


class WorkflowRejected(ComfyUIError):
    """POST /prompt answered 400; `error` and `node_errors` are ComfyUI's own, for the API."""

    code = "workflow_rejected"
    http_status = 400

    def __init__(self, error: dict[str, object], node_errors: dict[str, object]) -> None:
        message = str(error.get("message") or "workflow rejected")
        details = str(error.get("details") or "")
        super().__init__(f"{message}: {details}" if details and details != message else message)
        self.error = error
        self.node_errors = node_errors


class PromptNotFound(ComfyUIError):
    """The adapter tracks no prompt with this id."""

    code = "prompt_not_found"
    http_status = 404

    def __init__(self, prompt_id: str) -> None:
        super().__init__(f"no prompt {prompt_id!r} is known")
        self.prompt_id = prompt_id


class OutputNotFound(ComfyUIError):
    """The requested output index does not exist, or ComfyUI no longer has the file."""

    code = "output_not_found"
    http_status = 404
