"""Worker behaviour against a real database, in-process (events, not sleeps)."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import anyio
import asyncpg
import pytest

import pgtasks
from tests.helpers import Events


async def test_burst_drains_every_job_once(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    runs: Counter[int] = Counter()

    @app.task(queue="drain")
    async def work(n: int) -> None:
        runs[n] += 1

    await app.defer_many([work.s(i) for i in range(500)])
    await app.worker(concurrency=20, burst=True, poll_interval=1).run()
    assert runs == Counter(range(500))
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_drain") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_drain") == 500


async def test_on_success_delete_leaves_no_archive(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="deleted", on_success="delete")
    async def work() -> None: ...

    await app.defer_many([work.s() for _ in range(5)])
    await app.worker(burst=True).run()
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_deleted") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_deleted") == 0


async def test_current_job_describes_the_run(app: pgtasks.App) -> None:
    seen: list[pgtasks.JobContext] = []

    @app.task(queue="ctx")
    async def work() -> None:
        seen.append(pgtasks.current_job())

    ref = await work.options(idempotency_key="ctx-1", headers={"trace": "abc"}).defer()
    await app.worker(burst=True).run()
    (job,) = seen
    assert (job.id, job.queue, job.task, job.attempt) == (ref.id, "ctx", work.name, 1)
    assert job.idempotency_key == "ctx-1"
    assert job.headers["trace"] == "abc"
    assert job.enqueued_at.tzinfo is not None
    with pytest.raises(RuntimeError, match="outside a job"):
        pgtasks.current_job()


async def test_types_round_trip_through_the_queue(app: pgtasks.App) -> None:
    got: list[object] = []

    @app.task(queue="types")
    async def work(when: dt.datetime, amounts: list[dt.date]) -> None:
        got.extend([when, amounts])

    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    await work.defer(when, [dt.date(2026, 1, 1)])
    await app.worker(burst=True).run()
    assert got == [when, [dt.date(2026, 1, 1)]]


async def test_success_marks_the_idempotency_key(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="keyed")
    async def work() -> None: ...

    ref = await work.options(idempotency_key="once").defer()
    await app.worker(burst=True).run()
    expires = await conn.fetchval(
        "SELECT expires_at - now() FROM pgtasks.idempotency_keys WHERE key = 'once'"
    )
    assert dt.timedelta(days=6, hours=23) < expires <= dt.timedelta(days=7)
    again = await work.options(idempotency_key="once").defer()
    assert again.deduplicated
    assert again.id == ref.id
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_keyed") == 0


async def test_retry_then_success_with_backoff(app: pgtasks.App) -> None:
    attempts: list[int] = []

    @app.task(queue="flaky", max_retries=3, retry_backoff=0.05, retry_jitter=False)
    async def flaky() -> None:
        attempts.append(pgtasks.current_job().attempt)
        if len(attempts) < 3:
            raise ConnectionError("try again")

    await flaky.defer()
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] == 1)
    assert attempts == [1, 2, 3]
    assert [e.retry_in for e in events.of("retried")] == [0.05, 0.1]


async def test_retries_exhausted_and_fail_go_to_dead_letters(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="doomed", max_retries=1, retry_backoff=0.01)
    async def always_fails() -> None:
        raise ValueError("nope")

    @app.task(queue="doomed")
    async def gives_up() -> None:
        raise pgtasks.Fail("card declined")

    await always_fails.defer()
    await gives_up.options(idempotency_key="pay-1").defer()
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["dead"] == 2)
    rows = await conn.fetch(
        "SELECT task, read_ct, reason, error->>'type' AS type FROM pgtasks.dead_letters "
        "ORDER BY msg_id"
    )
    assert [(r["task"], r["read_ct"], r["type"]) for r in rows] == [
        (always_fails.name, 2, "ValueError"),
        (gives_up.name, 1, "Fail"),
    ]
    assert "retries exhausted after 2 attempt(s): ValueError: nope" in rows[0]["reason"]
    assert rows[1]["reason"] == "failed: card declined"
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_doomed") == 0
    # a dead-lettered job releases its key, so the work can be enqueued again
    assert not (await gives_up.options(idempotency_key="pay-1").defer()).deduplicated


async def test_retry_signal_sets_the_delay(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    @app.task(queue="later")
    async def later() -> None:
        raise pgtasks.Retry(delay=3600)

    ref = await later.defer()
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["retried"] == 1)
    wait = await conn.fetchval(
        "SELECT vt - clock_timestamp() FROM pgmq.q_later WHERE msg_id = $1", ref.id
    )
    assert dt.timedelta(minutes=59) < wait <= dt.timedelta(hours=1)


async def test_timeout_cancels_and_counts_as_failure(app: pgtasks.App) -> None:
    @app.task(queue="slow", timeout=0.2, max_retries=0)
    async def slow() -> None:
        await anyio.sleep(60)

    await slow.defer()
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["dead"] == 1)
    assert isinstance(events.of("failed")[0].error, TimeoutError)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('"just a string"', "malformed message: the message body is a JSON string"),
        ('{"task": "x"}', "malformed message: the message body has envelope version None"),
        ('{"v": 1, "args": []}', "malformed message: the message body has no task name"),
        ('{"v": 1, "task": "T", "args": {}}', 'malformed message: "args" of task'),
        ('{"v": 1, "task": "T", "kwargs": {"nope": 1}}', "arguments do not fit the signature"),
    ],
)
async def test_poison_messages_go_to_dead_letters_at_once(
    app: pgtasks.App, conn: asyncpg.Connection, body: str, reason: str
) -> None:
    @app.task(queue="poison", name="T")
    async def t(n: int = 0) -> None: ...

    await conn.execute("SELECT pgmq.create('poison')")
    await conn.execute("SELECT pgmq.send('poison', $1::jsonb)", body)
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["dead"] == 1)
    row = await conn.fetchrow("SELECT reason, read_ct FROM pgtasks.dead_letters")
    assert row is not None
    assert reason in row["reason"]
    assert row["read_ct"] == 1
    assert events.counts["started"] == 0


async def test_unknown_task_is_retried_then_dead_lettered(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    app = pgtasks.App(db_dsn, max_retries=1, retry_backoff=0.01)

    @app.task(queue="mixed")
    async def known() -> None: ...

    await conn.execute("SELECT pgtasks.defer('mixed', 'from.the.future', '{}')")
    try:
        async with app.worker(poll_interval=30) as worker:
            events = Events(worker)
            await events.until(lambda: events.counts["dead"] == 1)
    finally:
        await app.close()
    assert events.counts["retried"] == 1
    reason = await conn.fetchval("SELECT reason FROM pgtasks.dead_letters")
    assert "'from.the.future' is not registered in this worker" in reason
    assert known.name in reason


async def test_sql_and_raw_pgmq_messages_run(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    got: list[int] = []

    @app.task(queue="outbox", name="outbox.record")
    async def record(n: int) -> None:
        got.append(n)

    await app.migrate()
    await conn.execute("SELECT pgtasks.defer('outbox', 'outbox.record', '{\"n\": 1}')")
    await conn.execute(
        'SELECT pgmq.send(\'outbox\', \'{"v": 1, "task": "outbox.record", "args": [2]}\')'
    )
    await app.worker(burst=True).run()
    assert sorted(got) == [1, 2]


async def test_attempts_beyond_the_policy_are_not_run_again(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    """A message whose runs kept crashing the worker (read_ct grew, nothing recorded) must
    not loop forever: past max_retries + 1 attempts it is dead-lettered unrun."""

    @app.task(queue="crashy", max_retries=2)
    async def crashy() -> None:
        raise AssertionError("must not run")

    ref = await crashy.defer()
    for _ in range(3):  # three claims that never finished, as if the worker died each time
        await conn.execute("SELECT pgmq.read('crashy', 0, 1)")
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["dead"] == 1)
    assert events.counts["started"] == 0
    reason = await conn.fetchval(
        "SELECT reason FROM pgtasks.dead_letters WHERE msg_id = $1", ref.id
    )
    assert "attempt 4 exceeds max_retries=2" in reason


async def test_lost_lease_is_cancelled_and_never_acked(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    cancelled = anyio.Event()

    @app.task(queue="leased", lease=3)
    async def long_job() -> None:
        try:
            await anyio.sleep(60)
        finally:
            cancelled.set()

    ref = await long_job.defer()
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["started"] == 1)
        # another consumer takes the message over (as after an expired lease)
        await conn.execute("SELECT pgmq.set_vt('leased', $1::bigint, 0)", ref.id)
        stolen = await conn.fetchval("SELECT read_ct FROM pgmq.read('leased', 60, 1)")
        assert stolen == 2
        await events.until(lambda: events.counts["lost"] == 1)
        with anyio.fail_after(5):
            await cancelled.wait()
    row = await conn.fetchrow("SELECT read_ct FROM pgmq.q_leased WHERE msg_id = $1", ref.id)
    assert row is not None  # still there for its new holder: not acked, not archived
    assert row["read_ct"] == 2
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_leased") == 0
    assert events.counts["succeeded"] == events.counts["retried"] == 0


async def test_leases_are_extended_while_a_job_runs(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    release = anyio.Event()

    @app.task(queue="longrun", lease=3)
    async def long_job() -> None:
        await release.wait()

    ref = await long_job.defer()
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["started"] == 1)
        first = await conn.fetchval("SELECT vt FROM pgmq.q_longrun WHERE msg_id = $1", ref.id)
        with anyio.fail_after(10):
            while (
                await conn.fetchval("SELECT vt FROM pgmq.q_longrun WHERE msg_id = $1", ref.id)
                == first
            ):
                await anyio.sleep(0.2)
        release.set()
        await events.until(lambda: events.counts["succeeded"] == 1)
    assert events.counts["lost"] == 0


async def test_notification_wakes_an_idle_worker(app: pgtasks.App) -> None:
    @app.task(queue="wake")
    async def work() -> None: ...

    async with app.worker(poll_interval=60) as worker:
        events = Events(worker)
        await work.defer()
        await events.until(lambda: events.counts["succeeded"] == 1, timeout=5)


async def test_delayed_job_starts_at_its_eta(app: pgtasks.App) -> None:
    started: list[float] = []

    @app.task(queue="timer")
    async def work() -> None:
        started.append(anyio.current_time())

    async with app.worker(poll_interval=60) as worker:
        events = Events(worker)
        t0 = anyio.current_time()
        await work.options(delay=1.0).defer()
        await events.until(lambda: events.counts["succeeded"] == 1, timeout=10)
    assert 0.9 <= started[0] - t0 < 2.0


async def test_poll_only_mode_still_runs_jobs(app: pgtasks.App) -> None:
    @app.task(queue="polled")
    async def work() -> None: ...

    async with app.worker(listen=False, poll_interval=0.2) as worker:
        events = Events(worker)
        await work.defer()
        await events.until(lambda: events.counts["succeeded"] == 1, timeout=5)
    assert worker.listener is None


async def test_never_claims_more_than_free_slots(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    gate = anyio.Event()

    @app.task(queue="slots")
    async def blocked() -> None:
        await gate.wait()

    await app.defer_many([blocked.s() for _ in range(20)])
    async with app.worker(concurrency=4, poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["started"] == 4)
        await anyio.sleep(0.3)  # give a faulty fetcher the chance to over-claim
        claimed = await conn.fetchval("SELECT count(*) FROM pgmq.q_slots WHERE read_ct > 0")
        assert claimed == 4
        gate.set()
        await events.until(lambda: events.counts["succeeded"] == 20)


async def test_queues_are_served_fairly(app: pgtasks.App) -> None:
    order: list[str] = []

    @app.task(queue="fair_a")
    async def a() -> None:
        order.append("a")
        await anyio.sleep(0.01)

    @app.task(queue="fair_b")
    async def b() -> None:
        order.append("b")
        await anyio.sleep(0.01)

    await app.defer_many([a.s() for _ in range(40)])
    await app.defer_many([b.s() for _ in range(40)])
    await app.worker(concurrency=2, burst=True).run()
    first = order[:20]
    assert 5 <= first.count("a") <= 15, first


async def test_stop_releases_running_jobs_at_once(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    attempts: list[int] = []
    block = True

    @app.task(queue="stopping")
    async def forever() -> None:
        attempts.append(pgtasks.current_job().attempt)
        if block:
            await anyio.sleep(3600)

    ref = await forever.defer()
    worker = app.worker(shutdown_timeout=0.2, poll_interval=30)
    async with worker:
        events = Events(worker)
        await events.until(lambda: events.counts["started"] == 1)
    row = await _held(conn, "stopping", ref.id)
    assert row["visible"]
    # a shutdown is not a failed attempt: the claim count grows (a claim token never
    # repeats), and the attempt is given back in a header
    assert (row["read_ct"], row["released"]) == (1, 1)
    assert worker.stats["released"] == 1
    block = False
    await app.worker(burst=True).run()
    assert attempts == [1, 1]


async def test_listener_reconnects_after_its_backend_is_killed(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="relisten")
    async def work() -> None: ...

    async with app.worker(poll_interval=60) as worker:
        assert worker.listener is not None
        events = Events(worker)
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'pgtasks-listener' AND datname = current_database()"
        )
        assert killed == 1
        with anyio.fail_after(10):
            while worker.listener.reconnects < 1 or not worker.listener.connected:
                await anyio.sleep(0.05)
        await work.defer()
        await events.until(lambda: events.counts["succeeded"] == 1, timeout=5)


async def test_worker_survives_killed_pool_connections(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="resilient")
    async def work() -> None: ...

    async with app.worker(poll_interval=0.5) as worker:
        events = Events(worker)
        await work.defer()
        await events.until(lambda: events.counts["succeeded"] == 1)
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE 'pgtasks%' AND datname = current_database()"
        )
        await app.defer_many([work.s() for _ in range(10)])
        await events.until(lambda: events.counts["succeeded"] == 11, timeout=15)


async def _held(conn: asyncpg.Connection, queue: str, msg_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT vt <= clock_timestamp() AS visible, read_ct, "
        "coalesce((headers->>'x-pgtasks-released')::int, 0) AS released "
        f"FROM pgmq.q_{queue} WHERE msg_id = $1",
        msg_id,
    )
    assert row is not None
    return row


async def test_a_worker_cancelled_from_outside_releases_its_jobs(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    # not stop(): the task running worker.run() is cancelled, as an embedding app's task
    # group would on its way out; the releases are still written
    @app.task(queue="outside")
    async def forever() -> None:
        await anyio.sleep(3600)

    refs = [await forever.defer() for _ in range(3)]
    worker = app.worker(poll_interval=30)
    events = Events(worker)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await events.until(lambda: events.counts["started"] == 3)
        tg.cancel_scope.cancel()
    for ref in refs:
        row = await _held(conn, "outside", ref.id)
        assert row["visible"]
        assert (row["read_ct"], row["released"]) == (1, 1)
    assert worker.stats["released"] == 3


async def test_a_forced_stop_during_a_blocked_claim_leaves_the_message_waiting(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    # a claim stuck behind a lock (here: the idempotency keys table, which the claim reads
    # for keyed messages) is abandoned by a forced stop: its connection is closed, so the
    # claim rolls back and the message is untouched
    @app.task(queue="keycheck")
    async def job() -> None: ...

    ref = await job.options(idempotency_key="k-1").defer()
    blocker = await asyncpg.connect(db_dsn)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE pgtasks.idempotency_keys IN ACCESS EXCLUSIVE MODE")
        worker = app.worker(poll_interval=30, shutdown_timeout=30)
        with anyio.fail_after(15):  # the stop does not wait for the lock
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await _wait_for_lock_wait(conn)
                worker.stop(force=True)
        await tx.rollback()
    finally:
        await blocker.close()
    row = await _held(conn, "keycheck", ref.id)
    assert row["visible"]
    assert (row["read_ct"], row["released"]) == (0, 0)


async def _wait_for_lock_wait(conn: asyncpg.Connection) -> int:
    """The pid of the worker's backend once it waits on a lock."""
    with anyio.fail_after(10):
        while not (
            pid := await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND application_name = 'pgtasks' AND datname = current_database()"
            )
        ):
            await anyio.sleep(0.02)
    assert isinstance(pid, int)
    return pid


