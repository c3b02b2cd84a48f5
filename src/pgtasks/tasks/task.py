"""Tasks: what ``@app.task`` returns, and the calls built from one.

A `Task[P, R]` wraps an ``async def``. Calling it runs the function directly; ``defer`` (and
its Celery alias ``delay``) enqueues a job with arguments checked against the function's own
signature, by the type checker (ParamSpec) and again at run time before anything is sent: the
binding, then each value against its type hint (`shapes.Shape`, compiled once per task; the
worker's `Task.bind_message` uses the same shapes on what arrives). Options that cannot share
that call (PEP 612) go through ``task.options(...)``, which returns a `TaskCall` with the same
typed ``defer`` and ``s``.
``s(...)`` builds a `Signature` (a call not yet sent) for ``app.defer_many``.
"""

from __future__ import annotations

import datetime as dt
import inspect
import math
import numbers
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from typing_extensions import ParamSpec

from .._shared import MAX_DELAY, Connection, OnSuccess
from ..exceptions import SerializationError
from ..queues import check_queue_name
from ..serialization import envelope, hints
from ..serialization.envelope import RESERVED_HEADER_PREFIX
from ..serialization.shapes import Check, Converter, Misfit, NeedsExact, describe
from .retry import RetryPolicy

if TYPE_CHECKING:
    from ..app import App

P = ParamSpec("P")
R = TypeVar("R")


class JobRef(NamedTuple):
    """A job that was deferred: its pgmq message id and queue.

    ``deduplicated`` is true when the idempotency key was already held, so nothing was sent
    and ``id`` is the message of the job that holds the key. Immutable and hashable (a named
    tuple: ``defer_many`` makes one per job, and a tuple is the cheapest such object).
    """

    id: int
    queue: str
    task: str
    deduplicated: bool = False


@dataclass(frozen=True)
class CallOptions:
    """Per-call options; see `Task.options`."""

    queue: str | None = None
    delay: float = 0.0
    eta: dt.datetime | None = None
    idempotency_key: str | None = None
    headers: Mapping[str, Any] | None = None
    connection: Connection | None = None

    def merge(
        self,
        *,
        queue: str | None = None,
        delay: float | dt.timedelta | None = None,
        eta: dt.datetime | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        connection: Connection | None = None,
    ) -> CallOptions:
        changes: dict[str, Any] = {}
        if queue is not None:
            changes["queue"] = check_queue_name(queue)
        if delay is not None:
            changes["delay"] = _delay_seconds(delay)
        if eta is not None:
            changes["eta"] = _checked_eta(eta)
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not idempotency_key:
                raise ValueError("idempotency_key must be a non-empty string")
            changes["idempotency_key"] = idempotency_key
        if headers is not None:
            changes["headers"] = _checked_headers(headers)
        if connection is not None:
            changes["connection"] = connection
        merged = replace(self, **changes)
        if merged.eta is not None and merged.delay:  # in either order, over chained options()
            raise ValueError("pass either delay (or countdown) or eta, not both")
        return merged


def _delay_seconds(delay: float | dt.timedelta) -> float:
    if isinstance(delay, dt.timedelta):
        seconds = delay.total_seconds()
    elif isinstance(delay, numbers.Real) and not isinstance(delay, bool):
        try:
            seconds = float(delay)
        except OverflowError:  # an int beyond a float's range
            seconds = math.inf
    else:
        raise TypeError(f"delay must be a number of seconds or a timedelta (got {describe(delay)})")
    if math.isnan(seconds):
        raise ValueError("delay must be a number of seconds (got nan)")
    if seconds < 0:
        raise ValueError(f"delay must not be negative (got {seconds} seconds)")
    if seconds > MAX_DELAY.total_seconds():
        raise ValueError(
            f"delay must be at most {MAX_DELAY.days:,} days (ten years), got {seconds:g} seconds"
        )
    return seconds


