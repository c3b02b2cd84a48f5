"""Tasks: what ``@app.task`` returns, and the calls built from one.

A `Task[P, R]` wraps an ``async def``; a `SyncTask[P, R]` (a `Task` too) wraps a plain
``def``, which the worker runs in a thread. Calling either runs the function directly;
``defer`` (and its Celery alias ``delay``) enqueues a job with arguments checked against
the function's own signature, by the type checker (ParamSpec) and again at run time before
anything is sent (`binding`; the worker's `Task.bind_message` uses the same shapes on what
arrives); ``defer_sync`` does the same from code without an event loop. Options that cannot
share that call (PEP 612) go through ``task.options(...)``, which returns a `TaskCall` with
the same typed ``defer`` and ``s``. ``s(...)`` builds a `Signature` (a call not yet sent)
for ``app.defer_many``.

A task sends nothing itself: it defers through a `Producer` it is given at registration (the
`App` of ``@app.task``), or, for a shared task, the default producer the registry names.
"""

from __future__ import annotations

import datetime as dt
import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, Generic, Protocol, TypeVar, overload

from typing_extensions import ParamSpec

from .._shared import Connection
from ..queues import check_queue_name
from ..serialization import envelope
from .binding import Arguments, Bound
from .config import TaskConfig
from .handle import JobRef
from .retry import RetryPolicy
from .signature import CallOptions, Signature

if TYPE_CHECKING:
    from .canvas import Workflow, WorkflowRef

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")


class Producer(Protocol):
    """What a task defers through: anything that sends one `Signature` and returns its
    `JobRef`. An `App` is one; a task is given its producer when it is registered."""

    async def defer(self, signature: Signature, /) -> JobRef[Any]:
        """Send ``signature`` as one job."""
        ...

    async def defer_workflow(
        self, workflow: Workflow, /, *, connection: Connection | None = None
    ) -> WorkflowRef:
        """Send a workflow (see `pgtasks.chain`)."""
        ...


class SyncProducer(Protocol):
    """A producer that can also send from code without an event loop (an `App`)."""

    def defer_sync(self, signature: Signature, /) -> JobRef[Any]:
        """Send ``signature`` as one job, blocking until it is sent."""
        ...


