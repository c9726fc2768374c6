"""The controller's live web dashboard, served at `/dashboard/` (a browser opening `/` lands there).

routes.py    the aiohttp sub-application: pages, login, the feed, actions, cross-site guards
sessions.py  the token entered once becomes an HttpOnly, SameSite=Strict session cookie
feed.py      Server-Sent Events pushed on the engine's changes, not polled
views.py     what the page shows, gathered from the engine in one pass
history.py   an hour of each GPU's memory by owner, load and power, in a ring buffer
actions.py   cancel an image job, unload an idle model
static/      the page, its script and styles, and uPlot 1.6.32 (MIT, static/uPlot.LICENSE)
             for the charts: shipped in the package, no build step, no CDN
"""

from controller.dashboard.routes import (
    DASHBOARD_PREFIX,
    browser_redirect_middleware,
    create_dashboard,
)

__all__ = ["DASHBOARD_PREFIX", "browser_redirect_middleware", "create_dashboard"]
