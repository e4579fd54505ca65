"""Bearer-token authentication and a same-origin check.

With a token, every API endpoint (HTTP, WebSocket, WebRTC signalling, /healthz, /metrics) needs it:
HTTP as `Authorization: Bearer <token>`, a WebSocket as that header or as `?token=<token>` (browsers cannot
set headers on a WebSocket). The page itself (`/` and `/static/*`) is public: it holds no data, and the token
the page uses comes from its URL fragment (`/#token=...`), which browsers never send to the server.

Without a token, requests that carry an `Origin` header must come from the server's own origin, so that a web
page on another site cannot drive a server on localhost through the visitor's browser.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection


class Unauthorized(Exception):
    """A request without the right credentials; the message is safe to show to the client."""


class BearerAuth:
    def __init__(self, token: str | None):
        if token is not None and not token.strip():
            raise ValueError("the token must not be empty")
        self.token = token

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def check(self, conn: HTTPConnection, *, allow_query: bool = False) -> None:
        """Raise Unauthorized unless `conn` carries the token (any request passes when auth is off)."""
        if self.token is None:
            _check_same_origin(conn)
            return
        supplied = _bearer(conn.headers.get("authorization"))
        if supplied is None and allow_query:
            supplied = conn.query_params.get("token")
        if supplied is None:
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        if not hmac.compare_digest(supplied.encode(), self.token.encode()):
            raise Unauthorized("invalid bearer token")


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _check_same_origin(conn: HTTPConnection) -> None:
    origin = conn.headers.get("origin")
    if origin is None:  # not a browser, or a same-origin GET
        return
    host = conn.headers.get("host", "")
    if urlsplit(origin).netloc.lower() != host.lower():
        raise Unauthorized(f"cross-origin request from {origin} refused (start the server with --token to allow it)")
