"""What a person can do from the dashboard (imperative shell): cancel a job, unload a model.

Cancelling goes through the image scheduler as `DELETE /v1/images/{id}` does. Unloading asks the
core first (`controller.domain.operator`): only an idle model on a healthy agent goes, decided
under the planning lock and marked as being unloaded there, so no plan counts on it meanwhile;
the agent then unloads it (refusing, with 409, a model that became busy) and confirms on the GPU.
"""

from __future__ import annotations

import logging

from controller.domain.operator import unload_reason, unload_refusal
from controller.engine import Engine
from gpu_common.errors import Conflict, NotFound
from gpu_common.schema import UnloadResult

log = logging.getLogger(__name__)


async def unload_idle_model(engine: Engine, agent: str, model: str) -> UnloadResult:
    """Unload `model` from `agent` if it is idle; `Conflict` with the core's reason if not,
    `NotFound` for an agent the controller does not know."""
    fleet = engine.fleet
    if agent not in fleet.links:
        raise NotFound(f"no agent {agent!r}")
    book = fleet.books[agent]
    async with engine.plan_lock:
        state = fleet.state_of(agent, engine.clock())
        refusal = unload_refusal(state, model)
        if refusal is not None:
            raise Conflict(refusal)
        book.unloading.add(model)
    try:
        async with fleet.action_locks[agent]:
            result = await fleet.links[agent].unload(model)
            await fleet.refresh(agent)
    finally:
        book.unloading.discard(model)
        engine.pulse.fire()
    log.info("%s (%d bytes freed)", unload_reason(state, model), result.freed_bytes)
    return result
