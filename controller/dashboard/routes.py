"""The dashboard's HTTP face (adapter layer): an aiohttp sub-application under `/dashboard`.

The controller's own middlewares run first (errors as JSON, the Host and Origin checks); the
bearer-token check leaves `/dashboard` to this module, which authenticates by session cookie
(`controller.dashboard.sessions`):

- `GET /dashboard/` is the page; without a session it sends the browser to the login page. A
  person without the token sees that page and nothing else.
- `POST /dashboard/login` takes the token from a form (never from a URL) and sets the cookie.
- `GET /dashboard/events` is the live feed (`controller.dashboard.feed`); actions are
  `POST /dashboard/api/...`. Without a session these answer 401.
- `/dashboard/static/...` are the page's files, shipped inside the package; they hold no data.

Against cross-site requests: the cookie is `SameSite=Strict`; any request whose `Origin` is not
this very origin is refused (the controller's Origin check alone allows every local name, and
`localhost:3000` is the same site as `localhost:8766`); every POST must carry an `Origin`, and
every action the session's CSRF token in `X-CSRF-Token`. Pages may not be framed.
With no token configured (a loopback-only controller), the page opens a session by itself.
"""

from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from urllib.parse import urlsplit

from aiohttp import web

from controller.dashboard.actions import unload_idle_model
from controller.dashboard.feed import stream_state
from controller.dashboard.history import MemoryHistory, follow_history
from controller.dashboard.sessions import SESSION_COOKIE, Session, SessionBook
from controller.dashboard.views import dashboard_state
from controller.engine import Engine
from controller.errors import CrossSiteRequest
from gpu_common.errors import BadRequest, Unauthorized
from gpu_common.http import parse_json, token_matches

log = logging.getLogger(__name__)

DASHBOARD_PREFIX = "/dashboard"
"""Where the dashboard is mounted; a browser that opens `/` is sent to `DASHBOARD_PREFIX/`."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ENGINE = web.AppKey("dashboard_engine", Engine)
SESSIONS = web.AppKey("dashboard_sessions", SessionBook)
HISTORY = web.AppKey("dashboard_history", MemoryHistory)
CLOSING = web.AppKey("dashboard_closing", asyncio.Event)
TOKEN = web.AppKey("dashboard_token", str)
FILES = web.AppKey("dashboard_files", dict)

# The page's files: name -> content type. Only these are served.
STATIC_FILES = {
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
    "uPlot.iife.min.js": "text/javascript",
    "uPlot.min.css": "text/css",
    "uPlot.LICENSE": "text/plain",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: with it, a browser sends `Origin: null` on the login form.
    "Referrer-Policy": "same-origin",
}
_CSRF_HEADER = "X-CSRF-Token"
_MAX_FORM_BYTES = 4096


def _read_files() -> dict[str, bytes]:
    """The page's files and templates, read once from the package."""
    folder = resources.files("controller.dashboard") / "static"
    names = [*STATIC_FILES, "index.html", "login.html"]
    return {name: (folder / name).read_bytes() for name in names}


@web.middleware
async def browser_redirect_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Send a browser that opens `/` (it asks for HTML) to the dashboard; Ollama's clients,
    which do not, still get `Ollama is running`. Runs before the bearer-token check."""
    if (
        request.path == "/"
        and request.method in ("GET", "HEAD")
        and "text/html" in request.headers.get("Accept", "")
    ):
        raise web.HTTPSeeOther(f"{DASHBOARD_PREFIX}/")
    return await handler(request)


def _same_origin(origin: str, host: str | None) -> bool:
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and host is not None and parts.netloc == host


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Same-origin check on every request, security headers on every answer."""
    origin = request.headers.get("Origin")
    if origin is not None and not _same_origin(origin, request.host):
        raise CrossSiteRequest(f"Origin {origin[:200]!r} is not this dashboard's origin")
    if request.method == "POST" and origin is None:
        raise CrossSiteRequest("a dashboard POST must come from the dashboard's page (Origin)")
    response = await handler(request)
    response.headers.update(_SECURITY_HEADERS)
    return response


SessionHandler = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]


def _with_session(*, page: bool = False) -> Callable[[SessionHandler], Handler]:
    """A handler that needs a session: without one, the page sends the browser to the login
    page and anything else answers 401; a POST must also carry the session's CSRF token.
    With no token configured, the page opens a session by itself."""

    def wrap(handler: SessionHandler) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            sessions = request.app[SESSIONS]
            session = sessions.find(request.cookies.get(SESSION_COOKIE))
            opened = session is None and page and not request.app[TOKEN]
            if opened:
                session = sessions.open()
            if session is None:
                if page:
                    raise web.HTTPSeeOther(f"{DASHBOARD_PREFIX}/login")
                raise Unauthorized("no dashboard session: log in at /dashboard/login")
            if request.method == "POST" and not sessions.csrf_matches(
                session, request.headers.get(_CSRF_HEADER)
            ):
                raise CrossSiteRequest(f"missing or wrong {_CSRF_HEADER}")
            response = await handler(request, session)
            if opened:
                _set_cookie(request, response, session)
            return response

        return checked

    return wrap


