"""The agent's own errors, on the shared base in `gpu_common.errors`. Catch at any depth.

    ServiceError (gpu_common.errors)   ConfigError, ProbeError and the 4xx RequestError family
    └── GpuAgentError
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
        └── FreeTimeout            ComfyUI's memory never came back after /free

Each class carries the `code` and HTTP status the agent's API answers with, so the API converts any
of them in one place (`gpu_common.http.error_middleware`).
"""

from __future__ import annotations

from typing import Any

from gpu_common.errors import ServiceError


class GpuAgentError(ServiceError):
    """Base of every error the agent raises on purpose."""

    code = "internal"
    http_status = 500


class OllamaError(GpuAgentError):
    """Talking to Ollama failed."""

    code = "ollama_error"
    http_status = 502


class OllamaUnavailable(OllamaError):
    """Ollama could not be reached in time, or answered 5xx."""

    code = "ollama_unavailable"
    http_status = 503


class ModelNotFound(OllamaError):
    """Ollama does not have the model."""

    code = "model_not_found"
    http_status = 404


class OllamaRejected(OllamaError):
    """Ollama answered 4xx for a reason other than a missing model."""

    code = "ollama_rejected"
    http_status = 400


class UnloadTimeout(OllamaError):
    """The GPU never showed the memory back after an unload."""

    code = "unload_timeout"
    http_status = 504


class FreeTimeout(GpuAgentError):
    """ComfyUI's memory never came back after `/free`."""

    code = "free_timeout"
    http_status = 504


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

    def details(self) -> dict[str, Any] | None:
        # The submission may have been queued: resubmitting with this id is safe.
        return {"prompt_id": self.prompt_id} if self.prompt_id is not None else None


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

    def details(self) -> dict[str, Any] | None:
        # ComfyUI's own verdict, so a client can point at the offending node and input.
        return {"error": self.error, "node_errors": self.node_errors}


class PromptNotFound(ComfyUIError):
    """The adapter tracks no prompt with this id."""

    code = "prompt_not_found"
    http_status = 404

    def __init__(self, prompt_id: str) -> None:
        super().__init__(f"no prompt {prompt_id!r} is known")
        self.prompt_id = prompt_id


class UploadRejected(ComfyUIError):
    """ComfyUI refused an upload (400: no file name, a subfolder outside its folder)."""

    code = "upload_rejected"
    http_status = 400


class OutputNotFound(ComfyUIError):
    """The requested output index does not exist, or ComfyUI no longer has the file."""

    code = "output_not_found"
    http_status = 404
