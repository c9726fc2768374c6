"""The base of both services' error trees, and the errors they share.

    ServiceError                 anything a service raises on purpose; carries `code` and status
    ├── ConfigError              bad settings; the CLIs exit with EXIT_BAD_CONFIG
    ├── ProbeError               a GPU probe cannot be read at all (no driver, NVML gone)
    └── RequestError             a caller's request cannot be served as asked (4xx)
        ├── BadRequest           malformed or invalid input
        ├── Unauthorized         missing or wrong bearer token
        ├── Forbidden            a Host or Origin the service does not know
        ├── NotFound             no such route, job, model, prompt or output
        ├── Conflict             the state forbids it now
        └── PayloadTooLarge      the body exceeds the configured limit

`gpu_agent.errors` and `controller.errors` extend this tree with what only one side raises. Every
class names the `code` and HTTP status its API answers with, and `details()` what a caller needs
beyond the message, so `gpu_common.http.error_middleware` converts any of them in one place into
a JSON error in the shape of the route's family (`gpu_common.error_shapes`).
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the agent, the controller or the simulator raises on purpose."""

    code = "internal"
    http_status = 500

    def details(self) -> dict[str, Any] | None:
        """What a caller needs beyond the message to act on the error, if anything."""
        return None

    def headers(self) -> dict[str, str]:
        """Response headers the error implies (such as `Retry-After`)."""
        return {}


class ConfigError(ServiceError):
    """The settings are invalid; the message names the field and where its value came from."""


class ProbeError(ServiceError):
    """A GPU probe could not be read at all (as opposed to one unsupported field)."""


class RequestError(ServiceError):
    """The request cannot be served as asked; the caller should change it."""

    code = "bad_request"
    http_status = 400


class BadRequest(RequestError):
    """Malformed or invalid input; the message says which field and why."""

    code = "bad_request"
    http_status = 400


class Unauthorized(RequestError):
    """Missing or wrong bearer token."""

    code = "unauthorized"
    http_status = 401


class Forbidden(RequestError):
    """A request from a Host or Origin the service does not know (DNS rebinding, other sites);
    `code` says which of the two."""

    code = "forbidden"
    http_status = 403

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NotFound(RequestError):
    """No such route, job, model, prompt or output."""

    code = "not_found"
    http_status = 404


class Conflict(RequestError):
    """The current state forbids the request (a busy model, a finished job)."""

    code = "conflict"
    http_status = 409


class PayloadTooLarge(RequestError):
    """The body exceeds the configured limit."""

    code = "payload_too_large"
    http_status = 413
