"""The lease keeper: extends the visibility timeouts of running jobs, in batches.

A claimed message is invisible to other workers until its vt; that is the lease. Every job is
extended to now + its lease once a third of the lease has passed, with one UPDATE per queue
guarded by (msg_id, read_ct). A job whose row did not come back was taken by another worker
(its lease expired, say, while the event loop was blocked) or removed: it is cancelled and
never acked.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

import anyio
import asyncpg

from ._db import queries
from ._db.connect import CONNECTION_ERRORS, acquire_clean
from ._executor import Job
from .context import JobEvent

logger = logging.getLogger("pgtasks")


class LeaseKeeper:
    def __init__(
        self,
        pool: asyncpg.Pool,
        running: Callable[[], Iterable[Job]],
        emit: Callable[[JobEvent], None],
        *,
        tick: float = 1.0,
    ) -> None:
        self._pool = pool
        self._running = running
        self._emit = emit
        self._tick = tick

    async def run(self) -> None:
        while True:
            await anyio.sleep(self._tick)
            try:
                await self.extend_due()
            except CONNECTION_ERRORS as exc:
                logger.warning("could not extend leases, retrying: %s", exc)

    async def extend_due(self) -> None:
        now = time.monotonic()
        due: dict[str, list[Job]] = defaultdict(list)
        for job in self._running():
            if not job.lost and now - job.extended_at >= job.lease / 3:
                due[job.queue].append(job)
        if not due:
            return
        async with acquire_clean(self._pool) as conn:
            for queue, jobs in due.items():
                owned = [(j.message.msg_id, j.message.read_ct) for j in jobs]
                held = await queries.messages_set_vt(conn, queue, owned, [j.lease for j in jobs])
                for job in jobs:
                    if job.message.msg_id in held:
                        job.extended_at = now
                    else:
                        self._lose(job)

    def _lose(self, job: Job) -> None:
        job.lose()
        msg = job.message
        logger.warning(
            "lost the lease on message %d in queue %s (attempt %d): another worker "
            "may run it now; cancelling this run, which will not be acked",
            msg.msg_id,
            job.queue,
            msg.read_ct,
        )
        self._emit(JobEvent("lost", job.queue, msg.msg_id, msg.read_ct, None))
