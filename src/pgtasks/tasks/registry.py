"""The task registry: building tasks from decorator options, shared tasks, the default app.

Tasks made with ``@app.task`` belong to that app. Shared tasks (bare ``@pgtasks.task``, like
Celery's ``shared_task``) belong to every `App` in the process and defer through the default
app: the one marked ``App(default=True)`` or ``app.set_default()``, else the only live one.
This module holds the only process-wide state pgtasks has.

It knows apps only as `Producer`s (what a task defers through), and holds them weakly: an app
nobody keeps is not kept alive by being registered.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, overload

from typing_extensions import ParamSpec, Unpack

from ..exceptions import ConfigurationError
from .config import TaskOptions, task_options
from .task import Producer, SyncTask, Task, TaskDecorator

P = ParamSpec("P")
R = TypeVar("R")

shared_tasks: dict[str, Task[Any, Any]] = {}
_producers: weakref.WeakSet[Producer] = weakref.WeakSet()
_default: weakref.ReferenceType[Producer] | None = None


def register_producer(producer: Producer, *, default: bool) -> None:
    """A producer (an app) that shared tasks may defer through."""
    _producers.add(producer)
    if default:
        set_default(producer)


def set_default(producer: Producer) -> None:
    global _default
    _default = weakref.ref(producer)


def make_task(
    fn: Callable[P, Awaitable[R]] | Callable[P, R], app: Producer | None, options: Mapping[str, Any]
) -> Task[P, R]:
    """A task from its function and its decorator's options, checked (`TASK_OPTIONS`): a
    `Task` of an ``async def``, a `SyncTask` of a plain ``def``."""
    where = f"@task {getattr(fn, '__qualname__', fn)!s}"
    name, queue, config = task_options(options, where)
    kind: type[Task[Any, Any]] = Task if inspect.iscoroutinefunction(fn) else SyncTask
    task: Task[P, R] = kind(
        fn,  # type: ignore[arg-type]
        name=name,
        queue=queue,
        config=config,
        app=app,
    )
    return task


@overload
def task(fn: Callable[P, Awaitable[R]], /) -> Task[P, R]: ...  # type: ignore[overload-overlap]  # a coroutine function is this


@overload
def task(fn: Callable[P, R], /) -> SyncTask[P, R]: ...


@overload
def task(
    **options: Unpack[TaskOptions],
) -> TaskDecorator: ...


def task(fn: Callable[P, Any] | None = None, /, **options: Unpack[TaskOptions]) -> Any:
    """A shared task (Celery's ``shared_task``), for reusable modules: every `App` runs it,
    and it defers through the default app. Options as for `App.task` (`TaskOptions`)."""

    def register(f: Callable[P, Any]) -> Task[P, Any]:
        t = make_task(f, None, options)
        existing = shared_tasks.get(t.name)
        if existing is not None and existing.fn is not t.fn:
            raise ConfigurationError(f"two shared tasks are named {t.name!r}")
        shared_tasks[t.name] = t
        return t

    return register(fn) if fn is not None else register


def default_producer(*, for_task: str) -> Producer:
    """The app shared tasks defer through: the one marked default, else the only one."""
    if _default is not None:
        producer = _default()
        if producer is not None:
            return producer
    producers = list(_producers)
    if len(producers) == 1:
        return producers[0]
    raise ConfigurationError(
        f"shared task {for_task!r} needs an app to defer through, and there are "
        f"{len(producers)}: create one App, or mark one with App(default=True) or "
        "app.set_default()"
    )
