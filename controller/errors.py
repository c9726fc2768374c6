"""The controller's own errors, on the shared base in `gpu_common.errors`.

    ServiceError (gpu_common.errors)   ConfigError and the 4xx RequestError family
    └── ControllerError
        ├── NoCapacity              nothing can serve it within limits now (503 + Retry-After)
        ├── StoreError              the job store failed
        └── AgentError              talking to an agent failed
            ├── AgentUnavailable    connection refused, timed out, or a 5xx
            └── AgentRejected       the agent answered 4xx; carries its code and message
    RequestError (gpu_common.errors)
    ├── IdempotencyKeyReused        an Idempotency-Key sent again with another request (422)
    └── CrossSiteRequest            a dashboard request from another origin or without CSRF token

Each class carries the `code` and HTTP status the controller's API answers with.
"""

from __future__ import annotations

import math

from gpu_common.errors import RequestError, ServiceError


class ControllerError(ServiceError):
    """Base of every error the controller raises on purpose."""

    code = "internal"
    http_status = 500


class NoCapacity(ControllerError):
    """Nothing can serve the request within its limits now; try again after `retry_after_s`.

    The message says so in the words Ollama uses for a full queue, then why (`reason`, also in
    `X-GPU-Reason`): an Ollama or OpenAI client shows only the message."""

    code = "no_capacity"
    http_status = 503

    def __init__(self, reason: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        self.reason = reason
        super().__init__(f"server busy, please try again in {self.retry_after_whole_s} s: {reason}")

    @property
    def retry_after_whole_s(self) -> int:
        """`retry_after_s` as the whole seconds `Retry-After` carries (at least 1)."""
        return max(1, math.ceil(self.retry_after_s))

    def headers(self) -> dict[str, str]:
        reason = self.reason.encode("ascii", "replace").decode()[:400]
        return {"Retry-After": str(self.retry_after_whole_s), "X-GPU-Reason": reason}


class StoreError(ControllerError):
    """The job store failed."""

    code = "store_error"
    http_status = 500


class AgentError(ControllerError):
    """Talking to an agent failed."""

    code = "agent_error"
    http_status = 502

    def __init__(self, agent: str, message: str) -> None:
        super().__init__(f"agent {agent}: {message}")
        self.agent = agent


class AgentUnavailable(AgentError):
    """The agent could not be reached in time, or answered 5xx."""

    code = "agent_unavailable"
    http_status = 503


class AgentRejected(AgentError):
    """The agent answered 4xx. `status` and `agent_code` are what it said."""

    code = "agent_rejected"
    http_status = 502

    def __init__(self, agent: str, status: int, agent_code: str, message: str) -> None:
        super().__init__(agent, f"{status} {agent_code}: {message}")
        self.status = status
        self.agent_code = agent_code
        self.agent_message = message


class IdempotencyKeyReused(RequestError):
    """An `Idempotency-Key` came again with a different request (the IETF draft's 422)."""

    code = "idempotency_key_reused"
    http_status = 422


class CrossSiteRequest(RequestError):
    """A dashboard request from another origin, or an action without the session's CSRF token."""

    code = "forbidden_origin"
    http_status = 403