def _checked_eta(eta: dt.datetime) -> dt.datetime:
    if not isinstance(eta, dt.datetime) or eta.utcoffset() is None:
        raise ValueError(
            f"eta must be a timezone-aware datetime (got {eta!r}); "
            "use e.g. datetime.now(timezone.utc) + timedelta(minutes=5)"
        )
    try:
        eta.astimezone(dt.timezone.utc)  # year 1 or 9999 at an offset: beyond datetime in UTC
    except OverflowError:
        raise ValueError(f"eta {eta.isoformat()} is out of range in UTC") from None
    if eta - dt.datetime.now(dt.timezone.utc) > MAX_DELAY:
        raise ValueError(
            f"eta must be at most {MAX_DELAY.days:,} days (ten years) ahead, got {eta.isoformat()}"
        )
    return eta


def _checked_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(headers, Mapping):
        raise TypeError(
            "headers must be a mapping of names (strings) to JSON values, like "
            f"{{'trace_id': 'abc'}} (got {describe(headers)})"
        )
    checked = dict(headers)
    for name in checked:
        if not isinstance(name, str):
            raise TypeError(f"header names must be strings (got {describe(name)})")
        if name == envelope.HEADER_IDEMPOTENCY_KEY:
            raise ValueError(
                "pass an idempotency key as options(idempotency_key=...), not as a header: "
                "only then is it claimed, so that it deduplicates on every path"
            )
        if name.lower().startswith(RESERVED_HEADER_PREFIX):
            raise ValueError(
                f"header {name!r}: names starting with {RESERVED_HEADER_PREFIX!r} are reserved "
                "for pgtasks' own metadata; choose another name"
            )
    return checked


