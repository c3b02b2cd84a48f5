"""The lease keeper: decides which running jobs need their lease extended.

A claimed message is invisible to other workers until its vt; that is the lease. While a
job runs in this process (also after a timeout or a stop cancelled it and it has not
finished unwinding), once a third of its lease has passed, the keeper asks the completer
(the one writer of message rows) to push its vt out to now + lease. It writes nothing
itself: an extension queued in the completer is written in order with the job's other
writes, and dropped if the job's outcome is decided first. A job whose row does not come
back was taken by another worker (its lease expired, say, while the event loop was
blocked) or removed; the completer cancels it for that reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import anyio

from .completer import Completer
from .job import CancelReason, Job
from .outcome import Outcome


class LeaseKeeper:
    def __init__(
        self, running: Callable[[], Iterable[Job]], completer: Completer, *, tick: float = 1.0
    ) -> None:
        self._running = running
        self._completer = completer
        self._tick = tick

    async def run(self) -> None:
        while True:
            await anyio.sleep(self._tick)
            self.extend_due()

    def extend_due(self) -> None:
        now = time.monotonic()
        for job in self._running():
            if (
                not job.decided
                and job.cancel_reason is not CancelReason.LOST_LEASE  # not ours any more
                and not job.extension_pending
                and now - job.extended_at >= job.lease / 3
            ):
                job.extension_pending = True
                self._completer.submit(Outcome("extend", job, delay=job.lease))
