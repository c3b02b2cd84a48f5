"""Job handles: status through every state, results of every convertible type, failures,
cancellation of waiting, scheduled, retrying and running jobs, expiry; each on a real worker."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import time
import uuid
from decimal import Decimal

import anyio
import asyncpg
import pydantic
import pytest

import pgtasks
from pgtasks.db.results import job_info, job_info_direct
from tests.helpers import Events


async def _state(ref: pgtasks.JobRef[object]) -> str:
    return (await ref.status()).state


async def _both_ways(conn: asyncpg.Connection, refs: list[pgtasks.JobRef[object]]) -> set[str]:
    """The prepared look-up (what a role with table privileges uses) answers every job as
    pgtasks.job_info does; the states they are in."""
    queue, ids = refs[0].queue, [r.id for r in refs]
    infos = sorted(await job_info(conn, queue, ids))
    assert sorted(await job_info_direct(conn, queue, ids)) == infos
    return {i.state for i in infos}


async def _until_state(ref: pgtasks.JobRef[object], state: str, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while await _state(ref) != state:
            await anyio.sleep(0.02)


# --- status ----------------------------------------------------------------------------------


async def test_status_through_every_state(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    gate = anyio.Event()

    @app.task(queue="states", max_retries=1, retry_backoff=0.2, retry_jitter=False)
    async def job(kind: str) -> int:
        if kind == "block":
            await gate.wait()
        if kind == "fail" or (kind == "flaky" and pgtasks.current_job().attempt == 1):
            raise RuntimeError(f"{kind} on attempt {pgtasks.current_job().attempt}")
        return 7

    later = await job.options(delay=60).defer("ok")
    waiting = await job.defer("block")
    assert await _state(later) == "scheduled"
    assert await _state(waiting) == "waiting"
    assert await _state(app.job("states", 999)) == "unknown"
    assert await _state(app.job("no_such_queue", 1)) == "unknown"
    assert await _both_ways(conn, [later, waiting, app.job("states", 999)]) == {
        "scheduled",
        "waiting",
        "unknown",
    }
    async with app.worker(concurrency=5, poll_interval=0.1) as worker:
        events = Events(worker)
        await _until_state(waiting, "running")
        flaky = await job.defer("flaky")
        await events.until(lambda: events.counts["retried"] == 1)
        assert await _state(flaky) == "retrying"
        assert await _both_ways(conn, [waiting, flaky]) == {"running", "retrying"}
        failing = await job.defer("fail")
        gate.set()
        await _until_state(waiting, "succeeded")
        await _until_state(flaky, "succeeded")
        await _until_state(failing, "failed")
    status = await failing.status()
    assert status.final
    assert status.attempts == 2
    assert status.error is not None
    assert status.error["type"] == "RuntimeError"
    assert "retries exhausted" in status.error["reason"]
    done = await waiting.status()
    assert (done.task, done.attempts) == (job.name, 1)
    assert done.finished_at is not None
    assert await _state(later) == "scheduled"
    assert await later.cancel() == "cancelled"
    assert await _both_ways(conn, [later, waiting, flaky, failing]) == {
        "cancelled",
        "succeeded",
        "failed",
    }


# --- results ---------------------------------------------------------------------------------


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    at: dt.datetime


class Model(pydantic.BaseModel):
    id: uuid.UUID
    amount: Decimal


async def test_results_come_back_as_the_declared_type(app: pgtasks.App) -> None:
    moment = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.timezone.utc)
    ident = uuid.uuid4()

    @app.task(queue="typed")
    async def when() -> dt.datetime:
        return moment

    @app.task(queue="typed")
    async def ident_of() -> uuid.UUID:
        return ident

    @app.task(queue="typed")
    async def money() -> Decimal:
        return Decimal("1234567890.123456789012")

    @app.task(queue="typed")
    async def big() -> int:
        return 98765432109876543210

    @app.task(queue="typed")
    async def colour() -> Colour:
        return Colour.RED

    @app.task(queue="typed")
    async def point() -> Point:
        return Point(3, moment)

    @app.task(queue="typed")
    async def model() -> Model:
        return Model(id=ident, amount=Decimal("0.10"))

    @app.task(queue="typed")
    async def nested() -> dict[str, list[dt.date]]:
        return {"days": [moment.date()]}

    @app.task(queue="typed")
    async def untyped():  # type: ignore[no-untyped-def]
        return {"a": [1, 2.5, None]}

    refs = [
        await when.defer(),
        await ident_of.defer(),
        await money.defer(),
        await big.defer(),
        await colour.defer(),
        await point.defer(),
        await model.defer(),
        await nested.defer(),
        await untyped.defer(),
    ]
    async with app.worker(poll_interval=30):
        with anyio.fail_after(15):
            results = [await ref.result() for ref in refs]
    assert results == [
        moment,
        ident,
        Decimal("1234567890.123456789012"),
        98765432109876543210,
        Colour.RED,
        Point(3, moment),
        Model(id=ident, amount=Decimal("0.10")),
        {"days": [moment.date()]},
        {"a": [1, 2.5, None]},
    ]


async def test_a_task_annotated_none_keeps_no_record(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="nothing")
    async def nothing() -> None: ...

    @app.task(queue="nothing")
    async def untyped_none():  # type: ignore[no-untyped-def]
        return None

    refs = [await nothing.defer(), await untyped_none.defer()]
    await app.worker(burst=True).run()
    assert [await ref.result(timeout=5) for ref in refs] == [None, None]
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.job_results") == 0


async def test_results_that_cannot_be_kept_say_why_and_the_job_succeeds(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    app = pgtasks.App(db_dsn, max_result_size=1000)

    @app.task(queue="unkept")
    async def huge() -> str:
        return "x" * 5000

    @app.task(queue="unkept")
    async def odd() -> object:
        return object()

    @app.task(queue="unkept", keep_result=False)
    async def discreet() -> int:
        return 1

    try:
        refs = [await huge.defer(), await odd.defer(), await discreet.defer()]
        await app.worker(burst=True).run()
        assert await conn.fetchval("SELECT count(*) FROM pgmq.a_unkept") == 3
        messages = []
        for ref in refs:
            assert await _state(ref) == "succeeded"
            with pytest.raises(pgtasks.ResultUnavailable) as unavailable:
                await ref.result(timeout=5)
            messages.append(str(unavailable.value))
    finally:
        await app.close()
    assert "5,002 bytes, over the limit of 1,000 bytes" in messages[0]
    assert "could not be encoded" in messages[1]
    assert "keeps no results" in messages[2]


async def test_failed_and_cancelled_jobs_raise_and_a_timeout_leaves_the_job_alone(
    app: pgtasks.App,
) -> None:
    @app.task(queue="raising", max_retries=0)
    async def broken() -> int:
        raise ValueError("bad input \x00 here")

    @app.task(queue="raising")
    async def slow() -> int:
        await anyio.sleep(1)
        return 5

    failing = await broken.defer()
    later = await slow.options(delay=3600).defer()
    async with app.worker(poll_interval=30):
        with pytest.raises(pgtasks.JobFailed) as failed:
            await failing.result(timeout=10)
        assert failed.value.error_type == "ValueError"
        assert failed.value.error_message == "bad input \\x00 here"
        assert failed.value.traceback is not None
        assert "not retryable" in (failed.value.reason or "")
        slow_ref = await slow.defer()
        with pytest.raises(TimeoutError):
            await slow_ref.result(timeout=0.2)
        assert await slow_ref.result(timeout=10) == 5  # still ran, not cancelled
    assert await later.cancel() == "cancelled"
    with pytest.raises(pgtasks.JobCancelled):
        await later.result(timeout=5)
    with pytest.raises(pgtasks.JobNotFound):
        await app.job("raising", 12345).result(timeout=5)


async def test_a_transactional_result_commits_with_its_ack(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    await conn.execute("CREATE TABLE ledger (n integer)")

    @app.task(queue="txresult", transactional=True)
    async def book(n: int) -> int:
        connection = pgtasks.current_job().connection
        assert connection is not None
        await connection.execute("INSERT INTO ledger VALUES ($1)", n)
        return n * 2

    ref = await book.defer(21)
    async with app.worker(poll_interval=30):
        assert await ref.result(timeout=10) == 42
    assert await conn.fetchval("SELECT count(*) FROM ledger") == 1


async def test_a_thousand_waiters_share_two_connections(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    producer = pgtasks.App(db_dsn)
    worker_app = pgtasks.App(db_dsn)

    @producer.task(queue="many")
    async def square(n: int) -> int:
        return n * n

    worker_app.task(queue="many", name=square.name)(square.fn)
    try:
        refs = await producer.defer_many(square.s(i) for i in range(1000))
        results: list[int] = []
        peak = 0

        async def collect() -> None:
            values = await asyncio.gather(*(ref.result(timeout=60) for ref in refs))
            results.extend(values)

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(
                    peak,
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND application_name IN "
                        "('pgtasks', 'pgtasks-results')"
                    ),
                )
                await anyio.sleep(0.05)

        await producer.pool()  # the producer's pool is open before the worker starts
        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            await anyio.sleep(0.2)  # every waiter is registered before a job ends
            async with worker_app.worker(concurrency=50, poll_interval=30):
                await collect()
            tg.cancel_scope.cancel()
        assert results == [i * i for i in range(1000)]
        # the producer's two (one pooled connection for the look-ups, one listening) and
        # the worker's own two (fetcher, completer; its listener has another name)
        assert peak <= 2 + 2, peak
    finally:
        await producer.close()
        await worker_app.close()


# --- cancellation ----------------------------------------------------------------------------


async def test_cancel_waiting_scheduled_and_retrying_jobs(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    ran: list[str] = []

    @app.task(queue="cancels", max_retries=3)
    async def job(tag: str) -> None:
        ran.append(tag)
        if tag == "retrying":
            raise pgtasks.Retry(delay=3600)

    scheduled = await job.options(delay=3600).defer("scheduled")
    retrying = await job.defer("retrying")
    async with app.worker(queues=["cancels"], poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["retried"] == 1)
    ran.clear()
    waiting = await job.options(idempotency_key="k-waiting").defer("waiting")
    twin = await job.options(idempotency_key="k-waiting").defer("twin")
    assert twin.deduplicated  # the waiting job holds the key
    outcomes = await app.cancel([waiting, scheduled, retrying, app.job("cancels", 999)])
    assert outcomes == ["cancelled", "cancelled", "cancelled", "unknown"]
    assert [await _state(r) for r in (waiting, scheduled, retrying)] == ["cancelled"] * 3
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_cancels") == 0
    assert await waiting.cancel() == "finished"
    again = await job.options(idempotency_key="k-waiting").defer("again")
    assert not again.deduplicated  # the cancelled job's key was released
    await app.worker(burst=True).run()
    assert ran == ["again"]


@pytest.mark.parametrize("listen", [True, False])
async def test_cancel_a_running_job(app: pgtasks.App, listen: bool) -> None:
    seen: list[str] = []

    @app.task(queue="running", lease=2, max_retries=3)
    async def long() -> int:
        try:
            await anyio.sleep(60)
        except BaseException:
            seen.append(f"cancelled, requested={pgtasks.current_job().cancel_requested}")
            raise
        return 1

    ref = await long.defer()
    started = time.monotonic()
    async with app.worker(listen=listen, poll_interval=0.2) as worker:
        events = Events(worker)
        await _until_state(ref, "running")
        assert await ref.cancel() == "requested"
        assert (await ref.status()).cancel_requested
        with pytest.raises(pgtasks.JobCancelled):
            await ref.result(timeout=10)
        await events.until(lambda: events.counts["cancelled"] == 1)
    # a listening worker hears at once; a polling one at its next extension (a third of
    # the 2 s lease)
    assert time.monotonic() - started < (3 if listen else 5)
    assert seen == ["cancelled, requested=True"]
    assert events.counts["retried"] == events.counts["dead"] == 0
    assert await _state(ref) == "cancelled"


async def test_cancel_racing_completion_has_exactly_one_winner(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="race")
    async def quick(n: int) -> int:
        await anyio.sleep(0.001 * (n % 5))
        return n

    refs = await app.defer_many(quick.s(i) for i in range(200))
    async with app.worker(concurrency=20, poll_interval=0.1):
        outcomes = []
        for ref in refs[::2]:
            outcomes.append(await ref.cancel())
            await anyio.sleep(0.002)
        with anyio.fail_after(20):
            await app.wait_for(refs)
    states = [await _state(r) for r in refs]
    assert set(states) <= {"succeeded", "cancelled"}
    for ref, outcome, state in zip(refs[::2], outcomes, states[::2], strict=True):
        if outcome == "cancelled":
            assert state == "cancelled", ref
        elif outcome == "finished":
            assert state == "succeeded", ref
        else:  # requested: the run was cancelled, or it had finished first
            assert outcome == "requested"
    archived = await conn.fetchval("SELECT count(*) FROM pgmq.a_race")
    recorded = await conn.fetchval(
        "SELECT count(*) FROM pgtasks.job_results WHERE state = 'cancelled'"
    )
    assert archived + recorded == 200  # each job in exactly one place
    assert states.count("succeeded") == archived


# --- expiry ----------------------------------------------------------------------------------


async def test_a_job_not_started_before_it_expires_is_not_run(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    ran: list[int] = []

    @app.task(queue="expiring")
    async def job(n: int) -> None:
        ran.append(n)

    late = await job.options(delay=1.5, expires=1).defer(1)
    past = await job.options(
        expires=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.3)
    ).defer(2)
    fresh = await job.options(expires=dt.timedelta(minutes=5)).defer(3)
    await anyio.sleep(0.5)
    async with app.worker(poll_interval=0.2) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["expired"] == 2 and ran == [3], timeout=10)
    assert [await _state(r) for r in (late, past, fresh)] == ["expired", "expired", "succeeded"]
    with pytest.raises(pgtasks.JobExpired):
        await late.result(timeout=5)
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 0
    with pytest.raises(ValueError, match="expires"):
        job.options(expires=-1)
