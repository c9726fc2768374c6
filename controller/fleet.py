"""The agents as both schedulers see them (imperative shell): links, ledger books, action locks.

`Engine` builds one `Fleet` and hands it to `LlmRouter` and `ImageScheduler`, so neither needs the
engine: each gets the fleet, the knowledge, the store, the clock and the locks it uses, and
nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from controller.agents import AgentLink
from controller.domain.types import AgentState
from controller.errors import AgentError
from controller.ledger import AgentBook, agent_state

log = logging.getLogger(__name__)


class Fleet:
    """The configured agents: a link and a ledger book per agent, and per agent a lock under
    which its actions (unloads, frees, loads) run one at a time, in decision order."""

    def __init__(self, links: Mapping[str, AgentLink], *, reserve_bytes: int) -> None:
        self.links = dict(links)
        self.books = {name: AgentBook(name) for name in self.links}
        self.action_locks = {name: asyncio.Lock() for name in self.links}
        self.reserve_bytes = reserve_bytes

    def state_of(self, name: str, now: float) -> AgentState:
        """Agent `name` as the policy core sees it at `now`: its latest snapshot folded with
        what the controller has promised there."""
        link = self.links[name]
        healthy, reason = link.health()
        return agent_state(
            self.books[name],
            link.status,
            healthy=healthy,
            reason=reason,
            reserve_bytes=self.reserve_bytes,
            now=now,
        )

    def states(self, now: float) -> list[AgentState]:
        """Every agent's state at `now`, by name."""
        return [self.state_of(name, now) for name in sorted(self.links)]

    async def refresh(self, name: str) -> None:
        """Read agent `name`'s status now, after an action changed it; the next snapshot
        serves if it cannot be read."""
        try:
            await self.links[name].refresh()
        except AgentError as exc:
            log.info("status of %s not refreshed: %s", name, exc)
