"""The fetcher: claims messages, never more than there are free slots.

Each pass visits the worker's queues round-robin from a rotating start and claims with one
statement per queue (pgmq.read's claim, prepared, in vt order: `queries.message_read`) for
that queue's share of the free slots, so a claimed message never waits for a slot while its
lease runs and no queue starves another. A queue that returned fewer than asked is drained.
When every queue is drained the fetcher sleeps until the first of: a wake-up (a
notification, enough freed slots, a stop), the next message becoming visible (min(vt) of
its queues: delayed jobs, retries and expired leases do not notify), or the safety poll
interval.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence

import anyio
import anyio.lowlevel
import asyncpg

from ._db import queries
from ._db.connect import CONNECTION_ERRORS, acquire_clean

logger = logging.getLogger("pgtasks")


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


class Fetcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        queues: Sequence[str],
        read_vt: dict[str, int],
        *,
        free_slots: Callable[[], int],
        claimed: Callable[[str, list[queries.Message]], None],
        poll_interval: float,
        max_batch: int = 1000,
    ) -> None:
        self._pool = pool
        self._queues = list(queues)
        self._read_vt = read_vt
        self._free_slots = free_slots
        self._claimed = claimed
        self._poll_interval = poll_interval
        self._max_batch = max_batch
        self._offset = 0
        self._claim_scope: anyio.CancelScope | None = None
        self.wakeup = Wakeup()
        # free slots worth waking for: a finished job sets `wakeup` only once this many
        # slots are free (or nothing runs), so a backlog is claimed in batches
        self.wanted = 1

    async def claim_pass(self) -> tuple[int, bool]:
        """One round over the queues: (messages claimed, whether every queue is drained)."""
        n = len(self._queues)
        order = self._queues[self._offset :] + self._queues[: self._offset]
        self._offset = (self._offset + 1) % n
        total = 0
        drained = True
        for i, queue in enumerate(order):
            free = self._free_slots()
            if free <= 0:
                return total, False
            share = min(self._max_batch, max(1, math.ceil(free / (n - i))))
            # Once the server has claimed messages they must reach jobs (which run, or are
            # released at shutdown): a soft stop must not abandon a read in flight, or its
            # messages would wait out their leases. A forced stop may (`cancel_claim`).
            await anyio.lowlevel.checkpoint_if_cancelled()  # no new claim once stopped
            with anyio.CancelScope(shield=True) as self._claim_scope:
                async with acquire_clean(self._pool) as conn:
                    messages = await queries.message_read(conn, queue, self._read_vt[queue], share)
                if messages:
                    total += len(messages)
                    self._claimed(queue, messages)
            interrupted, self._claim_scope = self._claim_scope.cancelled_caught, None
            if interrupted:
                return total, False
            if len(messages) >= share:
                drained = False
        return total, drained

    def cancel_claim(self) -> None:
        """Interrupt a claim in flight (a forced stop)."""
        if self._claim_scope is not None:
            self._claim_scope.cancel()

    async def idle_wait(self) -> None:
        """Sleep until a wake-up, the next visible message, or the safety poll."""
        try:
            async with acquire_clean(self._pool) as conn:
                next_visible = await queries.queues_next_visible(conn, self._queues)
        except CONNECTION_ERRORS:
            next_visible = None
        timeout = self._poll_interval
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
