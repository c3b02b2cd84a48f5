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

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from typing_extensions import Unpack

from .._options import Flag, Option, OptionSet
from ..app import App
from ..worker import WORKER_OPTIONS, WorkerOptions

LIFESPAN_OPTIONS = OptionSet(
    Option("migrate", True, "run App.migrate() at startup, before the worker starts", Flag())
)
"""The helper's own option; the others are the worker options (`WORKER_OPTIONS`)."""


def worker_lifespan(
    app: App, *, migrate: bool = True, **options: Unpack[WorkerOptions]
) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """A lifespan function that runs a pgtasks worker for the life of the ASGI app.

    Args:
        app: the pgtasks `App` whose jobs it runs.
        migrate: run `App.migrate` at startup.
        **options: the worker options (`WorkerOptions`), as for `App.worker`; checked
            here, so that a wrong one fails when the lifespan is made, not at startup.
    """
    LIFESPAN_OPTIONS.check({"migrate": migrate}, "worker_lifespan")
    WORKER_OPTIONS.check(options, "worker_lifespan")

    @asynccontextmanager
    async def lifespan(_asgi_app: Any) -> AsyncIterator[dict[str, Any]]:
        try:
            if migrate:
                await app.migrate()
            async with app.worker(**options) as worker:
                yield {"pgtasks_worker": worker}
        finally:
            await app.close()

    return lifespan
