"""The fetcher: claims messages for the worker's slots, from the queues that may hold some.

Which queues it claims from. A queue is *ready* while it may hold a visible message. A claim
that returns fewer messages than it asked for leaves its queue not ready: reading it again
now would find nothing. A queue becomes ready again when

* a notification names it (every send notifies, a delayed one too);
* this worker's own retry or release put a message back in it (the completer says which);
* its *due* time comes: when its earliest message becomes visible (delayed jobs, retries and
  leases that will lapse all count), as the last probe of it found;
* the safety poll's *sweep* (every ``poll_interval``, at the start, and after a missed
  notification) finds a visible message in it: that catches what nothing announced, such as
  a retry written by another worker or a message sent with plain ``pgmq.send``.

So a worker serving a thousand queues of which one is busy claims from that one alone, and
the others cost one probe per poll interval, not a round trip per queue per claim.

A probe asks for min(vt) of up to `PROBE_CHUNK` queues in one statement, one entry of
pgmq's vt index each. Chunks are fixed by the queue's place in the worker's list, so the
statements are the same from one probe to the next and stay prepared. A queue that a claim
drained is probed (its chunk is) before the fetcher sleeps, to learn its due time.

Each pass visits the ready queues round-robin from a rotating start and claims with one
statement per queue (pgmq.read's claim, prepared, in vt order: `jobs.message_read`) for that
queue's share of the free capacity: the free slots, and the prefetch (`slots.py`). When no
queue is ready the fetcher sleeps until the first of: a wake-up (a notification, enough
freed capacity, a stop), the next due time, the next sweep, or a blocked queue's retry.

Errors are classified (`db.errors.classify`). A transient one (the connection, the server)
ends the pass and the worker's fetch loop backs off. Any other is the queue's own problem (a
dropped queue, a missing grant): that queue alone backs off, from 1 s up to a minute, with an
error in the log, while the others are served. A probe that fails so makes its chunk's
queues ready, and their claims find out which queue is at fault.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
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
    chunk: int  # which probe statement asks for it
    ready: bool = False  # it may hold a visible message: claim from it
    probe: bool = False  # a claim drained it: learn its due time before sleeping
    due: float | None = None  # monotonic; when its earliest message becomes visible
    heard: int = 0  # notifications; a claim that drained it leaves it ready if one came
    rechecks: int = 0  # probes in a row that saw a message visible its claim did not get
    failures: int = 0
    blocked_until: float = 0.0  # monotonic; while in the future, the queue is skipped
    error: str | None = None


PROBE_CHUNK = 50
"""Queues per probe statement."""

RECHECK = 0.01
"""Seconds before a drained queue whose probe finds a message visible is claimed again
(another worker held that row's lock for an instant): soon, without spinning. Each time
in a row it happens again the wait doubles, up to `MAX_RECHECK`: a transaction that holds
the row locked (a cancel inside a longer transaction, an operator's ``FOR UPDATE``) would
otherwise have the worker claim and probe it a hundred times a second while it lasts."""

MAX_RECHECK = 1.0


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
        timed: Callable[[float], None] = lambda _: None,
    ) -> None:
        self._conn = conn
        self._queues = [_Queue(q, read_vt[q], i // PROBE_CHUNK) for i, q in enumerate(queues)]
        self._by_name = {q.name: q for q in self._queues}
        self._free_slots = free_slots
        self._claimed = claimed
        self._timed = timed
        self._poll_interval = poll_interval
        self._max_message_size = max_message_size
        self._max_batch = max_batch
        self._offset = 0
        self._next_sweep = 0.0  # monotonic; the first pass sweeps
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

    def notify(self, queue: str | None) -> None:
        """``queue`` may hold a visible message now (a notification, a retry of ours); None:
        any queue may (notifications may have been missed): sweep them all."""
        if queue is None:
            self._next_sweep = 0.0
        elif (q := self._by_name.get(queue)) is not None:
            q.ready = True
            q.heard += 1
        else:
            return  # not one of ours
        self.wakeup.set()

    async def claim_pass(self) -> tuple[int, bool]:
        """One round over the ready queues: (messages claimed, whether none is ready any
        more). Sweeps first when the poll interval has passed. Raises only transient
        errors."""
        if time.monotonic() >= self._next_sweep:
            await self.sweep()
        now = time.monotonic()
        for q in self._queues:
            if q.due is not None and q.due <= now:
                q.due, q.ready = None, True
        ready = [q for q in self._queues if q.ready and q.blocked_until <= now]
        n = len(ready)
        if not n:
            return 0, True
        start = self._offset % n
        order = ready[start:] + ready[:start]
        self._offset += 1
        total = 0
        for i, queue in enumerate(order):
            free = self._free_slots()
            if free <= 0:
                return total, False
            share = min(self._max_batch, max(1, math.ceil(free / (n - i))))
            await anyio.lowlevel.checkpoint_if_cancelled()  # no new claim once stopped
            heard = queue.heard
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
            if messages:
                queue.rechecks = 0
            total += len(messages)
            if interrupted:
                return total, False
            if len(messages) < share and queue.heard == heard:  # none sent meanwhile
                queue.ready, queue.probe = False, True
        now = time.monotonic()
        return total, not any(q.ready and q.blocked_until <= now for q in order)

    async def sweep(self) -> None:
        """Probe every queue now: the safety poll (and burst mode's last look before it
        stops)."""
        now = time.monotonic()
        self._next_sweep = now + self._poll_interval
        await self._probe((q for q in self._queues if q.blocked_until <= now), sweep=True)

    async def _probe(self, queues: Iterable[_Queue], *, sweep: bool = False) -> None:
        """Learn when each of these queues (and the rest of their chunks) next has a visible
        message: later sets its due time; visible now makes it ready in a sweep, and after
        a claim drained it (another worker held the row's lock for an instant) ready again
        in a moment."""
        chunks = {q.chunk for q in queues}
        now = time.monotonic()
        for chunk in sorted(chunks):
            members = [
                q
                for q in self._queues[chunk * PROBE_CHUNK : (chunk + 1) * PROBE_CHUNK]
                if q.blocked_until <= now
            ]
            if not members:
                continue
            try:
                async with self._conn.use() as conn:
                    seconds = await jobs.queues_next_visible(conn, [q.name for q in members])
            except Exception as exc:
                if classify(exc) is ErrorKind.TRANSIENT and sqlstate(exc) != LOCK_NOT_AVAILABLE:
                    raise
                logger.debug("probing queues failed (%s); claiming from each to find out", exc)
                for q in members:
                    q.ready, q.probe = True, False
                continue
            now = time.monotonic()
            for q, left in zip(members, seconds, strict=True):
                q.probe = False
                if left is None:
                    q.due = None
                elif left > 0:
                    q.due = now + left
                elif sweep:
                    q.ready = True
                elif not q.ready:  # visible, yet the claim that drained it did not get it
                    q.due = now + min(MAX_RECHECK, RECHECK * 2 ** min(q.rechecks, 10))
                    q.rechecks += 1

    async def _claim(self, queue: _Queue, qty: int) -> tuple[list[jobs.Message], bool]:
        # Once the server has claimed messages they must reach jobs (which run, or are
        # released at shutdown): a soft stop must not abandon a read in flight, or its
        # messages would wait out their leases. A forced stop may (`cancel_claim`).
        messages: list[jobs.Message] = []
        with anyio.CancelScope(shield=True) as self._claim_scope:
            began = time.monotonic()
            async with self._conn.use() as conn:
                messages = await jobs.message_read(
                    conn, queue.name, queue.read_vt, qty, self._max_message_size
                )
            self._timed(time.monotonic() - began)
            if messages:
                self._claimed(queue.name, messages)
        interrupted, self._claim_scope = self._claim_scope.cancelled_caught, None
        return messages, interrupted

    def _block(self, queue: _Queue, exc: Exception, *, locked: bool = False) -> None:
        queue.ready = True  # claimed from again once its back-off ends
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
        """Sleep until a wake-up, the next due time, the next sweep or the next blocked
        queue's retry; first probe the queues that claims drained, to learn their due
        times."""
        now = time.monotonic()
        drained = [q for q in self._queues if q.probe and q.blocked_until <= now]
        if drained:
            await self._probe(drained)
        now = time.monotonic()
        if any(q.ready and q.blocked_until <= now for q in self._queues):
            return  # a probe that failed, or a notification meanwhile: claim at once
        timeout = self._next_sweep - now
        for q in self._queues:
            if q.blocked_until > now:
                timeout = min(timeout, q.blocked_until - now)
            elif q.due is not None:
                timeout = min(timeout, q.due - now)
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
