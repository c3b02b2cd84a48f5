"""FastAPI (and Starlette) lifespan helper: run a worker inside the web app's process.

::

    from fastapi import FastAPI
    from pgtasks.integrations.fastapi import worker_lifespan

    api = FastAPI(lifespan=worker_lifespan(app, concurrency=10))

On startup it migrates (unless ``migrate=False``) and starts a worker in the background of the
server's event loop, returning once the worker is listening; on shutdown it stops the worker
gracefully and closes the app's pool. The worker is in the lifespan state as
``request.state.pgtasks_worker``. No signal handlers are installed: the server owns those.
It needs nothing from FastAPI itself, so it works for any ASGI app with a lifespan.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from ..app import App


def worker_lifespan(
    app: App,
    *,
    migrate: bool = True,
    queues: Sequence[str] | None = None,
    concurrency: int = 10,
    shutdown_timeout: float = 20.0,
    listen: bool = True,
    poll_interval: float = 5.0,
) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """A lifespan function that runs a pgtasks worker for the life of the ASGI app."""

    @asynccontextmanager
    async def lifespan(_asgi_app: Any) -> AsyncIterator[dict[str, Any]]:
        try:
            if migrate:
                await app.migrate()
            async with app.worker(
                queues=queues,
                concurrency=concurrency,
                shutdown_timeout=shutdown_timeout,
                listen=listen,
                poll_interval=poll_interval,
            ) as worker:
                yield {"pgtasks_worker": worker}
        finally:
            await app.close()

    return lifespan
