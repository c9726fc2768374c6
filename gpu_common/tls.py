"""Certificate verification for the services' HTTP clients."""

from __future__ import annotations


def verify_for(url: str) -> bool:
    """httpx's `verify` for a client whose requests all go under `url`: on for https, off for
    plain http, where no certificate is ever presented. Setting it up loads the whole CA bundle
    (about 0.1 s of CPU per client), which a daemon that reconnects often pays again and again."""
    return url.lower().startswith("https://")
