"""The task registry: building tasks from decorator options, shared tasks, the default app.

Tasks made with ``@app.task`` belong to that app. Shared tasks (bare ``@pgtasks.task``, like
Celery's ``shared_task``) belong to every `App` in the process and defer through the default
app: the one marked ``App(default=True)`` or ``app.set_default()``, else the only live one.
This module holds the only process-wide state pgtasks has.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from typing_extensions import ParamSpec

from .._shared import OnSuccess
from ..exceptions import ConfigurationError
from ..queues import check_queue_name
from .task import Task, TaskConfig

if TYPE_CHECKING:
    from ..app import App

P = ParamSpec("P")
R = TypeVar("R")

shared_tasks: dict[str, Task[Any, Any]] = {}
_apps: weakref.WeakSet[App] = weakref.WeakSet()
_default_app: weakref.ReferenceType[App] | None = None


def register_app(app: App, *, default: bool) -> None:
    _apps.add(app)
    if default:
        set_default(app)


def set_default(app: App) -> None:
    global _default_app
    _default_app = weakref.ref(app)


def check_lease(lease: float) -> float:
    if lease < 1:
        raise ConfigurationError(f"lease must be at least 1 second (got {lease})")
    return lease


def check_on_success(value: str) -> OnSuccess:
    if value not in ("archive", "delete"):
        raise ConfigurationError(f"on_success must be 'archive' or 'delete' (got {value!r})")
    return value  # type: ignore[return-value]


_TASK_OPTIONS = frozenset(
    {
        "max_retries",
        "retry_backoff",
        "retry_backoff_max",
        "retry_jitter",
        "retry_on",
        "dont_retry_on",
        "timeout",
        "lease",
        "on_success",
        "transactional",
    }
)


def make_task(
    fn: Callable[P, Awaitable[R]], app: App | None, options: dict[str, Any]
) -> Task[P, R]:
    unknown = set(options) - _TASK_OPTIONS - {"name", "queue"}
    if unknown:
        raise TypeError(f"unknown task option(s): {', '.join(sorted(unknown))}")
    config = {k: v for k, v in options.items() if k in _TASK_OPTIONS}
    if config.get("lease") is not None:
        check_lease(config["lease"])
    if config.get("on_success") is not None:
        check_on_success(config["on_success"])
    return Task(
        fn,
        name=options.get("name"),
        queue=check_queue_name(options.get("queue", "default")),
        config=TaskConfig(**config),
        app=app,
    )


@overload
def task(fn: Callable[P, Awaitable[R]], /) -> Task[P, R]: ...


@overload
def task(
    *,
    name: str | None = None,
    queue: str = "default",
    max_retries: int | None = None,
    retry_backoff: float | None = None,
    retry_backoff_max: float | None = None,
    retry_jitter: bool | None = None,
    retry_on: tuple[type[BaseException], ...] | None = None,
    dont_retry_on: tuple[type[BaseException], ...] | None = None,
    timeout: float | None = None,
    lease: float | None = None,
    on_success: OnSuccess | None = None,
    transactional: bool = False,
) -> Callable[[Callable[P, Awaitable[R]]], Task[P, R]]: ...


def task(
    fn: Callable[P, Awaitable[R]] | None = None, /, **options: Any
) -> Task[P, R] | Callable[[Callable[P, Awaitable[R]]], Task[P, R]]:
    """A shared task (Celery's ``shared_task``), for reusable modules: every `App` runs it,
    and it defers through the default app. Options as for `App.task`."""

    def register(f: Callable[P, Awaitable[R]]) -> Task[P, R]:
        t = make_task(f, None, options)
        existing = shared_tasks.get(t.name)
        if existing is not None and existing.fn is not t.fn:
            raise ConfigurationError(f"two shared tasks are named {t.name!r}")
        shared_tasks[t.name] = t
        return t

    return register(fn) if fn is not None else register


def default_app(*, for_task: str) -> App:
    """The app shared tasks defer through: the one marked default, else the only one."""
    if _default_app is not None:
        app = _default_app()
        if app is not None:
            return app
    apps = list(_apps)
    if len(apps) == 1:
        return apps[0]
    raise ConfigurationError(
        f"shared task {for_task!r} needs an app to defer through, and there are "
        f"{len(apps)}: create one App, or mark one with App(default=True) or app.set_default()"
    )
