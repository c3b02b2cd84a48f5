"""A job's task frees its slot at its own end (no done callback per job): a job cancelled in the
instant between its launch and its task's first step must still end, with its outcome and
without a run, and free its slot (no database: the executor is a stand-in)."""

from __future__ import annotations

import asyncio
import datetime as dt

import pgtasks
from pgtasks.db.jobs import Message
from pgtasks.worker.job import CancelReason, Job, claimed
from pgtasks.worker.worker import Worker

NOWHERE = "postgresql://root@127.0.0.1:1/nowhere"


class _Executor:
    def __init__(self) -> None:
        self.ran: list[Job] = []
        self.withdrawn_jobs: list[Job] = []

    async def run(self, job: Job) -> None:
        self.ran.append(job)
        await asyncio.sleep(0)

    def withdrawn(self, job: Job) -> None:
        self.withdrawn_jobs.append(job)


def _worker() -> tuple[Worker, _Executor]:
    app = pgtasks.App(NOWHERE)

    @app.task(queue="q")
    async def noop() -> None:
        return None

    worker = app.worker(queues=["q"], concurrency=1)
    executor = _Executor()
    worker._executor = executor  # type: ignore[assignment]
    return worker, executor


def _job(msg_id: int) -> Job:
    now = dt.datetime.now(dt.timezone.utc)
    return claimed("q", Message(msg_id, 1, now, now, "{}", 2, None, None, False), 30.0)


async def test_a_job_cancelled_before_its_first_step_ends_unrun_and_frees_its_slot() -> None:
    worker, executor = _worker()
    first, second = _job(1), _job(2)
    for job in (first, second):
        worker._jobs.add(job)
        worker._slots.add(job)  # the first starts (a task, not yet stepped), the second waits
    task = first.task
    assert task is not None
    assert not first.began
    assert first.cancel(CancelReason.STOP)  # before the task's first step
    await asyncio.wait_for(task, 5)
    assert not task.cancelled()  # it ran its coroutine, which saw the reason
    assert first not in executor.ran
    assert executor.withdrawn_jobs == [first]  # its outcome, by its reason, without a run
    assert first not in worker._jobs
    assert second.task is not None  # the freed slot went to the job in line
    await asyncio.wait_for(second.task, 5)
    assert executor.ran == [second]
    assert worker._slots.busy == 0
    assert not worker._jobs


async def test_a_running_job_is_cancelled_as_a_task() -> None:
    worker, executor = _worker()
    job = _job(1)
    worker._jobs.add(job)
    worker._slots.add(job)
    await asyncio.sleep(0)  # its first step: it runs
    assert job.began
    assert job.task is not None
    assert job.cancel(CancelReason.STOP)
    await asyncio.wait([job.task], timeout=5)
    assert job.task.cancelled()  # the stand-in executor does not catch it; the real one does
    assert executor.ran == [job]
    assert executor.withdrawn_jobs == []
    assert not worker._jobs
    assert worker._slots.busy == 0
