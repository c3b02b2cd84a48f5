"""The worker's slots, and the jobs claimed ahead of them.

At most ``concurrency`` jobs run at once, each as an asyncio task of its own. A job claimed
while every slot is busy waits here, in claim order, as a `Job` with no task yet: it holds
its message (the lease keeper extends its lease like any held job's) and starts the moment
a slot frees. One that is cancelled while it waits (a stop hands it back with its attempt
given back, a request records it as cancelled, a lost lease writes nothing) never starts.

The fetcher claims for the free slots and a *prefetch*: the jobs that will free slots while
a claim is on its way. Without it, a slot that frees sits idle for a whole claim round trip
before its next job arrives, which for jobs of a millisecond is most of the time. From
moving averages of a claim's round trip and a job's run time: ``cover = concurrency * claim
round trip / run time`` jobs end while a claim is on its way; a claim is sent once
``batch`` of the line has started, and the ``2 * cover`` still waiting cover the round trip
twice over (with one, the line was found empty a third of the time). The batch is at least
`CLAIM_WORK` of the slots' work: a claim for one or two jobs costs as much as one for
twenty, and every reply that reaches the loop while jobs wait on timers makes them wake
late (the loop's wait is in whole milliseconds, rounded up: a reply 0.4 ms into a 1 ms wait
leaves 0.6 ms, waited as 1 ms). The line holds at most `MAX_AHEAD` jobs or two per slot.
The prefetch is 0 until jobs have run, and 0 when a job runs so long that a slot's wait for
a claim is a small part of it (``3 * cover < 1``): then nothing waits in this worker that
another worker's free slot could run.

Jobs that turn from short to long would keep what was claimed ahead waiting behind them, for
as long as they run (hours, maybe), while another worker's slot is free: a job that has
waited `PATIENCE` goes back to the queue, its attempt given back, and this worker claims
nothing ahead until its runs are measured short again.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable

import anyio

from .job import CancelReason, Job

logger = logging.getLogger("pgtasks")

WEIGHT = 1 / 16
"""Each new sample's weight in a moving average (about the last 16 count)."""

CLAIM_WORK = 0.01
"""Seconds of the slots' work a claim ahead brings at least (see the module)."""

MAX_AHEAD = 64
"""Jobs the line may hold, or two per slot if that is more."""

PACE_EVERY = 8
"""The prefetch is worked out again every this many ended runs (and on every claim): an
average of about 16 moves little in between."""

PATIENCE = 1.0
"""Seconds a job claimed ahead may wait for a slot. Jobs are claimed ahead only while a run
is about as short as a claim's round trip, so one waits milliseconds; one that waited a
second waits behind jobs that turned long."""


class Slots:
    def __init__(
        self,
        concurrency: int,
        *,
        start: Callable[[Job], None],
        dispose: Callable[[Job], None],
    ) -> None:
        self.size = concurrency
        self.busy = 0
        """Jobs running now (each holds a slot)."""
        self.waiting: deque[Job] = deque()
        """Jobs claimed ahead, in claim order."""
        self._start = start
        self._dispose = dispose  # a job cancelled while it waited: its outcome, not a run
        self._run_time: float | None = None
        self._ended = 0  # runs ended
        self._claim_time: float | None = None
        self.prefetch = 0
        """Jobs to claim beyond the free slots."""
        self.batch = 0
        """With a prefetch: the free capacity worth a claim."""
        self.gather = 0.0
        """With a prefetch: seconds the slots take to free ``batch`` (about)."""

    def add(self, job: Job) -> None:
        """A job just claimed: start it now if a slot is free, else when one is."""
        if self.busy < self.size:
            self.busy += 1
            self._start(job)
        else:
            self.waiting.append(job)

    def finished(self, run_time: float) -> None:
        """A job's run ended after ``run_time`` seconds: its slot goes to the next job."""
        self.busy -= 1
        self._run_time = _average(self._run_time, run_time)
        self._ended += 1
        if self._ended % PACE_EVERY == 0 or self._ended < PACE_EVERY:
            self._pace()
        waiting = self.waiting
        while waiting and self.busy < self.size:
            job = waiting.popleft()
            if job.cancel_reason is not None:
                self._dispose(job)
            else:
                self.busy += 1
                self._start(job)

    def withdraw(self, job: Job) -> bool:
        """Take a waiting job out of line (it was cancelled): whether it was waiting."""
        try:
            self.waiting.remove(job)
        except ValueError:
            return False
        return True

    def overdue(self, now: float) -> list[Job]:
        """Take out of line the jobs that waited `PATIENCE` seconds (monotonic ``now``), and
        claim nothing ahead until runs are measured short again: the running jobs have taken
        that long at least."""
        waiting, late = self.waiting, []
        while waiting and now - waiting[0].claimed_at >= PATIENCE:  # in claim order
            late.append(waiting.popleft())
        if late:
            self._run_time = max(self._run_time or 0.0, PATIENCE)
            self._pace()
        return late

    def hand_back_all(self) -> None:
        """Hand every waiting job back (the worker stops): released, its attempt given back."""
        while self.waiting:
            self._hand_back(self.waiting.popleft())

    async def watch(self) -> None:
        """Hand back the jobs that waited `PATIENCE` for a slot, checked four times as often."""
        while True:
            await anyio.sleep(PATIENCE / 4)
            for job in self.overdue(time.monotonic()):
                logger.debug("%s waited %.1fs for a slot; handed back", job, PATIENCE)
                self._hand_back(job)

    def _hand_back(self, job: Job) -> None:
        if job.cancel_reason is None:  # one cancelled already ends by its own reason
            job.cancel(CancelReason.STOP)
        self._dispose(job)

    def claimed(self, seconds: float) -> None:
        """A claim's round trip took ``seconds``."""
        self._claim_time = _average(self._claim_time, seconds)
        self._pace()

    def _pace(self) -> None:
        run, claim = self._run_time, self._claim_time
        if run is None or claim is None:
            return
        run = max(run, 1e-6)
        cover = self.size * claim / run
        if 3 * cover < 1:
            self.prefetch = 0
            return
        keep = math.ceil(2 * cover)  # waiting when a claim is sent
        batch = math.ceil(max(cover, self.size * CLAIM_WORK / run))
        self.prefetch = min(max(MAX_AHEAD, 2 * self.size), keep + batch)
        # jobs so short that no line within the cap covers a round trip: claim by thirds
        self.batch = max(self.prefetch - keep, self.prefetch // 3, 1)
        self.gather = self.batch * run / self.size


def _average(mean: float | None, sample: float) -> float:
    return sample if mean is None else mean + WEIGHT * (sample - mean)
