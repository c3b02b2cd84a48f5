"""Where two parts of the worker meet: the defects an adversarial review found, one test each.

Every test here failed on the worker before the hardening (error taxonomy, job state
machine, completer as the one writer, own connections, claim tokens that never repeat), and
each names the defect it guards against (A2, A3, ... in the hardening issue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks.db import jobs
from tests.helpers import Events


async def _wait_for_lock_wait(conn: asyncpg.Connection, app_name: str = "pgtasks") -> int:
    with anyio.fail_after(10):
        while not (
            pid := await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND application_name = $1 AND datname = current_database()",
                app_name,
            )
        ):
            await anyio.sleep(0.02)
    assert isinstance(pid, int)
    return pid


# --- A2: one message must not kill the worker ----------------------------------------------


class _Hostile(Exception):
    pass


_HOSTILE_TEXTS = {
    "nul": "before\x00after",
    "surrogate": "lone \udc80 surrogate",
    "huge": "x" * 5_000_000,
}


@pytest.mark.parametrize("kind", sorted(_HOSTILE_TEXTS))
async def test_hostile_exception_text_is_recorded_cleaned_and_the_worker_goes_on(
    app: pgtasks.App, conn: asyncpg.Connection, kind: str
) -> None:
    text = _HOSTILE_TEXTS[kind]
    bad_name = type("BadType", (Exception,), {})
    bad_name.__qualname__ = "Bad\x00Type\udc80"  # a name nobody would choose, but can

    @app.task(queue="hostile", max_retries=1, retry_backoff=0.01)
    async def poison(n: int) -> None:
        raise (bad_name if n == 0 else _Hostile)(text)

    @app.task(queue="hostile")
    async def fine(n: int) -> None: ...

    refs = await app.defer_many([poison.s(0), poison.s(1), *(fine.s(i) for i in range(20))])
    async with app.worker(concurrency=30, poll_interval=0.1) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["dead"] == 2 and events.counts["succeeded"] == 20)
    dead = await conn.fetch("SELECT msg_id, reason, error FROM pgtasks.dead_letters")
    assert {r["msg_id"] for r in dead} == {refs[0].id, refs[1].id}
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_hostile") == 20
    errors = await conn.fetch("SELECT error_type, message FROM pgtasks.attempt_errors")
    assert len(errors) == 4  # two attempts of each poison job, every one recorded
    for r in errors:
        assert "\x00" not in r["message"]
        assert len(r["message"]) <= 2_000
    if kind == "nul":
        assert any("before\\x00after" in r["message"] for r in errors)
        assert any(r["error_type"].startswith("Bad\\x00Type") for r in errors)
    if kind == "surrogate":
        assert any("lone \\udc80 surrogate" in r["message"] for r in errors)


@pytest.mark.parametrize(
    ("delay", "runs_again"),
    [(1e15, False), (math.inf, False), (10**400, False), (math.nan, True), (-5.0, True)],
    ids=["1e15", "inf", "10**400", "nan", "negative"],
)
async def test_retry_with_an_absurd_delay_is_clamped(
    app: pgtasks.App, conn: asyncpg.Connection, delay: float, runs_again: bool
) -> None:
    # far-future delays are clamped to ten years; NaN means "the policy's backoff", and a
    # negative delay means now
    @app.task(queue="absurd", max_retries=3, retry_backoff=0.01, retry_jitter=False)
    async def job() -> None:
        if pgtasks.current_job().attempt == 1:
            raise pgtasks.Retry(delay=delay)

    @app.task(queue="absurd")
    async def other() -> None: ...

    ref = await job.defer()
    async with app.worker(poll_interval=0.5) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["retried"] == 1)
        await other.defer()  # the worker is alive and well
        await events.until(lambda: events.counts["succeeded"] == (2 if runs_again else 1))
    ahead = await conn.fetchval(
        "SELECT extract(epoch FROM vt - clock_timestamp()) FROM pgmq.q_absurd WHERE msg_id = $1",
        ref.id,
    )
    if runs_again:
        assert ahead is None  # ran again and acked
    else:
        assert 3.0e8 < ahead < 3.2e8  # about ten years ahead


async def test_a_queue_dropped_while_its_job_runs_does_not_stop_the_worker(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    release = anyio.Event()

    @app.task(queue="doomed")
    async def doomed() -> None:
        await release.wait()

    @app.task(queue="lasting")
    async def lasting() -> None: ...

    await doomed.defer()
    async with app.worker(poll_interval=0.5) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["started"] == 1)
        await conn.execute("SELECT pgmq.drop_queue('doomed')")
        release.set()
        await lasting.defer()
        await lasting.defer()
        await events.until(lambda: events.counts["succeeded"] == 2)
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_lasting") == 2


async def test_a_lease_extension_cancelled_by_statement_timeout_is_retried(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    # an operator's statement_timeout cancels the extension while another session locks
    # the row: a transient error, retried; the worker and the job carry on
    database = await conn.fetchval("SELECT current_database()")
    await conn.execute(f"ALTER DATABASE \"{database}\" SET statement_timeout = '300ms'")
    release = anyio.Event()

    @app.task(queue="timed", lease=1)
    async def job() -> None:
        await release.wait()

    ref = await job.defer()
    locker = await asyncpg.connect(db_dsn, server_settings={"statement_timeout": "0"})
    try:
        async with app.worker(poll_interval=30) as worker:
            events = Events(worker)
            await events.until(lambda: events.counts["started"] == 1)
            tx = locker.transaction()
            await tx.start()
            await locker.execute("SELECT 1 FROM pgmq.q_timed WHERE msg_id = $1 FOR UPDATE", ref.id)
            await anyio.sleep(1.5)  # several extensions time out meanwhile
            await tx.rollback()
            release.set()
            await events.until(lambda: events.counts["succeeded"] == 1)
        assert events.counts["lost"] == 0
    finally:
        await locker.close()


# --- A3: the same message claimed again by the same worker -----------------------------------


async def test_a_job_claimed_again_by_its_own_worker_is_tracked_as_a_new_run(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    attempts: list[int] = []
    finished: list[int] = []

    @app.task(queue="again", lease=2, max_retries=5)
    async def job() -> None:
        attempt = pgtasks.current_job().attempt
        attempts.append(attempt)
        await anyio.sleep(60 if attempt == 1 else 5)  # the second run outlives two leases
        finished.append(attempt)

    ref = await job.defer()
    async with app.worker(concurrency=2, poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["started"] == 1)
        # the lease lapses (as if the loop had been blocked): the same worker claims it again
        await conn.execute(
            "UPDATE pgmq.q_again SET vt = clock_timestamp() WHERE msg_id = $1", ref.id
        )
        await conn.execute("SELECT pg_notify('pgtasks', 'again')")
        await events.until(lambda: events.counts["succeeded"] == 1, timeout=20)
        assert worker.running == 0
    assert attempts == [1, 2]
    assert finished == [2]
    assert events.counts["lost"] == 1  # the first run's, seen on its next extension
    assert await conn.fetchval("SELECT read_ct FROM pgmq.a_again") == 2
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 0


# --- A4, A12: what a task raises is a failed attempt --------------------------------------------


@pytest.mark.parametrize(
    "raised", [asyncio.CancelledError, SystemExit, KeyboardInterrupt, GeneratorExit]
)
async def test_base_exceptions_raised_by_a_task_are_failed_attempts(
    app: pgtasks.App, conn: asyncpg.Connection, raised: type[BaseException]
) -> None:
    @app.task(queue="basex", max_retries=2, retry_backoff=0.01)
    async def job() -> None:
        raise raised()

    @app.task(queue="basex")
    async def after() -> None: ...

    ref = await job.defer()
    with anyio.fail_after(15):
        async with app.worker(poll_interval=0.2) as worker:
            events = Events(worker)
            await events.until(lambda: events.counts["dead"] == 1)
            await after.defer()
            await events.until(lambda: events.counts["succeeded"] == 1)
    # not an Exception, so not retried by the default retry_on=(Exception,); never a loop
    assert [e.task for e in events.of("started")] == [job.name, after.name]
    row = await conn.fetchrow("SELECT msg_id, reason FROM pgtasks.dead_letters")
    assert row is not None
    assert row["msg_id"] == ref.id
    assert row["reason"] == f"not retryable: {raised.__name__}"
    assert worker.stats["released"] == 0


async def test_a_task_may_opt_in_to_retrying_its_own_cancellation(app: pgtasks.App) -> None:
    @app.task(
        queue="basex2",
        max_retries=2,
        retry_backoff=0.01,
        retry_on=(Exception, asyncio.CancelledError),
    )
    async def job() -> None:
        raise asyncio.CancelledError

    await job.defer()
    async with app.worker(poll_interval=0.2) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["dead"] == 1)
    assert events.counts["started"] == 3  # 1 + max_retries


# --- A5: transactional jobs and the pool ----------------------------------------------------


async def test_transactional_jobs_do_not_starve_the_lease_keeper(db_dsn: str) -> None:
    # each transactional job holds a pooled connection while it runs; the worker's own
    # loops have connections of their own, so leases are kept and a second worker never
    # takes a job over (on the old worker every job lapsed and ran again)
    app = pgtasks.App(db_dsn, pool_max_size=2, lease=1)
    other = pgtasks.App(db_dsn)
    attempts: list[int] = []

    @app.task(queue="txs", transactional=True)
    async def slow(n: int) -> None:
        attempts.append(pgtasks.current_job().attempt)
        await anyio.sleep(2.5)

    other.task(queue="txs", name=slow.name)(slow.fn)
    try:
        await app.defer_many([slow.s(i) for i in range(3)])
        async with app.worker(concurrency=6, poll_interval=0.2) as worker:
            events = Events(worker)
            await events.until(lambda: events.counts["started"] >= 1)
            async with other.worker(concurrency=6, poll_interval=0.2) as thief:
                thieving = Events(thief)
                await events.until(lambda: events.counts["succeeded"] == 3, timeout=30)
        assert thieving.counts["started"] == 0
        assert attempts == [1, 1, 1]
        assert events.counts["lost"] == 0
    finally:
        await app.close()
        await other.close()


async def test_a_transactional_task_that_defers_on_the_pool_does_not_deadlock(
    db_dsn: str,
) -> None:
    app = pgtasks.App(db_dsn, pool_max_size=2)

    @app.task(queue="txdefer")
    async def follow_up(n: int) -> None: ...

    @app.task(queue="txdefer", transactional=True)
    async def parent(n: int) -> None:
        await anyio.sleep(0.2)
        await follow_up.defer(n)  # a pooled connection, not the job's

    try:
        await app.defer_many([parent.s(i) for i in range(4)])
        with anyio.fail_after(20):
            async with app.worker(concurrency=4, poll_interval=0.2) as worker:
                events = Events(worker)
                await events.until(lambda: events.counts["succeeded"] == 8)
    finally:
        await app.close()


async def test_transactional_tasks_need_a_pool_of_two(db_dsn: str) -> None:
    app = pgtasks.App(db_dsn, pool_max_size=1)

    @app.task(queue="txone", transactional=True)
    async def job() -> None: ...

    try:
        with pytest.raises(pgtasks.ConfigurationError, match="pool_max_size"):
            await app.worker(burst=True).run()
    finally:
        await app.close()


# --- A6, A13: the completer is the one writer -------------------------------------------------


async def test_a_lease_extension_never_overwrites_a_retry_delay(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="delayed_retry", lease=1, max_retries=3)
    async def job(n: int) -> None:
        await anyio.sleep(0.3 + (n % 7) * 0.05)  # ends near an extension, under load
        raise pgtasks.Retry(delay=600)

    await app.defer_many([job.s(i) for i in range(60)])
    async with app.worker(concurrency=60, poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["retried"] == 60)
        await anyio.sleep(1.5)  # any stale extension would land by now
    soon = await conn.fetchval(
        "SELECT count(*) FROM pgmq.q_delayed_retry WHERE vt < clock_timestamp() + interval '500 s'"
    )
    assert soon == 0


async def test_a_transactional_job_whose_commit_meets_an_extension_is_not_lost(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    # the commit takes 1.5 s (a deferred constraint trigger), holding the row lock of the
    # ack; the lease extension waits on it and then finds the row gone
    await conn.execute(
        """
        CREATE TABLE effects (n integer NOT NULL);
        CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON effects
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
        """
    )

    @app.task(queue="slowcommit", transactional=True, lease=1)
    async def pay(n: int) -> None:
        connection = pgtasks.current_job().connection
        assert connection is not None
        await connection.execute("INSERT INTO effects VALUES ($1)", n)

    await pay.defer(1)
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] == 1)
        await anyio.sleep(0.5)
    assert events.counts["lost"] == 0
    assert await conn.fetchval("SELECT count(*) FROM effects") == 1


async def test_the_completer_survives_a_deadlock(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    release = anyio.Event()

    @app.task(queue="deadlock")
    async def job() -> None:
        await release.wait()

    refs = [await job.defer(), await job.defer()]
    other = await asyncpg.connect(db_dsn)
    try:
        async with app.worker(poll_interval=30) as worker:
            events = Events(worker)
            await events.until(lambda: events.counts["started"] == 2)
            tx = other.transaction()
            await tx.start()
            await other.execute("UPDATE pgmq.q_deadlock SET vt = vt WHERE msg_id = $1", refs[1].id)
            release.set()  # one ack statement for both rows: it takes row 1, waits on row 2
            await _wait_for_lock_wait(conn)
            # the other order closes the cycle; the ack, waiting longer, is the victim
            await other.execute("UPDATE pgmq.q_deadlock SET vt = vt WHERE msg_id = $1", refs[0].id)
            await tx.rollback()
            await events.until(lambda: events.counts["succeeded"] == 2)
    finally:
        await other.close()
    assert "deadlock detected" in caplog.text
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_deadlock") == 2


# --- A8: the "already succeeded" check knows the queue -----------------------------------------


async def test_a_keyed_copy_in_another_queue_with_the_same_id_is_not_run(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    ran: list[str] = []

    @app.task(queue="origin")
    async def job(tag: str) -> None:
        ran.append(tag)

    ref = await job.options(idempotency_key="same-key").defer("first")
    await app.worker(burst=True).run()
    assert ran == ["first"]
    # a copy of the message in another queue, with the same key: its msg_id is 1 too
    await conn.execute("SELECT pgmq.create('copy')")
    copy_id = await conn.fetchval(
        "SELECT pgmq.send('copy', $1::jsonb, $2::jsonb, 0)",
        f'{{"v": 1, "task": "{job.name}", "kwargs": {{"tag": "copy"}}}}',
        '{"idempotency_key": "same-key"}',
    )
    assert copy_id == ref.id
    await app.worker(queues=["copy"], burst=True).run()
    assert ran == ["first"]
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_copy") == 1


# --- A10: one unreadable queue --------------------------------------------------------------


async def test_an_unreadable_queue_does_not_hold_back_the_others(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="gone")
    async def gone() -> None: ...

    @app.task(queue="healthy")
    async def healthy() -> None: ...

    await app.migrate()
    async with app.worker(poll_interval=0.2) as worker:
        events = Events(worker)
        # the queue's table goes (pgmq's metadata stays, so no worker recreates it)
        await conn.execute("ALTER TABLE pgmq.q_gone RENAME TO q_gone_elsewhere")
        started = time.monotonic()
        for _ in range(40):
            await healthy.defer()
            await anyio.sleep(0.05)
        await events.until(lambda: events.counts["succeeded"] == 40, timeout=10)
        assert time.monotonic() - started < 8
        assert "gone" in worker.failed_queues
    burst = app.worker(burst=True)
    with anyio.fail_after(10):
        await burst.run()
    assert set(burst.failed_queues) == {"gone"}
    assert 'relation "pgmq.q_gone" does not exist' in burst.failed_queues["gone"]


# --- A11: a job that swallows cancellation ------------------------------------------------------


async def test_a_job_that_swallows_cancellation_cannot_hold_the_worker(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    stop = False

    @app.task(queue="stubborn")
    async def stubborn() -> None:
        while not stop:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

    ref = await stubborn.defer()
    worker = app.worker(poll_interval=30, shutdown_timeout=0.5)
    try:
        with anyio.fail_after(15):
            async with worker:
                events = Events(worker)
                await events.until(lambda: events.counts["started"] == 1)
                worker.stop(force=True)
        assert worker.abandoned == 1
        row = await conn.fetchrow(
            "SELECT vt <= clock_timestamp() AS visible, headers FROM pgmq.q_stubborn "
            "WHERE msg_id = $1",
            ref.id,
        )
        assert row is not None
        assert row["visible"]  # handed back, with the attempt counted
        assert row["headers"] is None
    finally:
        stop = True


# --- A16: untrusted names in logs ----------------------------------------------------------------


async def test_a_task_name_cannot_forge_log_lines(
    app: pgtasks.App, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(queue="logs")
    async def real() -> None: ...

    await conn.execute(
        "SELECT pgtasks.send('logs', $1::jsonb)",
        '{"v": 1, "task": "evil\\nCRITICAL pgtasks: forged line"}',
    )
    with caplog.at_level(logging.DEBUG, logger="pgtasks"):
        await app.worker(burst=True, queues=["logs"]).run()
    lines = "\n".join(r.getMessage() for r in caplog.records).splitlines()
    assert not any(line.startswith("CRITICAL") for line in lines)


# --- claim tokens never repeat -----------------------------------------------------------------


async def test_a_replayed_release_cannot_touch_a_newer_claim(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="tokens")
    async def job() -> None: ...

    ref = await job.defer()
    first = await jobs.message_read(conn, "tokens", 30, 1, 1 << 20)
    token = first[0].token
    assert await jobs.messages_release(conn, "tokens", [token], [True]) == [0]
    second = await jobs.message_read(conn, "tokens", 30, 1, 1 << 20)
    assert second[0].token[:2] == (ref.id, 2)  # a new token
    # the first release, replayed (an ambiguous commit retried, say), changes nothing
    assert await jobs.messages_release(conn, "tokens", [token], [True]) == []
    acked = await jobs.messages_ack(
        conn, "tokens", [second[0].token], archive=True, key_retention=60
    )
    assert acked == [0]


# --- bodies too large to load ------------------------------------------------------------------


async def test_a_body_over_the_size_limit_is_dead_lettered_without_loading_it(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    app = pgtasks.App(db_dsn, max_message_size=100_000)

    @app.task(queue="big")
    async def job(data: str) -> None:
        raise AssertionError("must not run")

    try:
        await app.migrate()
        await conn.execute(
            "SELECT pgmq.send('big', jsonb_build_object('v', 1, 'task', $1::text, "
            "'kwargs', jsonb_build_object('data', repeat('x', 5000000))))",
            job.name,
        )
        await app.worker(burst=True).run()
    finally:
        await app.close()
    reason = await conn.fetchval("SELECT reason FROM pgtasks.dead_letters")
    assert "over the limit of 100,000 bytes" in reason
    assert "it was not loaded" in reason


async def test_the_completer_drops_an_extension_once_the_outcome_is_decided(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    # the ordering rule itself, without timing: an extension queued before or after a
    # job's retry never reaches the row once the retry is decided
    from pgtasks.worker.completer import Completer
    from pgtasks.worker.connection import OwnConnection
    from pgtasks.worker.job import Job
    from pgtasks.worker.outcome import Outcome

    @app.task(queue="order")
    async def job() -> None: ...

    await job.defer()
    await job.defer()
    claimed = await jobs.message_read(conn, "order", 30, 2, 1 << 20)
    own = OwnConnection(lambda: asyncpg.connect(db_dsn))
    completer = Completer(own, key_retention=60, emit=lambda _e: None)
    try:
        before, after = (Job("order", m, lease=1.0, attempt=1, token=m.token) for m in claimed)
        completer.submit(Outcome("extend", before, delay=1.0))  # queued first
        before.finish()
        completer.submit(Outcome("retry", before, delay=600))
        after.finish()
        completer.submit(Outcome("retry", after, delay=600))
        completer.submit(Outcome("extend", after, delay=1.0))  # a keeper that raced
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run)
            with anyio.fail_after(5):
                await completer.wait_idle()
            tg.cancel_scope.cancel()
    finally:
        own.close()
    ahead = await conn.fetch(
        "SELECT extract(epoch FROM vt - clock_timestamp()) AS s FROM pgmq.q_order"
    )
    assert [r["s"] > 500 for r in ahead] == [True, True]


async def test_the_completer_batches_a_stream_and_writes_a_lone_outcome_at_once(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # outcomes that keep coming are written at most once per interval (few replies wake
    # the worker's loop); one that comes after a quiet spell is written at once (a waiter
    # for its result does not wait out the interval)
    from pgtasks.worker import completer as completer_module
    from pgtasks.worker.completer import Completer
    from pgtasks.worker.connection import OwnConnection
    from pgtasks.worker.job import Job
    from pgtasks.worker.outcome import Outcome

    @app.task(queue="stream_acks", on_success="delete")
    async def job() -> None: ...

    await app.defer_many([job.s() for _ in range(201)])
    claimed = await jobs.message_read(conn, "stream_acks", 30, 201, 1 << 20)
    own = OwnConnection(lambda: asyncpg.connect(db_dsn))
    completer = Completer(own, key_retention=60, emit=lambda _e: None, interval=0.2)
    flushes: list[int] = []
    flush = Completer._flush

    async def counted(self: Completer) -> None:
        flushes.append(self.pending)
        await flush(self)

    monkeypatch.setattr(completer_module.Completer, "_flush", counted)

    def ack(m: jobs.Message) -> None:
        done = Job("stream_acks", m, lease=30.0, attempt=1, token=m.token)
        done.finish()
        completer.submit(Outcome("ack", done, archive=False))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run)
            began = time.monotonic()
            for m in claimed[:200]:  # 200 outcomes, one every 5 ms, for a second
                ack(m)
                await anyio.sleep(0.005)
            with anyio.fail_after(5):
                await completer.wait_idle()
            streamed = list(flushes)
            await anyio.sleep(0.1)  # a quiet spell (over a quarter of the interval)
            sent = time.monotonic()
            ack(claimed[200])
            with anyio.fail_after(5):
                await completer.wait_idle()
            lone = time.monotonic() - sent
            tg.cancel_scope.cancel()
    finally:
        own.close()
    assert sum(streamed) == 200
    # a flush at the start, then at most one per 0.2 s interval (whatever this machine's
    # sleeps add to the second the stream took)
    assert len(streamed) <= 2 + (time.monotonic() - began) / 0.2
    assert lone < 0.1  # not held for the rest of the interval
    assert flushes[len(streamed) :] == [1]
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_stream_acks") == 0


@pytest.mark.parametrize("max_retries", [0, 2])
async def test_a_claim_whose_reply_was_lost_uses_an_attempt_that_never_ran(
    app: pgtasks.App, conn: asyncpg.Connection, max_retries: int
) -> None:
    # Settled: the server claimed the message (read_ct + 1), and the reply never reached a
    # worker (its connection broke). The job comes back after the lease as its next
    # attempt; with no retries left, it is dead-lettered unrun, saying so.
    attempts: list[int] = []

    @app.task(queue="lostreply", max_retries=max_retries)
    async def job() -> None:
        attempts.append(pgtasks.current_job().attempt)

    ref = await job.defer()
    claimed = await jobs.message_read(conn, "lostreply", 1, 1, 1 << 20)  # then "lost"
    assert [m.msg_id for m in claimed] == [ref.id]
    async with app.worker(poll_interval=0.2) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] + events.counts["dead"] == 1)
    if max_retries:
        assert attempts == [2]
    else:
        assert attempts == []
        reason = await conn.fetchval("SELECT reason FROM pgtasks.dead_letters")
        assert "never received the claim" in reason
