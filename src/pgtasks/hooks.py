"""Hooks around enqueueing and around running a job: the seam that tracing, metrics and,
later, rate limits plug into.

A hook is middleware, as in ASGI or httpx: an ``async def`` that receives the call and
``next``, and decides what happens around it::

    @app.hooks.around_enqueue
    async def tag(call: pgtasks.EnqueueCall, next: pgtasks.EnqueueNext) -> list[JobRef[Any]]:
        return await next(call.with_headers({"request_id": request_id.get()}))

    @app.hooks.around_execute
    async def timed(job: pgtasks.JobContext, next: pgtasks.ExecuteNext) -> object:
        started = time.monotonic()
        try:
            return await next(job)
        finally:
            metrics.observe(job.task, time.monotonic() - started)

Hooks compose in the order they were registered: the first is the outermost, and sees the
call first and the result (or the exception) last. Each may observe the call, its result
and its exception; modify what goes on (pass another call or job to ``next``); or wrap it
(a span, a timer, a lock). Call ``next`` once: not at all skips what follows (for an
enqueue, nothing is sent; for a run, the task's function does not run and the job counts as
succeeded).

**Around an enqueue**, a hook sees one `EnqueueCall` per ``defer`` (one signature) and per
``defer_many`` (all of its signatures, in order), and returns what ``next`` returned: one
`JobRef[Any]` per signature. It runs before anything is sent, so a hook that raises fails the
defer and nothing is sent.

**Around a run**, a hook sees the job's `JobContext` and runs inside the job boundary, under
the job's time limit and, for a transactional task, inside its transaction (``job.connection``
is set): ``next(job)`` runs the task's function with ``current_job()`` returning the job it
was given, and returns the function's result. An exception from a hook, or one it lets
through, is the job's: a failed attempt, retried or dead-lettered by the task's policy.

With no hook registered, neither path does anything it did not do before (one check of an
empty list).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ._shared import Connection
from .context import JobContext, _current
from .tasks import JobRef, Signature

C = TypeVar("C")
R = TypeVar("R")


@dataclass(frozen=True)
class EnqueueCall:
    """What one ``defer`` or ``defer_many`` is about to send.

    Attributes:
        signatures: the jobs, in order: one for ``defer``, every one for ``defer_many``.
        connection: the caller's connection when the jobs are to be enqueued in the
            caller's transaction (``options(connection=...)``, ``defer_many(connection=...)``),
            else None (the app's pool).
    """

    signatures: tuple[Signature, ...]
    connection: Connection | None = None

    def with_headers(self, headers: Mapping[str, Any]) -> EnqueueCall:
        """The same call with these headers added to every job's own (replacing a header
        of the same name), checked as ``options(headers=...)`` checks them."""
        return EnqueueCall(tuple(s.with_headers(headers) for s in self.signatures), self.connection)


class EnqueueNext(Protocol):
    """What follows an enqueue hook: the next hook, or the send itself."""

    def __call__(self, call: EnqueueCall, /) -> Awaitable[list[JobRef[Any]]]: ...


class EnqueueHook(Protocol):
    """``async def hook(call: EnqueueCall, next: EnqueueNext) -> list[JobRef[Any]]``."""

    def __call__(self, call: EnqueueCall, next: EnqueueNext, /) -> Awaitable[list[JobRef[Any]]]: ...


class ExecuteNext(Protocol):
    """What follows an execute hook: the next hook, or the task's function."""

    def __call__(self, job: JobContext, /) -> Awaitable[object]: ...


class ExecuteHook(Protocol):
    """``async def hook(job: JobContext, next: ExecuteNext) -> object``."""

    def __call__(self, job: JobContext, next: ExecuteNext, /) -> Awaitable[object]: ...


EH = TypeVar("EH", bound=EnqueueHook)
XH = TypeVar("XH", bound=ExecuteHook)


class Hooks:
    """The hooks of an app (``app.hooks``); register with the methods, bare or as
    decorators. ``enqueue`` and ``execute`` hold them in order (remove one there). They are
    read at every defer and every run, so a hook registered later still applies."""

    def __init__(self) -> None:
        self.enqueue: list[EnqueueHook] = []
        self.execute: list[ExecuteHook] = []

    def around_enqueue(self, hook: EH) -> EH:
        """Run ``hook`` around every ``defer`` and ``defer_many`` of the app; returns it."""
        self.enqueue.append(hook)
        return hook

    def around_execute(self, hook: XH) -> XH:
        """Run ``hook`` around every job the app's workers run; returns it."""
        self.execute.append(hook)
        return hook


async def run_with_hooks(
    hooks: Sequence[ExecuteHook], job: JobContext, run: Callable[[], Awaitable[object]]
) -> object:
    """``run()`` (a task's function, bound to its arguments) inside the execute hooks, with
    ``current_job()`` returning the job a hook handed on (the worker's own, unless a hook
    passed another). The caller has set ``current_job()`` to ``job`` already."""

    async def last(handed: JobContext) -> object:
        if handed is job:
            return await run()
        token = _current.set(handed)
        try:
            return await run()
        finally:
            _current.reset(token)

    return await compose(hooks, last)(job)


def compose(
    hooks: Sequence[Callable[[C, Callable[[C], Awaitable[R]]], Awaitable[R]]],
    last: Callable[[C], Awaitable[R]],
) -> Callable[[C], Awaitable[R]]:
    """``hooks`` around ``last``, the first outermost: the function that runs them all."""
    call = last
    for hook in reversed(hooks):
        call = _step(hook, call)
    return call


def _step(
    hook: Callable[[C, Callable[[C], Awaitable[R]]], Awaitable[R]],
    inner: Callable[[C], Awaitable[R]],
) -> Callable[[C], Awaitable[R]]:
    async def step(value: C) -> R:
        return await hook(value, inner)

    return step
