"""Enqueueing from code without an event loop: ``task.defer_sync(...)``, ``app.defer_many_sync``.

Two paths:

* **On the caller's cursor** (``options(cursor=cur)``, ``defer_many_sync(cursor=cur)``): the
  SQL functions run on that DB-API cursor (or SQLAlchemy connection) in the calling thread,
  in the caller's transaction (`db.dbapi`): no event loop, no connection of pgtasks' own.
* **Otherwise**, the app's usual asynchronous enqueue runs on a background event loop: one
  daemon thread per app, started on first use, with a pool of its own (a `Database`
  sibling: a pool belongs to one loop). Callers from any number of threads hand it their
  call and wait for the answer; their context variables go with the call (an enqueue hook
  sees them). It stops at interpreter exit, or at ``app.close_sync()``; a forked child
  starts its own. A call is handed over under the lock `close` takes the loop away under,
  so it runs on the loop being closed, before that loop's pool closes, or on the next
  one; whatever is still pending when a loop stops is cancelled, and its caller gets
  `RuntimeError`, never a wait without end.

Enqueue hooks run on both paths. On the cursor path they run on the background loop, and
the send itself comes back to the calling thread, which alone may use its cursor (Django
refuses a connection used from another thread).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import queue
import threading
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from ..db.database import Database
from ..db.dbapi import cursor_send, cursor_send_batch
from ..hooks import EnqueueCall, EnqueueHook, Hooks, compose
from ..serialization import envelope
from ..tasks import JobRef, Jobs, Signature
from .enqueue import BATCH_CHUNK, Enqueuer, warn_other_arguments

T = TypeVar("T")
logger = logging.getLogger("pgtasks")

_clients: weakref.WeakSet[SyncClient] = weakref.WeakSet()


class SyncClient:
    """An app's blocking producer (see the module's docstring)."""

    def __init__(
        self,
        database: Callable[[], Database],
        *,
        max_message_size: int,
        create_queues: bool,
        hooks: Hooks,
        jobs: Jobs | None,
    ) -> None:
        self._new_database = database
        self._max_message_size = max_message_size
        self._create_queues = create_queues
        self._hooks: list[EnqueueHook] = hooks.enqueue
        self._hooks_object = hooks
        self._jobs = jobs
        self._lock = threading.Lock()  # held while a call is handed to the loop, and by close
        self._background: _Background | None = None
        _clients.add(self)

    # --- the two ways of sending -----------------------------------------------------------

    def defer(self, sig: Signature) -> JobRef[Any]:
        _check_items((sig,), sig.options.cursor)
        cursor = sig.options.cursor
        if cursor is not None:
            if self._hooks:
                (ref,) = self._hooked_on_cursor(EnqueueCall((sig,)), cursor)
                return ref
            return self._send_one_on_cursor(sig, cursor)
        _refuse_on_a_running_loop("defer_sync()")
        return self._call(lambda enqueuer: enqueuer.defer_one(sig))

    def defer_many(self, signatures: Iterable[Signature], cursor: Any) -> list[JobRef[Any]]:
        sigs = tuple(signatures)
        _check_items(sigs, cursor)
        if cursor is not None:
            if self._hooks:
                return self._hooked_on_cursor(EnqueueCall(sigs), cursor)
            return self._send_many_on_cursor(sigs, cursor)
        _refuse_on_a_running_loop("defer_many_sync()")
        return self._call(lambda enqueuer: enqueuer.defer_many(sigs, None))

    # --- on the caller's cursor ------------------------------------------------------------

    def _send_one_on_cursor(self, sig: Signature, cursor: Any) -> JobRef[Any]:
        opts = sig.options
        msg_id, dedup, queue_name, differ = cursor_send(
            cursor,
            sig.queue,
            sig.body(self._max_message_size),
            sig.headers(),
            opts.delay,
            opts.eta,
            self._create_queues,
        )
        if differ:
            warn_other_arguments(sig.task.name, opts.idempotency_key, msg_id, queue_name)
        return JobRef(msg_id, queue_name, sig.task.name, dedup, jobs=self._jobs)

    def _send_many_on_cursor(self, sigs: Sequence[Signature], cursor: Any) -> list[JobRef[Any]]:
        """One ``send_batch`` per queue and visibility time (at most BATCH_CHUNK jobs each),
        every batch encoded (and so checked) before anything is sent."""
        groups: dict[tuple[str, float, Any], list[int]] = defaultdict(list)
        for i, s in enumerate(sigs):
            groups[(s.queue, s.options.delay, s.options.eta)].append(i)
        batches = []
        for (queue_name, delay, eta), positions in groups.items():
            for start in range(0, len(positions), BATCH_CHUNK):
                chunk = positions[start : start + BATCH_CHUNK]
                mine = [sigs[i] for i in chunk]
                bodies = envelope.encode_many(
                    [(s.task.name, s.args, s.kwargs) for s in mine], max_size=self._max_message_size
                )
                headers = [s.headers() for s in mine]
                joined = (
                    "[" + ",".join(h or "null" for h in headers) + "]"
                    if any(h is not None for h in headers)
                    else None
                )
                batches.append((queue_name, delay, eta, chunk, bodies, joined))
        refs: list[JobRef[Any] | None] = [None] * len(sigs)
        for queue_name, delay, eta, chunk, bodies, joined in batches:
            rows = cursor_send_batch(
                cursor, queue_name, bodies, joined, delay, eta, self._create_queues
            )
            for i, (msg_id, dedup, sent_to, differ) in zip(chunk, rows, strict=True):
                name = sigs[i].task.name
                if differ:
                    key = sigs[i].options.idempotency_key
                    warn_other_arguments(name, key, msg_id, sent_to)
                refs[i] = JobRef(msg_id, sent_to, name, dedup, jobs=self._jobs)
        return [r for r in refs if r is not None]

    def _hooked_on_cursor(self, call: EnqueueCall, cursor: Any) -> list[JobRef[Any]]:
        """The enqueue hooks on the background loop around a send made here, on the caller's
        cursor: the innermost step hands the (maybe changed) call back to this thread."""
        requests: queue.SimpleQueue[tuple[EnqueueCall, concurrent.futures.Future[Any]] | None]
        requests = queue.SimpleQueue()

        async def send_here(final: EnqueueCall) -> list[JobRef[Any]]:
            answer: concurrent.futures.Future[list[JobRef[Any]]] = concurrent.futures.Future()
            requests.put((final, answer))
            return await asyncio.wrap_future(answer)

        chain = compose(list(self._hooks), send_here)
        outer = self._submit(lambda _: chain(call))
        outer.add_done_callback(lambda _: requests.put(None))
        while (request := requests.get()) is not None:
            final, answer = request
            try:
                if len(final.signatures) == 1:
                    answer.set_result([self._send_one_on_cursor(final.signatures[0], cursor)])
                else:
                    answer.set_result(self._send_many_on_cursor(final.signatures, cursor))
            except BaseException as exc:
                answer.set_exception(exc)
        refs: list[JobRef[Any]] = _answer(outer)
        return refs

    # --- on the background loop ------------------------------------------------------------

    def _call(self, work: Callable[[Enqueuer], Awaitable[T]]) -> T:
        """Run ``work`` with the background loop's enqueuer; block for its answer. The
        caller's context variables go with it (call_soon_threadsafe copies them)."""

        async def run(background: _Background) -> T:
            return await work(self._enqueuer_of(background))

        return _answer(self._submit(run))

    def _submit(self, make: Callable[[_Background], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Hand the coroutine ``make`` returns to the background loop (started if need be).
        Under the lock: `close` takes the loop away under it too, so a call is either on
        the loop it closes, before that close's own step, or on the next loop."""
        with self._lock:
            background = self._background
            if background is None or background.pid != os.getpid():
                # first use, or a forked child: the parent's loop thread does not exist here
                background = self._background = _Background()
            if threading.current_thread() is background.thread:
                raise RuntimeError("defer_sync() was called on pgtasks' own background loop")
            return asyncio.run_coroutine_threadsafe(_coro(make(background)), background.loop)

    def _enqueuer_of(self, background: _Background) -> Enqueuer:
        """The enqueuer (and pool) of ``background``'s loop, made on its first call there."""
        if background.enqueuer is None:
            background.database = self._new_database()
            background.enqueuer = Enqueuer(
                background.database,
                max_message_size=self._max_message_size,
                create_queues=self._create_queues,
                hooks=self._hooks_object,
                jobs=self._jobs,
            )
        return background.enqueuer

    def close(self) -> None:
        """Close the background loop's pool and stop its thread (it starts again on the
        next call). Calls handed to it before end first; one still waiting on the pool
        when it closes raises `RuntimeError`."""
        with self._lock:
            background = self._background
            if background is None or background.pid != os.getpid():
                return
            if threading.current_thread() is background.thread:
                raise RuntimeError("close_sync() cannot be called from the background loop itself")
            self._background = None
        background.stop()


class _Background:
    """One background event loop: its daemon thread, and the pool its enqueuer opens."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.database: Database | None = None
        self.enqueuer: Enqueuer | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=_serve, args=(self.loop,), name="pgtasks-sync-loop", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        """Close the pool (after the calls handed over before), end every call still
        pending (cancelled: its caller gets an error, never a wait without end), and stop
        the thread. Each step runs on the loop itself, bounded."""
        for step in (self._close_pool, _cancel_the_rest):
            try:
                asyncio.run_coroutine_threadsafe(step(), self.loop).result(timeout=10)
            except Exception as exc:  # at exit: a server that is gone must not hang or fail it
                logger.warning("pgtasks: stopping the loop of defer_sync() failed: %r", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()

    async def _close_pool(self) -> None:
        if self.database is not None:
            await self.database.close()


async def _cancel_the_rest() -> None:
    this = asyncio.current_task()
    rest = [task for task in asyncio.all_tasks() if task is not this]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


def _answer(future: concurrent.futures.Future[T]) -> T:
    """What a call handed to the background loop returned (or raised); `RuntimeError` if
    `close` cancelled it (see `_Background.stop`)."""
    try:
        return future.result()
    except concurrent.futures.CancelledError:
        raise RuntimeError(
            "close_sync() stopped the background loop while this call waited on it; the "
            "job may or may not have been enqueued"
        ) from None


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


async def _coro(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _check_items(sigs: Iterable[Signature], cursor: Any) -> None:
    """Refuse what the sync path would misuse or silently ignore: an asyncpg connection
    (of another event loop), and an item's cursor other than the one sent on (its job
    would leave the transaction the caller meant)."""
    for sig in sigs:
        opts = sig.options
        if opts.connection is not None:
            raise TypeError(
                f"deferring {sig.task.name!r}: options(connection=...) is for defer(), "
                "which sends on an asyncpg connection of your event loop; with defer_sync() "
                "pass cursor= (a DB-API cursor) to enqueue in your transaction"
            )
        if opts.cursor is not None and opts.cursor is not cursor:
            raise TypeError(
                f"deferring {sig.task.name!r}: a batch is sent on one cursor, and this item's "
                "options(cursor=...) is not it; pass it as "
                "app.defer_many_sync(signatures, cursor=...)"
            )


def _refuse_on_a_running_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"{what} was called on a running event loop, which it would block: in async code "
        "use `await task.defer(...)` (or `await app.defer_many(...)`)"
    )


@atexit.register
def _close_all() -> None:
    for client in list(_clients):
        client.close()


def _after_fork_in_child() -> None:
    """Another thread of the parent may have held a client's lock at the fork; no thread
    of the child ever will release it."""
    for client in list(_clients):
        client._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
