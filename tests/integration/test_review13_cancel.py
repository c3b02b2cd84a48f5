"""Defects an adversarial review found in job handles, results and cancellation (issue 13),
each reproduced here against a real database (and, for the cancel of a running job, real
worker processes killed and stopped)."""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from pathlib import Path
from typing import Literal

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks.cli.worker import log_job
from tests.chaos._support import Fleet, wait_until, write_module
from tests.helpers import Events

# --- records answer only for the job they belong to -------------------------------------------


async def test_records_of_a_dropped_queue_do_not_answer_for_its_new_jobs(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="again")
    async def job(n: int) -> int:
        return n

    cancelled = await job.defer(1)
    requested = await job.defer(2)
    assert await cancelled.cancel() == "cancelled"  # a record: (again, 1) cancelled
    await conn.execute("SELECT * FROM pgmq.read('again', 60, 1)")  # job 2 runs
    assert await requested.cancel() == "requested"  # a request: (again, 2)
    await conn.execute("SELECT pgmq.drop_queue('again')")

    # the queue made again restarts its ids: new jobs 1 and 2, strangers to those records
    first, second = await job.defer(10), await job.defer(20)
    assert (first.id, second.id) == (cancelled.id, requested.id)
    status = await first.status()
    assert status.state == "waiting", status
    status = await second.status()
    assert (status.state, status.cancel_requested) == ("waiting", False), status
    # running, the new job 2 is still no concern of the old request; both new jobs run
    await conn.execute("SELECT * FROM pgmq.read('again', 60, 2)")
    status = await second.status()
    assert (status.state, status.cancel_requested) == ("running", False), status
    await conn.execute("UPDATE pgmq.q_again SET vt = now() - interval '1 second'")
    async with app.worker(queues=["again"], poll_interval=0.1):
        with anyio.fail_after(10):
            assert await first.result() == 10
            assert await second.result() == 20
    assert (await first.status()).state == "succeeded"


# --- a cancel request outlives the worker that heard it ------------------------------------------

TASKS = """
import asyncio
from pathlib import Path

import pgtasks

app = pgtasks.App(max_retries=5, retry_backoff=0.1)
STARTS = Path(__file__).with_name("starts.txt")


@app.task(queue="cancelrun", lease={lease})
async def slow(n: int) -> int:
    with STARTS.open("a") as f:
        f.write(f"{{n}}\\n")
    await asyncio.sleep(60)
    return n
"""


async def _stub(n: int) -> int:
    raise AssertionError("deferred from the test, run by the CLI workers")


def _starts(directory: Path) -> list[str]:
    path = directory / "starts.txt"
    return path.read_text().split() if path.exists() else []


async def _cancel_running_then(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection, how: str
) -> None:
    lease = 6 if how == "kill" else 60
    write_module(tmp_path, "chaostasks", TASKS.format(lease=lease))
    app = pgtasks.App(db_dsn)
    slow = app.task(queue="cancelrun", name="chaostasks.slow")(_stub)
    fleet = Fleet(tmp_path, db_dsn)
    common = ("-c", "2", "--poll-interval", "0.2", "--log-level", "INFO")
    try:
        ref = await slow.defer(7)
        # a worker that does not listen hears a request at its next lease extension, a
        # third of the 60 s lease away: the request stays pending while it is stopped
        first = fleet.start(
            *common, *(() if how == "kill" else ("--no-listen", "--shutdown-timeout", "0.5"))
        )
        await wait_until(
            lambda: _async(len(_starts(tmp_path)) == 1), timeout=20, what="the run", fleet=fleet
        )
        if how == "kill":
            fleet.kill9(first)
            assert await ref.cancel() == "requested"  # its lease still runs
        else:
            assert await ref.cancel() == "requested"
            fleet.terminate(first)
            first.popen.wait(timeout=30)
            assert first.popen.returncode == 0, first.log()
            assert (await ref.status()).state == "waiting"  # released, the request pending
        fleet.start(*common)
        with anyio.fail_after(30):
            with pytest.raises(pgtasks.JobCancelled):
                await ref.result()
        status = await ref.status()
        assert status.state == "cancelled", status
        assert _starts(tmp_path) == ["7"], fleet.logs()  # never run again
        requests = await conn.fetchval("SELECT count(*) FROM pgtasks.cancel_requests")
        assert requests == 0
    finally:
        fleet.close()
        await app.close()


async def _async(value: bool) -> bool:
    return value


async def test_a_cancel_request_is_honoured_after_its_worker_is_killed(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection
) -> None:
    await _cancel_running_then(tmp_path, db_dsn, conn, "kill")


async def test_a_cancel_request_is_honoured_after_its_worker_stops(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection
) -> None:
    await _cancel_running_then(tmp_path, db_dsn, conn, "term")


