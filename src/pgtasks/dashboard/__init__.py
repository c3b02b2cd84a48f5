"""The web dashboard (the ``dashboard`` extra: ``pip install 'pgtasks[dashboard]'``, which
installs Starlette, Jinja2 and uvicorn).

Mounted in your own ASGI app, behind your app's authentication::

    from pgtasks.dashboard import dashboard

    api.mount("/tasks", dashboard(app))                  # FastAPI or Starlette
    api.mount("/tasks", dashboard(app, read_only=True))  # no actions at all

or standalone: ``python -m pgtasks dashboard --app myproj.tasks:app --port 8080`` (on
127.0.0.1 unless given ``--basic-auth USER:PASSWORD``).

Server-rendered pages that work without JavaScript (a small script of its own refreshes the
live pages): the queues, a queue's jobs by state, search by job id, task or idempotency key,
one job with its arguments, headers and failed attempts, the dead letters (retry or purge one
or many), and the workers. Every query goes through `pgtasks.admin`; the dashboard never
talks to a worker. Actions are POSTs with CSRF protection (see `security`).
"""

from __future__ import annotations

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on what is installed
    from ..exceptions import ConfigurationError

    raise ConfigurationError(
        "the pgtasks dashboard needs Starlette and Jinja2: pip install 'pgtasks[dashboard]'"
    ) from exc

from ..app import App
from .security import ASGIApp, BasicAuth
from .web import Dashboard

__all__ = ["Dashboard", "dashboard"]


def dashboard(
    app: App,
    *,
    read_only: bool = False,
    basic_auth: tuple[str, str] | None = None,
    title: str = "pgtasks",
    refresh: float = 5.0,
) -> ASGIApp:
    """The dashboard of ``app``'s database, as an ASGI app to mount or serve.

    Args:
        app: whose database it shows (its pool is used; close the app as usual).
        read_only: show everything, act on nothing (no buttons; every POST is refused).
        basic_auth: ``(user, password)`` to require HTTP basic auth; mounted, the dashboard
            otherwise relies on the host app's authentication, like any route of it.
        title: the name in the page titles.
        refresh: seconds between refreshes of the live pages (when live refresh is on).
    """
    board = Dashboard(
        app.database,
        read_only=read_only,
        title=title,
        refresh=refresh,
        dead_letters=app.dead_letters,
    )
    if basic_auth is not None:
        return BasicAuth(board.app, *basic_auth)
    return board.app
