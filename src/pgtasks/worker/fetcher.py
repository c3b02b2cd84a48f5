"""The fetcher: claims messages, never more than there are free slots.

Each pass visits the worker's queues round-robin from a rotating start and claims with one
statement per queue (pgmq.read's claim, prepared, in vt order: `jobs.message_read`) for
that queue's share of the free slots, so a claimed message never waits for a slot while its
lease runs and no queue starves another. A queue that returned fewer than asked is drained.
When every queue is drained the fetcher sleeps until the first of: a wake-up (a
notification, enough freed slots, a stop), the next message becoming visible (min(vt) of
its queues: delayed jobs, retries and expired leases do not notify), or the safety poll
interval.

Errors are classified (`db.errors.classify`). A transient one (the connection, the server)
ends the pass and the worker's fetch loop backs off. Any other is the queue's own problem (a
dropped queue, a missing grant): that queue alone backs off, from 1 s up to a minute, with an
error in the log, while the others are served.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import anyio.lowlevel

from ..db import jobs
from ..db.errors import LOCK_NOT_AVAILABLE, ErrorKind, classify, sqlstate
from .connection import OwnConnection

logger = logging.getLogger("pgtasks")

MAX_QUEUE_BACKOFF = 60.0


class Wakeup:
    """A resettable event: `set` wakes the waiter; `wait` returns early or at timeout.
    (An asyncio.Event: it is set once per finished job, and anyio's costs more per call;
    asyncpg ties pgtasks to asyncio anyway.)"""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:  # noqa: ASYNC109
        if not self._event.is_set():
            with anyio.move_on_after(max(timeout, 0.0)):
                await self._event.wait()
        self._event.clear()


@dataclass(slots=True)
class _Queue:
    name: str
    read_vt: int  # the lease a claim takes, in whole seconds
    failures: int = 0
    blocked_until: float = 0.0  # monotonic; while in the future, the queue is skipped
    error: str | None = None


class Fetcher:
    def __init__(
        self,
        conn: OwnConnection,
        queues: Sequence[str],
        read_vt: dict[str, int],
        *,
        free_slots: Callable[[], int],
        claimed: Callable[[str, list[jobs.Message]], None],
        poll_interval: float,
        max_message_size: int,
        max_batch: int = 1000,
    ) -> None:
        self._conn = conn
        self._queues = [_Queue(q, read_vt[q]) for q in queues]
        self._free_slots = free_slots
        self._claimed = claimed
        self._poll_interval = poll_interval
        self._max_message_size = max_message_size
        self._max_batch = max_batch
        self._offset = 0
        self._claim_scope: anyio.CancelScope | None = None
        self.wakeup = Wakeup()
        # free slots worth waking for: a finished job sets `wakeup` only once this many
        # slots are free (or nothing runs), so a backlog is claimed in batches
        self.wanted = 1

    @property
    def failed_queues(self) -> dict[str, str]:
        """Queues whose last claim failed for a reason other than the connection, with the
        error; a queue leaves this once a claim on it succeeds."""
        return {q.name: q.error for q in self._queues if q.error is not None}

    async def claim_pass(self) -> tuple[int, bool]:
        """One round over the queues: (messages claimed, whether every queue is drained).
        Raises only transient errors."""
        now = time.monotonic()
        open_queues = [q for q in self._queues if q.blocked_until <= now]
        n = len(open_queues)
        if not n:
            return 0, True
        start = self._offset % n
        order = open_queues[start:] + open_queues[:start]
        self._offset += 1
        total = 0
        drained = True
        for i, queue in enumerate(order):
            free = self._free_slots()
            if free <= 0:
                return total, False
            share = min(self._max_batch, max(1, math.ceil(free / (n - i))))
            await anyio.lowlevel.checkpoint_if_cancelled()  # no new claim once stopped
            try:
                messages, interrupted = await self._claim(queue, share)
            except Exception as exc:
                if sqlstate(exc) == LOCK_NOT_AVAILABLE:  # this queue's table is locked
                    self._block(queue, exc, locked=True)
                    continue
                if classify(exc) is ErrorKind.TRANSIENT:
                    raise
                self._block(queue, exc)
                continue
            queue.failures, queue.error = 0, None
            total += len(messages)
            if interrupted:
                return total, False
            if len(messages) >= share:
                drained = False
        return total, drained

    async def _claim(self, queue: _Queue, qty: int) -> tuple[list[jobs.Message], bool]:
        # Once the server has claimed messages they must reach jobs (which run, or are
        # released at shutdown): a soft stop must not abandon a read in flight, or its
        # messages would wait out their leases. A forced stop may (`cancel_claim`).
        messages: list[jobs.Message] = []
        with anyio.CancelScope(shield=True) as self._claim_scope:
            async with self._conn.use() as conn:
                messages = await jobs.message_read(
                    conn, queue.name, queue.read_vt, qty, self._max_message_size
                )
            if messages:
                self._claimed(queue.name, messages)
        interrupted, self._claim_scope = self._claim_scope.cancelled_caught, None
        return messages, interrupted

    def _block(self, queue: _Queue, exc: Exception, *, locked: bool = False) -> None:
        if locked:  # someone holds a lock on its table: try again soon, without alarm
            queue.blocked_until = time.monotonic() + 1.0
            logger.warning(
                "claiming from queue %s waited too long for a lock on its table (%s); the "
                "other queues are served, this one is tried again in 1s",
                queue.name,
                exc,
            )
            return
        queue.failures += 1
        delay = min(MAX_QUEUE_BACKOFF, 2.0 ** (queue.failures - 1))
        queue.blocked_until = time.monotonic() + delay
        queue.error = f"{type(exc).__name__}: {exc}"
        logger.error(
            "cannot claim from queue %s (%s); the other queues are served, this one is "
            "tried again in %.0fs",
            queue.name,
            queue.error,
            delay,
        )

    def cancel_claim(self) -> None:
        """Interrupt a claim in flight (a forced stop)."""
        if self._claim_scope is not None:
            self._claim_scope.cancel()

    async def idle_wait(self) -> None:
        """Sleep until a wake-up, the next visible message, the next blocked queue's retry,
        or the safety poll."""
        now = time.monotonic()
        open_names = [q.name for q in self._queues if q.blocked_until <= now]
        blocked = [q.blocked_until - now for q in self._queues if q.blocked_until > now]
        timeout = min([self._poll_interval, *blocked])
        next_visible = None
        if open_names:
            try:
                async with self._conn.use() as conn:
                    next_visible = await jobs.queues_next_visible(conn, open_names)
            except Exception as exc:  # the claims will meet it too, and deal with it
                logger.debug("could not look up the next visible message: %s", exc)
        if next_visible is not None:
            # visible already but not claimed (another worker holds the row lock for an
            # instant): look again shortly rather than spin
            timeout = min(timeout, max(next_visible, 0.01))
        await self.wakeup.wait(timeout)

    async def gather_slots(self, enough: int, window: float = 0.002) -> None:
        """Wait until ``enough`` slots are free, for ``window`` seconds at most."""
        deadline = anyio.current_time() + window
        self.wanted = enough
        try:
            while self._free_slots() < enough:
                left = deadline - anyio.current_time()
                if left <= 0:
                    return
                await self.wakeup.wait(left)
        finally:
            self.wanted = 1

    async def wait_for_slot(self) -> None:
        await self.wakeup.wait(self._poll_interval)