class _Deferrer(Generic[P, R]):
    """What `Task` and `TaskCall` share: typed ``defer``/``delay``/``s`` under options."""

    _task: Task[P, R]
    _options: CallOptions

    def s(self, *args: P.args, **kwargs: P.kwargs) -> Signature:
        """A signature of this call, for ``app.defer_many`` or a workflow (`pgtasks.chain`,
        `pgtasks.group`, `pgtasks.chord`); arguments are checked now. A workflow step that
        receives the result of the step before is `partial`."""
        task = self._task
        bound_args, bound_kwargs = task._bind(args, kwargs)
        return Signature(task, bound_args, bound_kwargs, self._options)

    def partial(
        self: _Deferrer[Concatenate[Any, P2], R], *args: P2.args, **kwargs: P2.kwargs
    ) -> Signature:
        """A signature of a workflow step that receives the result of the step before it (a
        chord's callback: the list of the members' results) as its first positional
        argument: give every argument but that one, type-checked as such (where Celery
        writes ``add.s(10)``, write ``add.partial(10)``)."""
        task = self._task
        given = task._arguments.bind_receiving(args, kwargs)
        return Signature(
            task, *given, self._options, receives=f"task {task.name!r} is one argument short"
        )

    def si(self, *args: P.args, **kwargs: P.kwargs) -> Signature:
        """An immutable signature: in a chain, it does not receive the result of the step
        before (Celery's ``si``)."""
        task = self._task
        bound_args, bound_kwargs = task._bind(args, kwargs)
        return Signature(task, bound_args, bound_kwargs, self._options, immutable=True)

    async def defer(self, *args: P.args, **kwargs: P.kwargs) -> JobRef[R]:
        """Enqueue one job. Returns once the message is in the queue (or, with
        ``options(connection=...)``, once it is part of the caller's transaction); the
        ref's ``result()`` is typed as this task's return value."""
        ref: JobRef[R] = await self._task.app.defer(self.s(*args, **kwargs))
        return ref

    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> JobRef[R]:
        """Celery's name for `defer`."""
        return await self.defer(*args, **kwargs)

    def defer_sync(self, *args: P.args, **kwargs: P.kwargs) -> JobRef[R]:
        """`defer` for code without an event loop (a Django or Flask view, a script, a
        plain ``def`` task): blocks until the job is sent, and is safe to call from many
        threads at once. With ``options(cursor=...)`` it runs on that DB-API cursor, in its
        transaction, and needs no event loop at all; otherwise it runs on the app's
        background event loop (see `App.defer_sync`), and raises `RuntimeError` when called
        on a running event loop, which it would block: ``await defer(...)`` there."""
        producer = self._task.app
        if not hasattr(producer, "defer_sync"):
            raise TypeError(
                f"task {self._task.name!r} defers through {producer!r}, which cannot send "
                "from synchronous code (it has no defer_sync); register it with a pgtasks.App"
            )
        sync: SyncProducer = producer  # type: ignore[assignment]
        ref: JobRef[R] = sync.defer_sync(self.s(*args, **kwargs))
        return ref

    def options(
        self,
        *,
        queue: str | None = None,
        delay: float | dt.timedelta | None = None,
        eta: dt.datetime | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        connection: Connection | None = None,
        expires: float | dt.timedelta | dt.datetime | None = None,
        cursor: Any = None,
    ) -> TaskCall[P, R]:
        """Options for the next ``defer``, ``defer_sync`` or ``s``.

        Args:
            queue: send to this queue instead of the task's own.
            delay: seconds (or a ``timedelta``) before the job becomes visible, counted on
                the database clock.
            eta: a timezone-aware ``datetime`` at which the job becomes visible.
            idempotency_key: while a job holding this key waits, runs, or has succeeded
                (within the app's ``key_retention``), deferring the same key sends nothing
                and returns that job's ref with ``deduplicated=True``.
            headers: extra pgmq headers (JSON-serializable), readable by the job as
                ``current_job().headers``.
            connection: an asyncpg connection; the job is enqueued in its current
                transaction and exists only if that transaction commits.
            expires: a job not started by then is not run: it ends as ``expired``
                (neither retried nor dead-lettered). Seconds (or a ``timedelta``) after the
                enqueue, counted on the database's clock, or a timezone-aware ``datetime``.
                Applies to every attempt: a retry due after it does not run either.
            cursor: a DB-API cursor (psycopg 2 or 3, Django's ``connection.cursor()``) or a
                SQLAlchemy ``Connection``, for ``defer_sync``: the job is enqueued in its
                current transaction, with ``pgtasks.send``, and exists only if that
                transaction commits.
        """
        merged = self._options.merge(
            queue=queue,
            delay=delay,
            eta=eta,
            idempotency_key=idempotency_key,
            headers=headers,
            connection=connection,
            expires=expires,
            cursor=cursor,
        )
        return TaskCall(self._task, merged)


class TaskCall(_Deferrer[P, R]):
    """A task with call options applied; see `Task.options`."""

    def __init__(self, task: Task[P, R], options: CallOptions) -> None:
        self._task = task
        self._options = options

    def __repr__(self) -> str:
        return f"<TaskCall {self._task.name} {self._options}>"


