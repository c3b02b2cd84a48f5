"""``pgtasks dashboard``: the dashboard served on its own, by uvicorn.

Safe by default: it binds to 127.0.0.1, and refuses any other address unless it has
credentials (``--basic-auth USER:PASSWORD`` or ``PGTASKS_DASHBOARD_AUTH``), which it then
requires of every request. Without them it answers only requests addressed to a loopback
name (``Host: 127.0.0.1``), so that a web page cannot reach it by DNS rebinding. Put it
behind TLS (a reverse proxy) when it is reachable from other machines.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

from ..app import App
from ..exceptions import ConfigurationError
from . import dashboard
from .security import LoopbackHost, is_loopback


def check_bind(host: str, credentials: tuple[str, str] | None) -> None:
    """Refuse to serve beyond this machine without credentials."""
    if credentials is None and not is_loopback(host):
        raise ConfigurationError(
            f"the dashboard would be reachable from other machines at {host!r} with no "
            "authentication: give --basic-auth USER:PASSWORD (or PGTASKS_DASHBOARD_AUTH), or "
            "bind to 127.0.0.1"
        )


def build(
    app: App, *, credentials: tuple[str, str] | None, read_only: bool
) -> Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]:
    """The standalone ASGI app: the dashboard, with a lifespan that closes the app's pool."""
    inner = dashboard(app, read_only=read_only, basic_auth=credentials)
    if credentials is None:  # on 127.0.0.1 (`check_bind`): for this machine's names only
        inner = LoopbackHost(inner)

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        try:
            yield
        finally:
            await app.close()

    async def standalone(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            async with lifespan():
                while (message := await receive())["type"] != "lifespan.shutdown":
                    await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await inner(scope, receive, send)

    return standalone


def serve(
    app: App,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    credentials: tuple[str, str] | None = None,
    read_only: bool = False,
) -> None:
    """Serve the dashboard until interrupted (uvicorn handles SIGINT and SIGTERM)."""
    check_bind(host, credentials)
    uvicorn.run(
        build(app, credentials=credentials, read_only=read_only),
        host=host,
        port=port,
        log_level="warning",
        proxy_headers=False,
    )
