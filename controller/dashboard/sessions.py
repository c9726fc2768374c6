"""Browser sessions of the dashboard (adapter layer): the token, entered once, becomes a cookie.

A person types the controller's token into the login page once; the controller answers with a
random session id in an `HttpOnly`, `SameSite=Strict` cookie, so the token never travels in a
URL, never reaches the page's scripts and is not sent again. Each session also has its own CSRF
token, which the page sends with every action. Sessions live in memory: a restarted controller
asks for the token again. They expire after `idle_s` without use, on the engine's clock.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

SESSION_COOKIE = "gpu_dashboard"
# Half a working day without a look, then the token again.
DEFAULT_IDLE_S = 12 * 3600.0
# A studio has a handful of people; beyond this many, the session idle longest is dropped.
DEFAULT_MAX_SESSIONS = 64


@dataclass
class Session:
    """One logged-in browser: its cookie value, its CSRF token, and when it expires."""

    session_id: str
    csrf: str
    expires_s: float


class SessionBook:
    """The open sessions, at most `max_sessions`, each expiring `idle_s` after its last use."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        idle_s: float = DEFAULT_IDLE_S,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ) -> None:
        self._clock = clock
        self.idle_s = idle_s
        self._max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    def open(self) -> Session:
        """A new session; the one idle longest makes way when the book is full."""
        now = self._clock()
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires_s > now}
        while len(self._sessions) >= self._max_sessions:
            oldest = min(self._sessions.values(), key=lambda s: s.expires_s)
            del self._sessions[oldest.session_id]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + self.idle_s)
        self._sessions[session.session_id] = session
        return session

    def find(self, session_id: str | None) -> Session | None:
        """The live session behind a cookie value, its expiry pushed back; None if there is none
        or it expired."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        now = self._clock()
        if session is None:
            return None
        if session.expires_s <= now:
            del self._sessions[session_id]
            return None
        session.expires_s = now + self.idle_s
        return session

    def close(self, session_id: str) -> None:
        """End a session (logout); closing one that is gone is harmless."""
        self._sessions.pop(session_id, None)

    def csrf_matches(self, session: Session, given: str | None) -> bool:
        """Whether `given` is the session's CSRF token, compared in constant time."""
        if given is None:
            return False
        return secrets.compare_digest(session.csrf.encode(), given.encode("utf-8", "replace"))