@dataclass(slots=True)
class Signature:
    """One call of a task, not yet sent: arguments bound and options fixed. Treat it as
    immutable (it is not frozen only because ``defer_many`` builds one per job, and a frozen
    dataclass costs four times as much to create)."""

    task: Task[Any, Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: CallOptions = field(default_factory=CallOptions)

    @property
    def queue(self) -> str:
        return self.options.queue or self.task.queue

    def body(self, max_size: int) -> str:
        return envelope.encode(self.task.name, self.args, self.kwargs, max_size=max_size)

    def headers(self) -> str | None:
        options = self.options
        if options.headers is None and options.idempotency_key is None:
            return None
        headers = dict(options.headers or {})
        if options.idempotency_key is not None:
            headers[envelope.HEADER_IDEMPOTENCY_KEY] = options.idempotency_key
        if not headers:
            return None
        try:
            return envelope.dumps(headers).decode()
        except TypeError as exc:
            raise SerializationError(
                f"cannot encode the headers of a {self.task.name!r} job: {exc}"
            ) from None


class _Deferrer(Generic[P, R]):
    """What `Task` and `TaskCall` share: typed ``defer``/``delay``/``s`` under options."""

    _task: Task[P, R]
    _options: CallOptions

    def s(self, *args: P.args, **kwargs: P.kwargs) -> Signature:
        """A signature of this call for ``app.defer_many``; arguments are checked now."""
        task = self._task
        bound_args, bound_kwargs = task._bind(args, kwargs)
        return Signature(task, bound_args, bound_kwargs, self._options)

    async def defer(self, *args: P.args, **kwargs: P.kwargs) -> JobRef:
        """Enqueue one job. Returns once the message is in the queue (or, with
        ``options(connection=...)``, once it is part of the caller's transaction)."""
        return await self._task.app._defer_one(self.s(*args, **kwargs))

    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> JobRef:
        """Celery's name for `defer`."""
        return await self.defer(*args, **kwargs)

    def options(
        self,
        *,
        queue: str | None = None,
        delay: float | dt.timedelta | None = None,
        eta: dt.datetime | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        connection: Connection | None = None,
    ) -> TaskCall[P, R]:
        """Options for the next ``defer`` or ``s``.

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
        """
        merged = self._options.merge(
            queue=queue,
            delay=delay,
            eta=eta,
            idempotency_key=idempotency_key,
            headers=headers,
            connection=connection,
        )
        return TaskCall(self._task, merged)


class TaskCall(_Deferrer[P, R]):
    """A task with call options applied; see `Task.options`."""

    def __init__(self, task: Task[P, R], options: CallOptions) -> None:
        self._task = task
        self._options = options

    def __repr__(self) -> str:
        return f"<TaskCall {self._task.name} {self._options}>"


@dataclass(frozen=True)
class TaskConfig:
    """Per-task settings; ``None`` means the app's default."""

    max_retries: int | None = None
    retry_backoff: float | None = None
    retry_backoff_max: float | None = None
    retry_jitter: bool | None = None
    retry_on: tuple[type[BaseException], ...] | None = None
    dont_retry_on: tuple[type[BaseException], ...] | None = None
    timeout: float | None = None
    lease: float | None = None
    on_success: OnSuccess | None = None
    transactional: bool = False


@dataclass(frozen=True)
class _PlainParams:
    """A signature of plain parameters only (positional-or-keyword, then keyword-only), for
    `Task._bind`'s fast path."""

    names: tuple[str, ...]
    positional: int
    accepted: frozenset[str]
    required: frozenset[str]

    @classmethod
    def of(cls, sig: inspect.Signature) -> _PlainParams | None:
        params = list(sig.parameters.values())
        plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        if any(p.kind not in plain for p in params):
            return None
        return cls(
            names=tuple(p.name for p in params),
            positional=sum(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params),
            accepted=frozenset(p.name for p in params),
            required=frozenset(p.name for p in params if p.default is inspect.Parameter.empty),
        )

    def fits_named(self, kwargs: dict[str, Any]) -> bool:
        """Whether these arguments, all passed by name, bind: none unknown, none missing."""
        return kwargs.keys() <= self.accepted and self.required.issubset(kwargs)


class Task(_Deferrer[P, R]):
    """A registered task. Calling it runs the function directly."""

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]],
        *,
        name: str | None = None,
        queue: str = "default",
        config: TaskConfig = TaskConfig(),
        app: App | None = None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"@task needs an async function, and {fn.__qualname__} is not one: write "
                "`async def`, and run blocking code with `await anyio.to_thread.run_sync(...)`"
            )
        self.fn = fn
        self.name = name or f"{fn.__module__}.{fn.__qualname__}"
        self.queue = check_queue_name(queue)
        self.config = config
        self._app = app
        self._signature = inspect.signature(fn)
        self._plain_params = _PlainParams.of(self._signature)
        self._shapes: _Shapes | None = None
        self._task = self
        self._options = CallOptions()
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        return self.fn(*args, **kwargs)

    @property
    def app(self) -> App:
        """The app this task defers through (for a shared task, the default app)."""
        if self._app is not None:
            return self._app
        from .registry import default_app

        return default_app(for_task=self.name)

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
    ) -> JobRef:
        """Celery's ``apply_async``: arguments as a tuple and a dict (checked at run time
        only; prefer ``options(...).defer(...)`` for typed calls)."""
        call = self.options(
            queue=queue,
            delay=countdown,
            eta=eta,
            idempotency_key=idempotency_key,
            headers=headers,
            connection=connection,
        )
        bound_args, bound_kwargs = self._bind(tuple(args), dict(kwargs or {}))
        return await self.app._defer_one(Signature(self, bound_args, bound_kwargs, call._options))

    def retry_policy(self, defaults: TaskConfig) -> RetryPolicy:
        """This task's retry policy, with the app's defaults filled in."""
        return RetryPolicy.from_config(self.config, defaults)

    # --- arguments ------------------------------------------------------------------------

    def _bind(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Check a call against the signature; keep by name every argument that can be
        passed by name, so messages are self-describing."""
        plain = self._plain_params
        if plain is not None:
            # The common signature (no positional-only, no *args/**kwargs): the same check as
            # Signature.bind at a fraction of the cost. Anything else (a missing, unknown or
            # doubled argument) falls through to bind() and its error message.
            if not args:
                if plain.fits_named(kwargs):
                    self._check(kwargs)
                    return (), kwargs
            elif len(args) <= plain.positional:
                given = dict(zip(plain.names, args, strict=False))
                if given.keys().isdisjoint(kwargs) and kwargs.keys() <= plain.accepted:
                    given.update(kwargs)
                    if plain.required <= given.keys():
                        self._check(given)
                        return (), given
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"task {self.name!r}: {exc}") from None
        self._check(bound.arguments)
        if any(
            self._signature.parameters[n].kind is inspect.Parameter.VAR_POSITIONAL and v
            for n, v in bound.arguments.items()
        ):  # with extra positionals, the parameters before them must stay positional
            return bound.args, bound.kwargs
        positional: list[Any] = []
        named: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.POSITIONAL_ONLY:
                positional.append(value)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = value
        return tuple(positional), named

    def _check(self, arguments: Mapping[str, Any]) -> None:
        """Raise `TypeError` naming the task, the argument, the type its hint expects and the
        type it was given, for the first argument whose hint does not accept it."""
        shapes = self._shapes or self._compile()
        natives, checks = shapes.natives, shapes.checks
        for name, value in arguments.items():
            if natives.get(name) is type(value):
                continue  # an int for an int: the usual case, at the cost of a lookup
            check = checks.get(name)
            if check is not None:
                try:
                    check(value)
                except Misfit as exc:
                    what = f"task {self.name!r}: argument {name!r}"
                    raise TypeError(exc.explain(what)) from None

    def _compile(self) -> _Shapes:
        # on first use, not at decoration: a hint may name a class defined after the task
        self._shapes = _Shapes.of(self.fn)
        return self._shapes

    def bind_message(self, env: envelope.Envelope) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The positional and named arguments to call the function with, from a decoded
        message: bound to the signature, checked against the hints, and converted to the
        hinted types. Where a parameter needs a number exactly (``int``, ``Decimal``) and
        orjson read it as a double, the body is read again exactly. Raises `TypeError` or
        `ValueError` naming the argument and what is wrong with it."""
        shapes = self._shapes or self._compile()
        try:
            return self._load(env.args, env.kwargs, shapes, env.exact)
        except NeedsExact:
            exact = env.exactly()
            return self._load(exact.args, exact.kwargs, shapes, True)

    def _load(
        self, args: list[Any], kwargs: dict[str, Any], shapes: _Shapes, exact: bool
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        plain = self._plain_params
        if not args and plain is not None and plain.fits_named(kwargs):
            # what producers send for ordinary parameters: no bind() needed (see _bind)
            shapes.convert(kwargs, exact)
            return (), kwargs
        bound = self._signature.bind(*args, **kwargs)
        shapes.convert(bound.arguments, exact)
        return bound.args, bound.kwargs


@dataclass(frozen=True)
class _Shapes:
    """What a task's parameters accept (see `shapes.Shape`), by name: the producer's
    checks, and the worker's loaders for bodies read by orjson and read exactly."""

    natives: dict[str, type]  # see shapes.Shape.native
    checks: dict[str, Check]
    loads: dict[str, Converter]
    exact_loads: dict[str, Converter]

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> _Shapes:
        shapes = hints.signature_shapes(fn)
        return cls(
            {name: s.native for name, s in shapes.items() if s.native is not None},
            {name: s.check for name, s in shapes.items() if s.check is not None},
            {name: s.load for name, s in shapes.items() if s.load is not None},
            {name: s.load_exact for name, s in shapes.items() if s.load_exact is not None},
        )

    def convert(self, arguments: dict[str, Any], exact: bool) -> None:
        """Load the arguments of a message (read ``exact``-ly or not) in place; errors name
        the argument."""
        natives, loads = self.natives, self.exact_loads if exact else self.loads
        name = ""
        try:
            for name, value in arguments.items():
                if natives.get(name) is not type(value) and (load := loads.get(name)):
                    arguments[name] = load(value)  # a new value, no new key: safe in the loop
        except Misfit as exc:
            raise TypeError(exc.explain(f"argument {name!r}")) from None
        except TypeError as exc:
            raise TypeError(f"argument {name!r}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"argument {name!r}: {exc}") from None
