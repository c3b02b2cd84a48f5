"""Static checks, run by mypy (``warn_unused_ignores``): the option sets are typed where
they are taken as ``**options: Unpack[...]`` (`TaskOptions`, `TaskDefaults`,
`WorkerOptions`), so a misspelt name or a value of the wrong type is a type error, on every
way in. Each ``# type: ignore[code]`` marks a call that must be one.
"""

from __future__ import annotations

import datetime as dt

import pgtasks
from pgtasks import App, TaskDefaults, TaskOptions, Worker, WorkerOptions
from pgtasks.integrations.fastapi import worker_lifespan
from pgtasks.worker import WorkerSettings


async def _checks(app: App) -> None:
    # the app: its own options, and the task defaults
    App(max_retries=5, retry_backoff=1.0, timeout=None, retry_on=(OSError,), create_queues=False)
    App(key_retention=dt.timedelta(days=1), on_success="delete", lease=10)
    App(max_retries="5")  # type: ignore[arg-type]
    App(on_success="keep")  # type: ignore[arg-type]
    App(retry_on=OSError)  # type: ignore[arg-type]
    App(create_queues="no")  # type: ignore[arg-type]
    App(retries=5)  # type: ignore[call-arg]
    App(queue="email")  # type: ignore[call-arg]  # a task's own, not a default

    # the decorators
    @app.task(queue="email", max_retries=2, timeout=30, transactional=True)
    async def a() -> None: ...

    @pgtasks.task(name="lib.b", lease=60, dont_retry_on=(KeyError,))
    async def b() -> None: ...

    async def c() -> None: ...

    app.task(max_retries="2")(c)  # type: ignore[call-overload]
    app.task(transactional=1)(c)  # type: ignore[call-overload]
    app.task(timout=30)(c)  # type: ignore[call-overload]
    pgtasks.task(retry_jitter="no")(c)  # type: ignore[call-overload]
    pgtasks.task(queues=["a"])(c)  # type: ignore[call-overload]

    # the worker, on every way in
    app.worker(queues=["email"], concurrency=4, burst=True, poll_interval=0.5)
    app.worker(concurrency="4")  # type: ignore[arg-type]
    app.worker(poll_interval="5s")  # type: ignore[arg-type]
    app.worker(threads=4)
    app.worker(threads="4")  # type: ignore[arg-type]
    app.worker(thread=4)  # type: ignore[call-arg]
    settings = WorkerSettings(app.defaults, dt.timedelta(days=7), 1024, 1024)
    Worker(app.database, app.tasks, settings, listen=False)
    Worker(app.database, app.tasks, settings, listen="no")  # type: ignore[arg-type]
    worker_lifespan(app, concurrency=2, shutdown_timeout=5)
    worker_lifespan(app, concurrency=2.5)  # type: ignore[arg-type]
    worker_lifespan(app, concurency=2)  # type: ignore[call-arg]

    # the TypedDicts themselves, for code that passes options along
    defaults: TaskDefaults = {"max_retries": 1, "timeout": 5.0}
    options: TaskOptions = {"queue": "email", "max_retries": 1}
    worker_options: WorkerOptions = {"concurrency": 8}
    bad: WorkerOptions = {"concurrency": "8"}  # type: ignore[typeddict-item]
    App(**defaults)
    app.task(**options)(c)
    app.worker(**worker_options)
    worker_lifespan(app, **worker_options)
    del a, b, bad


def test_typing_module_is_importable() -> None:
    """The checks above are for mypy; this only proves pytest can import the module."""
    assert callable(_checks)
