"""The controller's one error tree. Catch at the depth you care about.

    ControllerError
    ├── ConfigError             bad settings; the CLI exits with EXIT_BAD_CONFIG
    ├── RequestError            the caller's request cannot be served as asked (4xx)
    │   ├── BadRequest          malformed or invalid input
    │   ├── Unauthorized        missing or wrong bearer token
    │   ├── NotFound            no such route, job, model or output
    │   ├── Conflict            the state forbids it now
    │   └── PayloadTooLarge     the body exceeds the configured limit
    ├── NoCapacity              nothing can serve it within limits now (503 + Retry-After)
    ├── StoreError              the job store failed
    └── AgentError              talking to an agent failed
        ├── AgentUnavailable    connection refused, timed out, or a 5xx
        └── AgentRejected       the agent answered 4xx; carries its code and message

Each class carries the `code` and HTTP status the controller's API answers with.
"""

from __future__ import annotations


class ControllerError(Exception):
    """Base of every error the controller raises on purpose."""

    code = "internal"
    http_status = 500


class ConfigError(ControllerError):
    """The settings are invalid; the message names the field."""


class RequestError(ControllerError):
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


class NoCapacity(ControllerError):
    """Nothing can serve the request within its limits now; try again after `retry_after_s`."""

    code = "no_capacity"
    http_status = 503

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class StoreError(ControllerError):
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
