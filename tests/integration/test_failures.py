"""Failures done right: error history, dead letters and their replay, poison fuzzing,
idempotent and transactional execution."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter

import anyio
import asyncpg
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgtasks
from tests.helpers import Events


async def test_flaky_task_succeeds_on_third_attempt_with_history(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="flaky3", max_retries=5, retry_backoff=0.01)
    async def flaky() -> None:
        attempt = pgtasks.current_job().attempt
        if attempt < 3:
            raise ConnectionError(f"boom {attempt}")

    ref = await flaky.defer()
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] == 1)
    rows = await conn.fetch(
        "SELECT attempt, error_type, message, traceback, worker FROM pgtasks.attempt_errors "
        "WHERE msg_id = $1 ORDER BY attempt",
        ref.id,
    )
    assert [(r["attempt"], r["error_type"], r["message"]) for r in rows] == [
        (1, "ConnectionError", "boom 1"),
        (2, "ConnectionError", "boom 2"),
    ]
    assert all("raise ConnectionError" in r["traceback"] for r in rows)
    assert all(":" in r["worker"] for r in rows)


async def test_dead_letter_api_shows_history_and_retry_runs_it_again(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    healthy = False
    ran: list[int] = []

    @app.task(queue="replay", max_retries=1, retry_backoff=0.01)
    async def charge(order: int) -> None:
        if not healthy:
            raise RuntimeError("provider down")
        ran.append(order)

    ref = await charge.options(idempotency_key="order-7").defer(7)
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["dead"] == 1)
    (dead,) = await app.dead_letters.list(queue="replay")
    assert (dead.msg_id, dead.task, dead.attempts) == (ref.id, charge.name, 2)
    full = await app.dead_letters.get(dead.id)
    assert full.message == {"v": 1, "task": charge.name, "kwargs": {"order": 7}}
    assert full.headers == {"idempotency_key": "order-7"}
    assert [h.attempt for h in full.history] == [1, 2]
    assert full.error is not None
    assert full.error["type"] == "RuntimeError"

    healthy = True
    (again,) = await app.dead_letters.retry([dead.id])
    assert not again.deduplicated  # the key was released when it died
    assert again.id != ref.id
    assert await app.dead_letters.list() == []
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] == 1)
    assert ran == [7]
    key_msg = await conn.fetchval(
        "SELECT msg_id FROM pgtasks.idempotency_keys WHERE key = 'order-7'"
    )
    assert key_msg == again.id


async def test_dead_letter_purge_and_retry_all(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    @app.task(queue="purgeable", max_retries=0)
    async def bad(n: int) -> None:
        raise pgtasks.Fail(f"bad {n}")

    await app.defer_many([bad.s(i) for i in range(4)])
    await app.worker(burst=True).run()
    assert len(await app.dead_letters.list()) == 4
    await conn.execute(
        "UPDATE pgtasks.dead_letters SET failed_at = now() - interval '10 days' "
        "WHERE id IN (SELECT id FROM pgtasks.dead_letters ORDER BY id LIMIT 2)"
    )
    assert await app.dead_letters.purge(older_than=dt.timedelta(days=7)) == 2
    refs = await app.dead_letters.retry_all(queue="purgeable")
    assert len(refs) == 2
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_purgeable") == 2
    assert await app.dead_letters.purge() == 0


async def test_prune_removes_old_history_but_keeps_dead_letters(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="history", max_retries=1, retry_backoff=0.01)
    async def sometimes(fail_forever: bool) -> None:
        if fail_forever or pgtasks.current_job().attempt == 1:
            raise ValueError("no")

    await sometimes.defer(False)
    await sometimes.defer(True)
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] + events.counts["dead"] == 2)
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.attempt_errors") == 3
    await conn.execute("UPDATE pgtasks.attempt_errors SET failed_at = now() - interval '30 days'")
    counts = await app.prune(archive_older_than=dt.timedelta(0))
    assert counts["errors"] == 1  # the job that succeeded in the end
    assert counts["archived"] == 1
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.attempt_errors") == 2


async def test_keyed_job_already_done_elsewhere_is_not_run_again(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    runs: list[str] = []

    @app.task(queue="dedupe_run")
    async def send_email(to: str) -> None:
        runs.append(to)

    await send_email.options(idempotency_key="welcome:1").defer("a@example.com")
    await app.worker(burst=True).run()
    # a redelivered copy that bypassed pgtasks.send's dedup (raw pgmq.send with the header)
    await conn.execute(
        "SELECT pgmq.send('dedupe_run', $1::jsonb, '{\"idempotency_key\": \"welcome:1\"}'::jsonb)",
        orjson.dumps({"v": 1, "task": send_email.name, "args": ["a@example.com"]}).decode(),
    )
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] == 1)
    assert runs == ["a@example.com"]
    assert events.of("succeeded")[0].reason == "already done"
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_dedupe_run") == 0


async def test_transactional_task_commits_writes_with_its_ack(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    await conn.execute("CREATE TABLE payments (order_id integer PRIMARY KEY)")

    @app.task(queue="payments", transactional=True, max_retries=2, retry_backoff=0.01)
    async def record_payment(order_id: int) -> None:
        job = pgtasks.current_job()
        assert job.connection is not None
        await job.connection.execute("INSERT INTO payments VALUES ($1)", order_id)
        if job.attempt == 1:
            raise ConnectionError("crash after the write: it must roll back")

    ref = await record_payment.options(idempotency_key="pay:9").defer(9)
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] == 1)
    assert await conn.fetchval("SELECT count(*) FROM payments") == 1
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_payments") == 0
    assert await conn.fetchval("SELECT msg_id FROM pgmq.a_payments") == ref.id
    expires = await conn.fetchval(
        "SELECT expires_at FROM pgtasks.idempotency_keys WHERE key = 'pay:9'"
    )
    assert expires is not None


async def test_transactional_task_that_lost_its_lease_rolls_back(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    await conn.execute("CREATE TABLE effects (n integer)")
    wrote = anyio.Event()
    proceed = anyio.Event()

    @app.task(queue="txlease", transactional=True, lease=30)
    async def effect() -> None:
        job = pgtasks.current_job()
        assert job.connection is not None
        await job.connection.execute("INSERT INTO effects VALUES (1)")
        wrote.set()
        await proceed.wait()

    ref = await effect.defer()
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await wrote.wait()
        # someone else takes the message over while the job runs
        await conn.execute(
            "UPDATE pgmq.q_txlease SET read_ct = read_ct + 1 WHERE msg_id = $1", ref.id
        )
        proceed.set()
        with anyio.fail_after(10):
            while worker.running:
                await anyio.sleep(0.02)
    assert await conn.fetchval("SELECT count(*) FROM effects") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_txlease") == 1
    assert events.counts["succeeded"] == 0


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    # what JSON text and jsonb can hold: no NUL (jsonb refuses it), no lone surrogates
    | st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["v", "task", "args", "kwargs", "x"]), children, max_size=4
        )
    ),
    max_leaves=8,
)
ENVELOPE_LIKE = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 2, "1", None])},
    optional={
        "task": st.sampled_from(["fuzz.target", "fuzz.unknown", "", None, 3]),
        "args": JSON,
        "kwargs": JSON,
    },
)


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(bodies=st.lists(JSON | ENVELOPE_LIKE, min_size=40, max_size=40))
async def test_poison_fuzz_leaves_nothing_stuck(db_dsn: str, bodies: list[object]) -> None:
    """Random JSON through raw pgmq.send: every message ends done or dead-lettered, and the
    worker stays up and keeps running good jobs."""
    app = pgtasks.App(db_dsn, max_retries=1, retry_backoff=0.01)
    done: Counter[int] = Counter()

    @app.task(queue="fuzz", name="fuzz.target")
    async def target(a: int = 0, b: str = "") -> None:
        done[a] += 1

    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("SELECT pgtasks.ensure_queue('fuzz')")
        await conn.execute("TRUNCATE pgtasks.dead_letters")
        await conn.execute("SELECT pgmq.purge_queue('fuzz')")
        ids = [
            await conn.fetchval("SELECT pgmq.send('fuzz', $1::jsonb)", orjson.dumps(b).decode())
            for b in bodies
        ]
        good = await target.defer(a=-1)
        async with app.worker(concurrency=8, poll_interval=0.2) as worker:
            with anyio.fail_after(60):
                while await conn.fetchval("SELECT count(*) FROM pgmq.q_fuzz"):
                    await asyncio.sleep(0.05)
        mine = [*ids, good.id]
        archived = {
            r[0]
            for r in await conn.fetch(
                "SELECT msg_id FROM pgmq.a_fuzz WHERE msg_id = ANY($1::bigint[])", mine
            )
        }
        dead = {r[0] for r in await conn.fetch("SELECT msg_id FROM pgtasks.dead_letters")}
        assert archived.isdisjoint(dead)
        assert archived | dead == set(mine)
        assert done[-1] == 1
        assert worker.stats["dead"] == len(dead)
    finally:
        await conn.close()
        await app.close()