async def test_a_cancel_request_is_honoured_after_the_run_failed(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    gate = anyio.Event()
    runs: list[int] = []

    @app.task(queue="cancelretry", lease=60, max_retries=3, retry_backoff=0.1)
    async def flaky() -> int:
        runs.append(pgtasks.current_job().attempt)
        if len(runs) == 1:
            await gate.wait()
            raise RuntimeError("the first attempt fails")
        return 1

    ref = await flaky.defer()
    # poll only, and a long lease: the worker does not hear the request before the run fails
    async with app.worker(queues=["cancelretry"], listen=False, poll_interval=0.1) as worker:
        events = Events(worker)
        await events.until(lambda: len(runs) == 1)
        assert await ref.cancel() == "requested"
        gate.set()
        with anyio.fail_after(10):
            with pytest.raises(pgtasks.JobCancelled):
                await ref.result()
    assert runs == [1]
    assert (await ref.status()).state == "cancelled"
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.cancel_requests") == 0


# --- closing the app fails its waiters ----------------------------------------------------------


async def test_closing_the_app_fails_the_coroutines_awaiting_results(app: pgtasks.App) -> None:
    @app.task(queue="closing")
    async def job() -> int:
        return 1

    ref = await job.defer()
    failures: list[BaseException] = []

    async def wait() -> None:
        try:
            await ref.result()
        except pgtasks.PgTasksError as exc:
            failures.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(wait)
            await anyio.sleep(0.3)  # they wait (nobody runs the job)
            await app.close()
    assert len(failures) == 3
    assert all(isinstance(f, pgtasks.AppClosed) for f in failures)
    assert "closed" in str(failures[0])


# --- an id out of range -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 2**63, 2**70])
def test_a_handle_with_an_id_out_of_range_is_refused(bad: int) -> None:
    app = pgtasks.App("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(ValueError, match=str(bad)):
        app.job("queue", bad)
    with pytest.raises(ValueError, match=str(bad)):
        pgtasks.JobRef(bad, "queue", "task")


async def test_a_lookup_that_cannot_succeed_fails_its_waiters(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="lookups")
    async def job() -> int:
        return 1

    refs = [await job.defer(), await job.defer()]
    # both ways of looking jobs up (the prepared query calls attempts_of, as job_info does)
    await conn.execute("ALTER FUNCTION pgtasks.job_info(text, bigint[]) RENAME TO job_info_gone")
    await conn.execute("ALTER FUNCTION pgtasks.attempts_of(integer, jsonb) RENAME TO gone_of")
    with anyio.fail_after(10):
        for ref in refs:
            with pytest.raises(pgtasks.PgTasksError, match="attempts_of"):
                await ref.result()
    await conn.execute("ALTER FUNCTION pgtasks.gone_of(integer, jsonb) RENAME TO attempts_of")
    await conn.execute("ALTER FUNCTION pgtasks.job_info_gone(text, bigint[]) RENAME TO job_info")
    await app.worker(queues=["lookups"], burst=True).run()
    with anyio.fail_after(10):
        assert await refs[0].result() == 1  # the machinery still serves later waiters


async def test_a_transient_lookup_error_is_retried(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="transient")
    async def job() -> int:
        return 5

    ref = await job.defer()
    waiter = asyncio.ensure_future(ref.result())
    try:
        async with conn.transaction():
            # a look-up waits on this lock; its connection is killed (a transient error)
            await conn.execute("LOCK TABLE pgtasks.job_results IN ACCESS EXCLUSIVE MODE")
            await wait_until(lambda: _blocked(conn), timeout=10, what="a blocked look-up")
            killed = await conn.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            assert killed >= 1
            await anyio.sleep(0.5)
            assert not waiter.done()
        await app.worker(queues=["transient"], burst=True).run()
        with anyio.fail_after(10):
            assert await waiter == 5
    finally:
        waiter.cancel()


async def _blocked(conn: asyncpg.Connection) -> bool:
    count = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return bool(count)


# --- concurrent cancels -------------------------------------------------------------------------


async def test_concurrent_cancels_of_overlapping_jobs_never_deadlock(
    app: pgtasks.App, db_dsn: str
) -> None:
    @app.task(queue="overlap")
    async def job(n: int) -> None:
        pass

    a, b = await asyncpg.connect(db_dsn), await asyncpg.connect(db_dsn)
    try:
        for _ in range(5):
            ids = [r.id for r in await app.defer_many(job.s(i) for i in range(300))]
            sql = "SELECT msg_id, outcome FROM pgtasks.cancel('overlap', $1::bigint[])"
            first, second = await asyncio.gather(
                a.fetch(sql, ids), b.fetch(sql, ids[::-1]), return_exceptions=True
            )
            assert not isinstance(first, BaseException), first
            assert not isinstance(second, BaseException), second
            outcomes = {r[0]: r[1] for r in first}
            for r in second:
                assert {outcomes[r[0]], r[1]} == {"cancelled", "finished"}
    finally:
        await a.close()
        await b.close()


# --- a pool whose event loop is gone ------------------------------------------------------------


def test_an_app_used_from_one_event_loop_then_another(db_dsn: str) -> None:
    app = pgtasks.App(db_dsn)

    @app.task(queue="loops")
    async def job() -> None:
        pass

    async def use() -> int:
        ref = await job.defer()
        assert (await ref.status()).state == "waiting"
        with pytest.raises(TimeoutError):  # the waiters' machinery runs on this loop too
            await ref.result(timeout=0.3)
        return ref.id

    with warnings.catch_warnings():
        # the first loop's connections are dropped with it, unclosed
        warnings.simplefilter("ignore", ResourceWarning)
        first = asyncio.run(use())
        second = asyncio.run(use())
        asyncio.run(app.close())
        gc.collect()
    assert second == first + 1


# --- the worker command's job log --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("cancelled", "cancelled (cancelled while it ran)"),
        ("expired", "expired (expired at 2026-11-29 10:00:00+00)"),
        ("lost", "lost its lease, not acked"),
    ],
)
def test_the_job_log_says_how_a_job_ended(
    kind: Literal["cancelled", "expired", "lost"], says: str, caplog: pytest.LogCaptureFixture
) -> None:
    reason = {"cancelled": "cancelled while it ran", "expired": "expired at 2026-11-29 10:00:00+00"}
    event = pgtasks.JobEvent(kind, "q", 7, 2, "t", reason=reason.get(kind))
    with caplog.at_level(logging.INFO, logger="pgtasks.jobs"):
        log_job(event)
    assert [r.getMessage() for r in caplog.records] == [f"t[7] queue=q attempt=2 {says}"]