def _set_cookie(request: web.Request, response: web.StreamResponse, session: Session) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        session.session_id,
        path=DASHBOARD_PREFIX,
        httponly=True,
        samesite="Strict",
        # Behind a TLS-terminating proxy the browser must send it over HTTPS only.
        secure=request.secure or request.headers.get("X-Forwarded-Proto") == "https",
        max_age=int(request.app[SESSIONS].idle_s),
    )


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text, status=status, content_type="text/html", headers={"Cache-Control": "no-store"}
    )


@_with_session(page=True)
async def page(request: web.Request, session: Session) -> web.Response:
    template = request.app[FILES]["index.html"].decode()
    return _html(template.replace("{{csrf}}", html.escape(session.csrf, quote=True)))


async def page_without_slash(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther(f"{DASHBOARD_PREFIX}/")


def _login_page(request: web.Request, message: str = "", status: int = 200) -> web.Response:
    template = request.app[FILES]["login.html"].decode()
    return _html(template.replace("{{message}}", html.escape(message)), status=status)


async def login_form(request: web.Request) -> web.Response:
    if not request.app[TOKEN]:
        raise web.HTTPSeeOther(f"{DASHBOARD_PREFIX}/")
    return _login_page(request)


async def login(request: web.Request) -> web.Response:
    token = request.app[TOKEN]
    if not token:
        raise web.HTTPSeeOther(f"{DASHBOARD_PREFIX}/")
    if request.content_length is not None and request.content_length > _MAX_FORM_BYTES:
        raise BadRequest("login form too large")
    form = await request.post()
    given = form.get("token")
    if not isinstance(given, str) or not token_matches(given.strip(), token.encode()):
        log.warning("dashboard login refused from %s", request.remote)
        return _login_page(request, "That is not the controller's token.", status=401)
    session = request.app[SESSIONS].open()
    response = web.HTTPSeeOther(f"{DASHBOARD_PREFIX}/")
    _set_cookie(request, response, session)
    raise response


@_with_session()
async def logout(request: web.Request, session: Session) -> web.Response:
    request.app[SESSIONS].close(session.session_id)
    response = web.json_response({"logged_out": True})
    response.del_cookie(SESSION_COOKIE, path=DASHBOARD_PREFIX)
    return response


async def static_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    content_type = STATIC_FILES.get(name)
    if content_type is None:
        raise web.HTTPNotFound()
    return web.Response(
        body=request.app[FILES][name],
        content_type=content_type,
        charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )


@_with_session()
async def events(request: web.Request, session: Session) -> web.StreamResponse:
    app = request.app
    return await stream_state(request, app[ENGINE], app[HISTORY], app[CLOSING])


@_with_session()
async def state(request: web.Request, session: Session) -> web.Response:
    """The page's state once, as the feed sends it (for scripts and a first paint)."""
    return web.Response(
        text=dashboard_state(request.app[ENGINE]).model_dump_json(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


@_with_session()
async def cancel_job(request: web.Request, session: Session) -> web.Response:
    engine = request.app[ENGINE]
    record = await engine.images.cancel(request.match_info["job_id"])
    log.info("image job %s cancelled from the dashboard: now %s", record.job_id, record.state)
    return web.Response(
        text=engine.images.info(record).model_dump_json(), content_type="application/json"
    )


@_with_session()
async def unload_model(request: web.Request, session: Session) -> web.Response:
    raw = await request.read()
    body = parse_json(raw) if raw else None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise BadRequest('body must be {"model": "<name>"}')
    result = await unload_idle_model(
        request.app[ENGINE], request.match_info["agent"], body["model"]
    )
    return web.Response(text=result.model_dump_json(), content_type="application/json")


async def _background(app: web.Application) -> AsyncIterator[None]:
    """The history sampler runs while the controller serves; feeds end when it stops."""
    app[CLOSING] = asyncio.Event()
    task = asyncio.create_task(follow_history(app[ENGINE], app[HISTORY]), name="dashboard-history")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _close_feeds(app: web.Application) -> None:
    app[CLOSING].set()


def create_dashboard(engine: Engine, *, token: str | None) -> web.Application:
    """The dashboard as a sub-application; mount it at `DASHBOARD_PREFIX`. `token` is the
    controller's bearer token, which the login page asks for (None: no login)."""
    app = web.Application(middlewares=[_guard])
    app[ENGINE] = engine
    app[TOKEN] = token or ""
    app[SESSIONS] = SessionBook(engine.clock)
    app[HISTORY] = MemoryHistory()
    app[FILES] = _read_files()
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_close_feeds)
    router = app.router
    router.add_get("", page_without_slash)
    router.add_get("/", page)
    router.add_get("/login", login_form)
    router.add_post("/login", login)
    router.add_post("/logout", logout)
    router.add_get("/static/{name}", static_file)
    router.add_get("/events", events)
    router.add_get("/api/state", state)
    router.add_post("/api/jobs/{job_id}/cancel", cancel_job)
    router.add_post("/api/agents/{agent}/unload", unload_model)
    return app
