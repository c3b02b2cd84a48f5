"""The jobs (and workflows) awaited in one event loop, and the task that finds out when
they end: one connection listening on ``pgtasks_done`` for every waiter, a look-up per
topic notified, and a safety poll (see `client.jobs`, which owns one per app and loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio
import asyncpg

from ..db.connect import connect
from ..db.database import Database
from ..db.errors import is_transient, translate
from ..db.jobs import DONE_CHANNEL
from ..exceptions import AppClosed, DatabaseError

logger = logging.getLogger("pgtasks")

SAFETY_POLL = 1.0  # seconds: a notification that was missed costs at most this much
IDLE_CLOSE = 30.0  # seconds without waiters before the listening connection is closed


class Waiters:
    """The jobs awaited in one event loop, and the task that finds out when they end."""

    def __init__(
        self,
        database: Database,
        ended: Callable[[str, Sequence[int]], Awaitable[dict[int, Any]]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.loop = loop
        self._database = database
        self._ended = ended
        self._pending: dict[str, dict[int, list[asyncio.Future[Any]]]] = defaultdict(dict)
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        # since when (monotonic) the connection listens, None when it does not; and when
        # each topic was last notified
        self._listening_since: float | None = None
        self._heard: dict[str, float] = {}

    async def wait(self, queue: str, msg_id: int, sent_after: float | None = None) -> Any:
        future: asyncio.Future[Any] = self.loop.create_future()
        self._pending[queue].setdefault(msg_id, []).append(future)
        if not self._will_hear(queue, sent_after):
            self._dirty.add(queue)  # it may have ended already: look once it is listening
            self._wake.set()
        if self._pump is None or self._pump.done():
            # a task of the app's, not of the caller's: it outlives any one waiter
            self._pump = self.loop.create_task(self._run(), name="pgtasks-results")
        try:
            return await future
        finally:
            waiting = self._pending.get(queue, {}).get(msg_id, [])
            if future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self._pending[queue][msg_id]

    def _will_hear(self, queue: str, sent_after: float | None) -> bool:
        """Whether a job of ``queue`` sent after ``sent_after`` cannot have ended unheard,
        so that the look-up of a new waiter (~1 ms of the server's time, while the worker
        claims the job) can wait for the notification: the connection listened before the
        job was sent (its end, committed later, notifies it), and nothing was heard of the
        queue since (a notification received earlier than this waiter is not heard again)."""
        since = self._listening_since
        return (
            sent_after is not None
            and since is not None
            and since < sent_after
            and self._heard.get(queue, -math.inf) < sent_after
        )

    async def close(self) -> None:
        """Stop listening; every wait still pending ends with `AppClosed`."""
        pump, self._pump = self._pump, None
        if pump is not None and not pump.done():
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        pending, self._pending = self._pending, defaultdict(dict)
        for topic, waiting in pending.items():
            for key, futures in waiting.items():
                error = AppClosed(
                    f"the app was closed while this coroutine waited for {_what(topic, key)} "
                    "to end; the job itself goes on"
                )
                _fail(futures, error)

    async def _run(self) -> None:
        backoff = 0.1
        idle_since: float | None = None
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._listen()
                backoff = 0.1
                poll = True  # after (re)connecting, and at each safety poll: every waiter
                while True:
                    if poll:
                        self._dirty.update(q for q, ids in self._pending.items() if ids)
                    await self._look()
                    if any(self._pending.values()):
                        idle_since = None
                    elif idle_since is None:
                        idle_since = self.loop.time()
                    elif self.loop.time() - idle_since > IDLE_CLOSE:
                        return  # nobody waits: the next waiter starts it again
                    # woken: the topics notified (and new waiters') are dirty already, and
                    # only those are looked up; every other wake-up looked up every topic
                    # waited for, a statement per queue for each notification of any queue
                    with anyio.move_on_after(SAFETY_POLL) as timer:
                        await self._wake.wait()
                    poll = timer.cancelled_caught
                    self._wake.clear()
                    if conn.is_closed():
                        break
            except Exception as exc:  # a loop that restarts with backoff
                logger.warning("waiting for job results: %s; trying again in %.1fs", exc, backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                self._listening_since = None
                if conn is not None and not conn.is_closed():
                    conn.terminate()

    async def _listen(self) -> asyncpg.Connection:
        conn = await connect(
            await self._database.dsn(),
            server_settings={"application_name": "pgtasks-results"},
        )

        def notified(_c: Any, _pid: int, _channel: str, payload: object) -> None:
            self._heard[str(payload)] = time.monotonic()
            self._dirty.add(str(payload))
            self._wake.set()

        def lost(_c: Any) -> None:
            self._listening_since = None
            self._wake.set()

        conn.add_termination_listener(lost)
        await conn.add_listener(DONE_CHANNEL, notified)
        if not conn.is_closed():  # LISTEN is in effect: every later end notifies
            self._listening_since = time.monotonic()
        return conn

    async def _look(self) -> None:
        """Look up the jobs awaited in the queues notified; resolve those that ended."""
        while self._dirty:
            queue = self._dirty.pop()
            waiting = self._pending.get(queue)
            if not waiting:
                continue
            try:
                ended = await self._ended(queue, list(waiting))
            except Exception as exc:
                if is_transient(exc):
                    self._dirty.add(queue)  # look again after the loop's backoff
                    raise
                # trying again cannot help: the waits this look-up serves end with the error
                # (later waits try again, so a fix, such as a migration, serves them)
                logger.warning("looking up awaited jobs of %r failed: %s", queue, exc)
                what = f"waiting for the jobs of queue {queue!r}"
                error = translate(exc, what) or DatabaseError(f"{what} failed: {exc}")
                for futures in waiting.values():
                    _fail(futures, error)
                continue
            for key, info in ended.items():
                for future in waiting.get(key, []):
                    if not future.done():
                        future.set_result(info)


def _what(topic: str, key: int) -> str:
    """A thing waited for, for a message: a queue's job, or another topic's (``@workflows``:
    a workflow)."""
    if topic.startswith("@"):
        return f"{topic[1:].rstrip('s')} {key}"
    return f"job {key} in queue {topic!r}"


def _fail(futures: Iterable[asyncio.Future[Any]], error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)
