"""Plain ``def`` tasks: each run in a thread of the worker's own pool, never on its loop.

A thread cannot be interrupted, so a run's cancellation (its timeout, a request, the
worker's stop, a lost lease) cannot end it. The run is told instead, through its context
(``current_job().cancel_requested`` and ``cancel_reason``, set by `Job.cancel` before the
asyncio side is cancelled), and the job *waits for its thread*: while the thread runs the
job's outcome is not decided, so the lease keeper goes on extending its lease (unless the
lease was lost: then there is nothing left to keep), and no ack, retry, release or claim by
another worker can happen while the thread still runs. When the thread returns, a run that
was cancelled meanwhile raises `CancelledError` at the job boundary whatever the thread
returned, and the reason decides as for an ``async def`` task: a timeout is a failed
attempt, a request records the job as cancelled, a stop hands the message back, a lost
lease writes nothing.

The worker's stop waits for threads too, up to its grace; one that still runs after that
is left behind without any write (see `Worker`): its lease lapses, and the CLI ends the
process, and with it the thread.

The pool holds at most ``limit`` threads, started as needed and kept for reuse. A run waits
(claimed, its lease kept) for a free thread; its timeout counts from its start, waiting
included. Each run gets a copy of the context it was started in, so ``current_job()`` (and
any context variable an execute hook set) works inside the thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .job import Job

logger = logging.getLogger("pgtasks")


class Threads:
    """The threads a worker runs plain ``def`` tasks in."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pool: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running: dict[Job, asyncio.Future[Any]] = {}

    def running(self, job: Job) -> bool:
        """Whether ``job``'s thread is running now."""
        return job in self._running

    @property
    def busy(self) -> int:
        """Threads running a job now."""
        return len(self._running)

    async def run(
        self, job: Job, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` in a thread and return what it returns (or raise what
        it raises); if the run was cancelled meanwhile, wait for the thread all the same and
        then raise `CancelledError`."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
            self._pool = ThreadPoolExecutor(self.limit, thread_name_prefix="pgtasks-job")
        async with self._slots:  # a cancellation while waiting here: the run never began
            assert self._pool is not None
            call = functools.partial(contextvars.copy_context().run, _call, fn, args, kwargs)
            future = asyncio.get_running_loop().run_in_executor(self._pool, call)
            self._running[job] = future
            cancelled = False
            try:
                while not future.done():
                    try:
                        await asyncio.wait((future,))
                    except asyncio.CancelledError:
                        cancelled = True  # the thread runs on; so does its lease
            finally:
                del self._running[job]
        if cancelled:
            if not future.cancelled():
                future.exception()  # retrieved: the cancellation's reason decides
            raise asyncio.CancelledError
        return future.result()

    def leave(self, job: Job, grace: float) -> bool:
        """At a stop, past its grace: leave ``job`` behind if its thread still runs (and say
        so). A thread cannot be stopped, and its message must not run elsewhere while it
        runs, so nothing is written for it: its lease lapses (the CLI ends the process, and
        the thread with it). False if ``job`` has no thread running."""
        if job not in self._running:
            return False
        logger.error(
            "%s still runs in its thread %.0fs after it was told to stop "
            "(current_job().cancel_requested); nothing is written for it, and its lease "
            "lapses within %.0fs, after which another worker may run it again",
            job,
            grace,
            job.lease,
        )
        job.finish()  # whatever the thread does later writes nothing
        return True

    def shutdown(self) -> None:
        """Let the pool's threads end once idle; a thread still running a job is not waited
        for (nothing can end it)."""
        pool, self._pool, self._slots = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=False)


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``fn(*args, **kwargs)`` in the thread, with what asyncio cannot carry back made an
    error: a `StopIteration` (no asyncio future takes it, so the run would never end)
    becomes a `RuntimeError`, as in a coroutine; an awaitable returned (a ``def`` wrapping
    an ``async def`` that lost its marker) means the body never ran, a `TypeError`."""
    try:
        value = fn(*args, **kwargs)
    except StopIteration as exc:
        raise RuntimeError(f"the task raised StopIteration: {exc!r}") from exc
    if inspect.isawaitable(value):
        close = getattr(value, "close", None)
        if callable(close):
            close()  # never awaited, and never will be: no warning about it
        raise TypeError(
            f"{getattr(fn, '__qualname__', fn)!s} is a plain def that returned an awaitable "
            f"({type(value).__name__}), so the task's body never ran: declare the task "
            "`async def` (a decorator around an async def must be `async def` too)"
        )
    return value
