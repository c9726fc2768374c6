"""What a person may ask of an agent by hand, from the dashboard (pure core).

A person may unload a model that sits idle, to give its memory to whatever comes next; a model
serving or about to serve requests is left alone, as the planners leave it.
"""

from __future__ import annotations

from controller.domain.types import AgentState, gb


def unload_refusal(state: AgentState, model: str) -> str | None:
    """Why `model` may not be unloaded from the agent in `state` by hand now; None when it may.

    Refused: an agent that is not healthy, a model that is not resident there (or is already
    being unloaded), and a busy one: requests in flight, or routed to it and on their way.
    """
    if not state.healthy:
        return f"{state.name} is not healthy: {state.unhealthy_reason or 'no reason given'}"
    resident = state.resident_model(model)
    if resident is None:
        return f"{model} is not resident on {state.name} (or is being unloaded already)"
    if resident.busy:
        plural = "s" if resident.in_flight != 1 else ""
        return (
            f"{model} is busy on {state.name}: {resident.in_flight} request{plural} in flight; "
            f"only an idle model is unloaded by hand"
        )
    if state.queued_for(model):
        return f"{model} has requests waiting for it on {state.name}"
    return None


def unload_reason(state: AgentState, model: str) -> str:
    """The reason logged for a manual unload: what it gives back."""
    resident = state.resident_model(model)
    freed = gb(resident.vram_bytes) if resident is not None else "its memory"
    return f"unloaded {model} on {state.name} by hand, giving back {freed}"