async def test_claims_follow_visibility_time_not_message_id(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    # the claim walks the vt index: of two visible jobs, the one due first runs first,
    # whatever their ids (pgmq.read would take the lower id)
    order: list[int] = []

    @app.task(queue="due")
    async def job(n: int) -> None:
        order.append(n)

    first = await job.defer(1)
    second = await job.defer(2)
    await conn.execute(
        "UPDATE pgmq.q_due SET vt = clock_timestamp() - interval '1 minute' WHERE msg_id = $1",
        second.id,
    )
    await conn.execute(
        "UPDATE pgmq.q_due SET vt = clock_timestamp() - interval '1 second' WHERE msg_id = $1",
        first.id,
    )
    await app.worker(concurrency=1, burst=True).run()
    assert order == [2, 1]


async def test_a_released_job_keeps_its_place_in_line(app: pgtasks.App) -> None:
    # claims go in vt order; a job handed back at a stop must not queue behind the jobs
    # that became due while it ran
    order: list[str] = []
    block = True

    @app.task(queue="line")
    async def job(name: str) -> None:
        if block and name == "first":
            await anyio.sleep(3600)
        order.append(name)

    await job.defer("first")
    worker = app.worker(concurrency=1, shutdown_timeout=0, poll_interval=30)
    async with worker:
        events = Events(worker)
        await events.until(lambda: events.counts["started"] == 1)
        await job.defer("second")  # due while "first" runs
    assert worker.stats["released"] == 1
    block = False
    await app.worker(concurrency=1, burst=True).run()
    assert order == ["first", "second"]


async def test_a_one_second_lease_never_lapses_while_the_job_runs(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    # the lease keeper must tick faster than the shortest lease it keeps
    release = anyio.Event()

    @app.task(queue="short", lease=1)
    async def job() -> None:
        await release.wait()

    ref = await job.defer()
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["started"] == 1)
        lapses = 0
        deadline = anyio.current_time() + 4
        while anyio.current_time() < deadline:
            lapses += await conn.fetchval(
                "SELECT count(*) FROM pgmq.q_short WHERE msg_id = $1 AND vt <= clock_timestamp()",
                ref.id,
            )
            await anyio.sleep(0.05)
        release.set()
        await events.until(lambda: events.counts["succeeded"] == 1)
    assert lapses == 0
    assert events.counts["lost"] == 0


async def test_a_worker_rides_out_a_database_that_refuses_connections(
    app: pgtasks.App,
    server_dsn: str,
    db_dsn: str,
    conn: asyncpg.Connection,
    bouncer_port: int | None,
) -> None:
    if bouncer_port is not None:
        pytest.skip(
            "through PgBouncer, a client waits in its queue (query_wait_timeout) while the "
            "server refuses logins: the worker sees no refused connection"
        )
    # "too many clients", a database closed for maintenance: the pool cannot open a
    # connection. A job finishing meanwhile has its ack retried, not the worker crashed.
    from urllib.parse import urlsplit

    release = anyio.Event()

    @app.task(queue="outage")
    async def job() -> None:
        await release.wait()

    ref = await job.defer()
    database = urlsplit(db_dsn).path.lstrip("/")
    admin = await asyncpg.connect(server_dsn)
    try:
        async with app.worker(poll_interval=0.2) as worker:
            events = Events(worker)
            await events.until(lambda: events.counts["started"] == 1)
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE 'pgtasks%' AND datname = current_database()"
            )
            release.set()  # the job ends while no connection can be opened
            await anyio.sleep(1.5)
            assert events.counts["succeeded"] == 0
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            await events.until(lambda: events.counts["succeeded"] == 1, timeout=20)
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_outage WHERE msg_id = $1", ref.id) == 0


