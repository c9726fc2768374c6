"""What the LLM routes read from a request for the planner (adapter layer): the caller's limits
and rough token counts. Shared by the Ollama routes (`controller.api`) and the OpenAI routes
(`controller.openai_api`).

The limits, `min_quality` and `max_latency_s`, come from the body (a JSON number) or, for a
client that cannot add body fields, the `X-GPU-Min-Quality` and `X-GPU-Max-Latency-S` headers;
they are taken out of the body before it goes on to Ollama.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from gpu_common.errors import BadRequest
from gpu_common.openapi import Param, RouteDoc

# Our own request fields, stripped before the request goes on to Ollama.
CONSTRAINTS = ("min_quality", "max_latency_s")
# The largest context or output length taken into a latency estimate (Ollama caps them anyway).
MAX_TOKENS = 1 << 20

# The constraints may come as headers instead of body fields (the body wins).
CONSTRAINT_HEADERS = (
    Param(
        "X-GPU-Min-Quality",
        {"type": "number", "minimum": 0},
        location="header",
        required=False,
        description="the least quality score acceptable, when the body names none",
    ),
    Param(
        "X-GPU-Max-Latency-S",
        {"type": "number", "minimum": 0},
        location="header",
        required=False,
        description="the longest acceptable answer time in seconds, when the body names none",
    ),
)
# Both families answer these statuses on a routed LLM request (a hold is a 503).
LLM_ROUTE_ERRORS = (400, 404, 500, 502, 503)


def llm_route_doc(
    summary: str, request: type[BaseModel], *, content_types: tuple[str, ...] = ()
) -> RouteDoc:
    """The documentation of a route the controller places on a model: it reads the constraint
    headers, and its hold (a 503) carries `Retry-After`. `content_types`: a streamed answer's
    possible types."""
    return RouteDoc(
        summary,
        request=request,
        content_types=content_types,
        errors=LLM_ROUTE_ERRORS,
        params=CONSTRAINT_HEADERS,
        retry_after=(503,),
    )


def check_constraint_types(body: Mapping[str, Any]) -> None:
    """BadRequest when a limit in the body is not a JSON number."""
    for name in CONSTRAINTS:
        # In the body a constraint is a JSON number; only its header spells it as text.
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise BadRequest(f"{name} must be a number")


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"{name} must be a number") from exc
    if not math.isfinite(number) or number < 0:
        raise BadRequest(f"{name} must be a non-negative number")
    return number


def pop_constraints(
    body: dict[str, Any], headers: Mapping[str, str]
) -> tuple[float | None, float | None]:
    """`(min_quality, max_latency_s)` from the body, else the headers; taken out of the body."""
    min_quality = _number(body.pop("min_quality", headers.get("X-GPU-Min-Quality")), "min_quality")
    max_latency = _number(
        body.pop("max_latency_s", headers.get("X-GPU-Max-Latency-S")), "max_latency_s"
    )
    return min_quality, max_latency


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """A rough count (4 characters a token) for the latency estimate; Ollama counts exactly."""
    chars = len(str(body.get("prompt") or "")) + len(str(body.get("system") or ""))
    given = body.get("input")
    if given:
        chars += len(given) if isinstance(given, str) else sum(len(str(i)) for i in given)
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            chars += len(str(message.get("content") or ""))
    return max(1, chars // 4) + 16


def positive_int(value: Any) -> int | None:
    """A positive integer option for the estimates, capped; None when it is anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return min(value, MAX_TOKENS)
    return None
