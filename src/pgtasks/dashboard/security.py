"""What keeps the dashboard safe by default: CSRF protection on every action, HTTP basic
auth for standalone use, and the rule that a standalone dashboard binds only to the
loopback interface unless it has credentials.

Without credentials, a standalone dashboard also answers only requests addressed to a
loopback name (`LoopbackHost`), so that DNS rebinding cannot reach it from a web page.

CSRF: a double-submit token. Every page sets (once) a random token in a cookie (HttpOnly,
SameSite=Strict, scoped to the dashboard's path) and puts the same token in each form; an
action (always a POST) is refused unless the form's token equals the cookie's, and unless
the request's ``Origin`` (or, when a browser sends none, its ``Referer``), if it has one, is
the dashboard's own host: an ``Origin`` of ``null`` (a sandboxed frame) is refused. A page
of another site can neither read the cookie nor forge the field.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request

from ..exceptions import ConfigurationError

CSRF_COOKIE = "pgtasks_csrf"
CSRF_FIELD = "csrf"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def csrf_token(request: Request) -> tuple[str, bool]:
    """The request's CSRF token, and whether it is new (then set it as the cookie)."""
    token = request.cookies.get(CSRF_COOKIE)
    if token and len(token) >= 32:
        return token, False
    return secrets.token_urlsafe(32), True


def csrf_ok(request: Request, form: MutableMapping[str, list[str]]) -> str | None:
    """None when a POST may act, else why not."""
    cookie = request.cookies.get(CSRF_COOKIE) or ""
    sent = (form.get(CSRF_FIELD) or [""])[0]
    if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()):
        return "the form's CSRF token is missing or does not match (reload the page and retry)"
    # where the form was: its Origin, else (a browser that sends none) its Referer; "null"
    # (a sandboxed frame, a data: URL) is another site too
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is not None:
        host = request.headers.get("host", "")
        if origin == "null" or urlsplit(origin).netloc != host:
            return f"the request comes from another site ({origin!r})"
    return None


def parse_credentials(text: str) -> tuple[str, str]:
    """``user:password`` as a pair; raises `ConfigurationError` naming what is wrong."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigurationError(
            "dashboard credentials must look like USER:PASSWORD, both non-empty"
        )
    return user, password


class BasicAuth:
    """ASGI middleware: HTTP basic authentication with one user and password (compared in
    constant time). Use it behind TLS (a reverse proxy) when the dashboard is reachable
    from other machines: basic auth sends the password with every request."""

    def __init__(self, app: ASGIApp, username: str, password: str, realm: str = "pgtasks"):
        self.app = app
        self._expected = f"{username}:{password}".encode()
        self._realm = realm

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._authorized(dict(scope.get("headers") or [])):
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"www-authenticate", f'Basic realm="{self._realm}"'.encode()),
                    (b"content-type", b"text/plain; charset=utf-8"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"authentication required\n"})

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"")
        scheme, _, encoded = value.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, self._expected)


class LoopbackHost:
    """ASGI middleware of a standalone dashboard without credentials: it answers only
    requests addressed to a loopback name (``Host: 127.0.0.1:8080``, ``localhost``,
    ``[::1]``). A web page that rebinds its own name to 127.0.0.1 (DNS rebinding) is then
    refused, although its requests reach the port and look same-origin to the browser."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        try:
            name = urlsplit(f"//{host}").hostname or ""
        except ValueError:
            name = ""
        if is_loopback(name):
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 421,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")],
            }
        )
        await send(
            {
                "type": "http.response.body",
                "body": b"this dashboard answers only on this machine (Host: 127.0.0.1)\n",
            }
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