async def test_wait_for_returns_once_the_jobs_left_their_queues(app: pgtasks.App) -> None:
    @app.task(queue="waited", max_retries=0)
    async def job(ok: bool) -> None:
        if not ok:
            raise ValueError("no")

    @app.task(queue="waited_too")
    async def other() -> None: ...

    refs = [await job.defer(True), await job.defer(False), await other.defer()]
    with pytest.raises(TimeoutError), anyio.fail_after(0.3):  # nothing runs them yet
        await app.wait_for(refs)
    async with app.worker(poll_interval=30) as worker:
        with anyio.fail_after(20):
            await app.wait_for(refs)
    assert worker.stats["succeeded"] == 2
    assert worker.stats["dead"] == 1
    with anyio.fail_after(1):
        await app.wait_for([])  # nothing to wait for


async def test_a_claim_that_loses_its_connection_is_retried_at_once(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    # the claim's backend dies while the claim waits on a lock: the worker opens a new
    # connection and claims again within about a second (the claim rolled back with the
    # backend, so the job is untouched and runs as its first attempt)
    attempts: list[int] = []

    @app.task(queue="keyconn")
    async def job() -> None:
        attempts.append(pgtasks.current_job().attempt)

    ref = await job.options(idempotency_key="kc-1").defer()
    blocker = await asyncpg.connect(db_dsn)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE pgtasks.idempotency_keys IN ACCESS EXCLUSIVE MODE")
        async with app.worker(poll_interval=30):
            pid = await _wait_for_lock_wait(conn)
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
            await tx.rollback()
            with anyio.fail_after(5):
                await app.wait_for([ref])
        assert attempts == [1]
    finally:
        await blocker.close()
