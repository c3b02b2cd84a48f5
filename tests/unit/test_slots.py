"""The slots' bookkeeping and the prefetch's pace (no database: pure arithmetic)."""

from __future__ import annotations

import datetime as dt
from collections import deque

from pgtasks.db.jobs import Message
from pgtasks.worker.job import CancelReason, Job, claimed
from pgtasks.worker.slots import PATIENCE, Slots


def _job(msg_id: int) -> Job:
    now = dt.datetime.now(dt.timezone.utc)
    return claimed("q", Message(msg_id, 1, now, now, "{}", 2, None, None, False), 30.0)


def _slots(size: int) -> tuple[Slots, list[int], list[int]]:
    started: list[int] = []
    disposed: list[int] = []
    slots = Slots(
        size,
        start=lambda job: started.append(job.msg_id),
        dispose=lambda job: disposed.append(job.msg_id),
    )
    return slots, started, disposed


def test_no_prefetch_until_jobs_ran_and_none_for_long_jobs() -> None:
    slots, _, _ = _slots(16)
    assert slots.prefetch == 0
    slots.claimed(0.001)
    assert slots.prefetch == 0  # no run measured yet
    slots.busy = 1
    slots.finished(10.0)  # jobs of 10 s: a claim's millisecond is nothing to them
    assert slots.prefetch == 0


def test_short_jobs_are_claimed_ahead_up_to_the_slots() -> None:
    slots, _, _ = _slots(16)
    slots.claimed(0.001)
    for _ in range(50):
        slots.busy = 1
        slots.finished(0.001)  # as long as a claim: at most twice the slots ahead
    assert slots.prefetch == 32
    slots, _, _ = _slots(16)
    slots.claimed(0.001)
    for _ in range(50):
        slots.busy = 1
        slots.finished(0.008)  # 16 slots x 1 ms / 8 ms = 2 free during a claim; 6 ahead
    assert slots.prefetch == 6


def test_waiting_jobs_start_in_claim_order_and_cancelled_ones_never_start() -> None:
    slots, started, disposed = _slots(2)
    jobs = [_job(i) for i in range(5)]
    for job in jobs:
        slots.add(job)
    assert started == [0, 1]
    assert slots.busy == 2
    jobs[2].cancel(CancelReason.REQUESTED)
    slots.finished(0.01)
    assert started == [0, 1, 3]
    assert disposed == [2]
    assert slots.withdraw(jobs[4])
    assert not slots.withdraw(jobs[4])
    slots.finished(0.01)
    slots.finished(0.01)
    assert started == [0, 1, 3]
    assert slots.busy == 0
    assert not slots.waiting


def test_jobs_that_waited_too_long_leave_the_line_and_prefetch_stops() -> None:
    slots, started, _ = _slots(2)
    slots.claimed(0.001)
    for _ in range(50):
        slots.busy = 1
        slots.finished(0.001)
    assert slots.prefetch == 4  # the most: twice the slots
    slots.busy = 0
    jobs = [_job(i) for i in range(4)]
    for job in jobs:
        slots.add(job)
    assert started == [0, 1]
    now = jobs[3].claimed_at
    assert slots.overdue(now) == []  # just claimed
    assert slots.overdue(now + PATIENCE) == jobs[2:]  # waited a second: out of line
    assert slots.waiting == deque()
    assert slots.prefetch == 0  # the running jobs took a second at least