class Task(_Deferrer[P, R]):
    """A registered task. Calling it runs the function directly.

    ``app`` is what it defers through: the `App` of ``@app.task`` (any `Producer` will
    do); without one (a shared task) it defers through the default app.
    """

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]],
        *,
        name: str | None = None,
        queue: str = "default",
        config: TaskConfig = TaskConfig(),
        app: Producer | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"@task needs a function, and {fn!r} is not callable")
        qualname: str | None = getattr(fn, "__qualname__", None)
        if name is None and qualname is None:  # a functools.partial, a callable object
            raise TypeError(
                f"@task cannot name {fn!r}, which has no __qualname__ (a partial or a "
                "callable object): give it one with name=..."
            )
        label = qualname or repr(fn)
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            raise TypeError(
                f"@task needs a function that returns its result, and {label} is a "
                "generator: return a list instead of yielding"
            )
        self.is_async = inspect.iscoroutinefunction(fn)
        """``async def`` (run on the worker's loop), or a plain ``def`` (run in a thread)."""
        if not self.is_async and config.transactional:
            raise TypeError(
                f"transactional=True needs an async def task, and {label} is a plain "
                "def: the transaction's connection is an asyncpg connection of the worker's "
                "event loop, which a thread cannot use; write the task as `async def`"
            )
        self.fn: Callable[P, Any] = fn
        self.name = name or f"{fn.__module__}.{qualname}"
        self.queue = check_queue_name(queue)
        self.config = config
        self._app = app
        self._arguments = Arguments(self.name, fn)
        # the check of every call (`s`, `defer`), bound once: no extra call on the hot path
        self._bind: Callable[[tuple[Any, ...], dict[str, Any]], Bound] = self._arguments.bind
        self._task = self
        self._options = CallOptions()
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        return self.fn(*args, **kwargs)  # type: ignore[no-any-return]

    @property
    def returns(self) -> Any:
        """The function's return annotation, resolved: None for ``-> None``, `typing.Any`
        when it has none (or one that cannot be resolved)."""
        try:
            return self._returns
        except AttributeError:
            pass
        try:
            hint = typing.get_type_hints(self.fn).get("return", Any)
        except Exception:  # a forward reference to a missing name: unknown
            hint = Any
        self._returns: Any = None if hint is type(None) else hint
        return self._returns

    @property
    def app(self) -> Producer:
        """The app this task defers through (for a shared task, the default app): the
        `Producer` it was registered with."""
        if self._app is not None:
            return self._app
        from .registry import default_producer

        return default_producer(for_task=self.name)

    async def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        queue: str | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        connection: Connection | None = None,
        expires: float | dt.timedelta | dt.datetime | None = None,
    ) -> JobRef[R]:
        """Celery's ``apply_async``: arguments as a tuple and a dict (checked at run time
        only; prefer ``options(...).defer(...)`` for typed calls)."""
        call = self.options(
            queue=queue,
            delay=countdown,
            eta=eta,
            idempotency_key=idempotency_key,
            headers=headers,
            connection=connection,
            expires=expires,
        )
        bound_args, bound_kwargs = self._bind(tuple(args), dict(kwargs or {}))
        ref: JobRef[R] = await self.app.defer(
            Signature(self, bound_args, bound_kwargs, call._options)
        )
        return ref

    def retry_policy(self, defaults: TaskConfig) -> RetryPolicy:
        """This task's retry policy, with the app's defaults filled in."""
        return RetryPolicy.from_config(self.config, defaults)

    def bind_message(self, env: envelope.Envelope) -> Bound:
        """The positional and named arguments to call the function with, from a decoded
        message: bound to the signature, checked against the hints, and converted to the
        hinted types. Where a parameter needs a number exactly (``int``, ``Decimal``) and
        orjson read it as a double, the body is read again exactly. Raises `TypeError` or
        `ValueError` naming the argument and what is wrong with it."""
        return self._arguments.bind_message(env)


class SyncTask(Task[P, R]):
    """A task whose function is a plain ``def``: the worker runs it in a thread of its own
    pool (``app.worker(threads=...)``), never on its event loop. Calling it runs the
    function directly and returns its result; ``defer`` and ``defer_sync`` are typed as
    for an async task. See the "Plain def tasks" page of the docs for what a thread
    cannot do (be interrupted) and how a run is told to stop (``cancel_requested``)."""

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        queue: str = "default",
        config: TaskConfig = TaskConfig(),
        app: Producer | None = None,
    ) -> None:
        super().__init__(fn, name=name, queue=queue, config=config, app=app)  # type: ignore[arg-type]

    if TYPE_CHECKING:

        def __call__(  # type: ignore[override]
            self, *args: P.args, **kwargs: P.kwargs
        ) -> R: ...

    def __repr__(self) -> str:
        return f"<SyncTask {self.name} queue={self.queue}>"


class TaskDecorator(Protocol):
    """What ``@app.task(...)`` with options returns: a decorator that makes a `Task` of an
    ``async def`` and a `SyncTask` of a plain ``def``."""

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]], /) -> Task[P, R]: ...  # type: ignore[overload-overlap]  # a coroutine function is this

    @overload
    def __call__(self, fn: Callable[P, R], /) -> SyncTask[P, R]: ...
