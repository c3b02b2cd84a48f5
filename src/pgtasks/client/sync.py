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
  starts its own.

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
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._database: Database | None = None
        self._enqueuer: Enqueuer | None = None
        _clients.add(self)

    # --- the two ways of sending -----------------------------------------------------------

    def defer(self, sig: Signature) -> JobRef[Any]:
        cursor = sig.options.cursor
        if cursor is not None:
            if self._hooks:
                (ref,) = self._hooked_on_cursor(EnqueueCall((sig,)), cursor)
                return ref
            return self._send_one_on_cursor(sig, cursor)
        _refuse_on_a_running_loop("defer_sync()")
        return self._call(lambda enqueuer: enqueuer.defer_one(sig))

    def defer_many(self, signatures: Iterable[Signature], cursor: Any) -> list[JobRef[Any]]:
        if cursor is not None:
            sigs = tuple(signatures)
            if self._hooks:
                return self._hooked_on_cursor(EnqueueCall(sigs), cursor)
            return self._send_many_on_cursor(sigs, cursor)
        _refuse_on_a_running_loop("defer_many_sync()")
        sigs_list = list(signatures)
        return self._call(lambda enqueuer: enqueuer.defer_many(sigs_list, None))

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

        loop = self._running_loop()
        if threading.current_thread() is self._thread:
            raise RuntimeError("defer_sync() was called on pgtasks' own background loop")
        chain = compose(list(self._hooks), send_here)
        outer = asyncio.run_coroutine_threadsafe(_coro(chain(call)), loop)
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
        refs: list[JobRef[Any]] = outer.result()
        return refs

    # --- on the background loop ------------------------------------------------------------

    def _call(self, work: Callable[[Enqueuer], Awaitable[T]]) -> T:
        """Run ``work`` with the background loop's enqueuer; block for its answer. The
        caller's context variables go with it (call_soon_threadsafe copies them)."""
        loop = self._running_loop()

        async def run() -> T:
            if self._enqueuer is None:
                self._database = self._new_database()
                self._enqueuer = Enqueuer(
                    self._database,
                    max_message_size=self._max_message_size,
                    create_queues=self._create_queues,
                    hooks=self._hooks_object,
                    jobs=self._jobs,
                )
            return await work(self._enqueuer)

        return asyncio.run_coroutine_threadsafe(run(), loop).result()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None and self._pid == os.getpid():
                return self._loop
            # first use, or a forked child: the parent's loop thread does not exist here
            self._database = None
            self._enqueuer = None
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=_serve, args=(loop,), name="pgtasks-sync-loop", daemon=True
            )
            thread.start()
            self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return loop

    def close(self) -> None:
        """Close the background loop's pool and stop its thread (it starts again on the
        next call)."""
        with self._lock:
            loop, thread, database = self._loop, self._thread, self._database
            self._loop = self._thread = None
            self._database = self._enqueuer = None
            if loop is None or thread is None or self._pid != os.getpid():
                return
        if threading.current_thread() is thread:
            raise RuntimeError("close_sync() cannot be called from the background loop itself")
        try:
            if database is not None:
                asyncio.run_coroutine_threadsafe(database.close(), loop).result(timeout=10)
        except Exception as exc:  # at exit: a server that is gone must not hang or fail it
            logger.warning("pgtasks: closing the pool of defer_sync() failed: %r", exc)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            if not thread.is_alive():
                loop.close()


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


async def _coro(awaitable: Awaitable[T]) -> T:
    return await awaitable


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
