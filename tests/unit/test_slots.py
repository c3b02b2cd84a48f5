"""The slots' bookkeeping and the prefetch's pace (no database: pure arithmetic)."""

from __future__ import annotations

import datetime as dt
from collections import deque

import pytest

from pgtasks.db.jobs import Message
from pgtasks.worker.job import CancelReason, Job, claimed
from pgtasks.worker.slots import MAX_AHEAD, PATIENCE, Slots


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


def _paced(size: int, claim: float, run: float) -> Slots:
    slots, _, _ = _slots(size)
    slots.claimed(claim)
    for _ in range(50):
        slots.busy = 1
        slots.finished(run)
    return slots


def test_short_jobs_are_claimed_ahead_in_batches_of_claim_work() -> None:
    # 16 slots, 8 ms jobs, 1 ms claims: 2 jobs end during a claim, 4 kept waiting when one is
    # sent; a claim brings 10 ms of the slots' work (20 jobs), not the 2 that freed
    slots = _paced(16, 0.001, 0.008)
    assert (slots.prefetch, slots.batch) == (24, 20)
    assert slots.gather == pytest.approx(0.01)
    # 1 ms jobs: 16 end during a claim, 32 kept waiting; the line is capped at MAX_AHEAD
    slots = _paced(16, 0.001, 0.001)
    assert (slots.prefetch, slots.batch) == (MAX_AHEAD, MAX_AHEAD - 32)


def test_a_line_that_cannot_cover_a_claim_is_claimed_by_thirds() -> None:
    slots = _paced(4, 0.001, 0.00001)  # 400 jobs end during a claim: more than the cap
    assert (slots.prefetch, slots.batch) == (MAX_AHEAD, MAX_AHEAD // 3)
    slots = _paced(100, 0.001, 0.00001)  # many slots: two per slot
    assert (slots.prefetch, slots.batch) == (200, 66)


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
    assert slots.prefetch == 24  # 4 kept waiting, and 10 ms of work (20 jobs) a claim
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
