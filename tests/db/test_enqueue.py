"""Enqueueing, checked against what lands in the database: the message format, delays on the
database clock, transactional enqueue, batches, idempotency keys (also under concurrency), the
SQL entry point, wake-up notifications, and validation before anything is sent."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import orjson
import pytest

import pgtasks
from pgtasks import JobRef, MessageTooLarge, SerializationError
from pgtasks.serialization import envelope

UTC = dt.timezone.utc
CHANNEL = "pgtasks"


# --- helpers ------------------------------------------------------------------------------


async def messages(conn: asyncpg.Connection, queue: str) -> list[dict[str, Any]]:
    """Every message waiting in a queue, oldest first, with JSON decoded."""
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"pgmq.q_{queue}"):
        return []
    rows = await conn.fetch(
        f"SELECT msg_id, read_ct, enqueued_at, vt, message::text AS message, "
        f"headers::text AS headers FROM pgmq.q_{queue} ORDER BY msg_id"
    )
    return [
        {
            **dict(r),
            "message": orjson.loads(r["message"]),
            "headers": orjson.loads(r["headers"]) if r["headers"] is not None else None,
        }
        for r in rows
    ]


async def count(conn: asyncpg.Connection, queue: str) -> int:
    return len(await messages(conn, queue))


async def queue_exists(conn: asyncpg.Connection, queue: str) -> bool:
    in_meta = await conn.fetchval("SELECT count(*) FROM pgmq.meta WHERE queue_name = $1", queue)
    table = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"pgmq.q_{queue}")
    assert bool(in_meta) == table, "pgmq.meta and the queue table disagree"
    return bool(table)


async def key_row(conn: asyncpg.Connection, key: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT key, queue, msg_id, expires_at FROM pgtasks.idempotency_keys WHERE key = $1", key
    )
    return row


class Notifications:
    """What a LISTEN on the pgtasks channel receives, on a connection of its own."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._received: asyncio.Queue[str] = asyncio.Queue()

    def _on(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        self._received.put_nowait(str(payload))

    async def start(self) -> None:
        await self._conn.add_listener(CHANNEL, self._on)

    async def next(self) -> str:
        with anyio.fail_after(10):
            return await self._received.get()

    async def until_now(self, via: asyncpg.Connection) -> list[str]:
        """Every payload notified by transactions committed before this call: a sentinel
        notified now arrives after all of them (delivery follows commit order)."""
        sentinel = f"sentinel-{uuid.uuid4().hex}"
        await via.execute("SELECT pg_notify($1, $2)", CHANNEL, sentinel)
        payloads = []
        while (payload := await self.next()) != sentinel:
            payloads.append(payload)
        return payloads


@pytest.fixture
async def notifications(db_dsn: str) -> AsyncIterator[Notifications]:
    listener = await asyncpg.connect(db_dsn)
    try:
        notes = Notifications(listener)
        await notes.start()
        yield notes
    finally:
        await listener.close()


# --- one job ------------------------------------------------------------------------------


async def test_defer_sends_one_versioned_envelope(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(name="emails.send", queue="emails")
    async def send(user_id: int, lang: str = "en") -> None: ...

    ref = await send.defer(42, lang="fr")
    assert ref == JobRef(ref.id, "emails", "emails.send", deduplicated=False)
    [msg] = await messages(conn, "emails")
    assert msg["msg_id"] == ref.id
    assert msg["message"] == {
        "v": 1,
        "task": "emails.send",
        "kwargs": {"user_id": 42, "lang": "fr"},
    }
    assert msg["headers"] is None
    assert msg["read_ct"] == 0
    assert msg["vt"] <= await conn.fetchval("SELECT clock_timestamp()")  # visible at once
    decoded = envelope.decode(orjson.dumps(msg["message"]))
    assert decoded == envelope.Envelope("emails.send", [], {"user_id": 42, "lang": "fr"})


async def test_calling_the_task_runs_it_and_sends_nothing(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="direct")
    async def add(a: int, b: int) -> int:
        return a + b

    assert await add(2, 3) == 5
    assert not await queue_exists(conn, "direct")


async def test_delay_is_an_alias_of_defer(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    @app.task(name="t.alias", queue="alias")
    async def job(x: int) -> None: ...

    ref = await job.delay(7)
    [msg] = await messages(conn, "alias")
    assert msg["msg_id"] == ref.id
    assert msg["message"] == {"v": 1, "task": "t.alias", "kwargs": {"x": 7}}


async def test_apply_async_takes_celery_style_arguments(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(name="t.celery", queue="celery")
    async def job(x: int, y: str = "a") -> None: ...

    ref = await job.apply_async(
        (1,), {"y": "b"}, countdown=30, queue="other", headers={"h": 1}, idempotency_key="ck"
    )
    assert (ref.queue, ref.deduplicated) == ("other", False)
    [msg] = await messages(conn, "other")
    assert msg["message"]["kwargs"] == {"x": 1, "y": "b"}
    assert msg["headers"] == {"h": 1, "idempotency_key": "ck"}
    assert 29.5 < (msg["vt"] - msg["enqueued_at"]).total_seconds() < 31
    assert await count(conn, "celery") == 0


async def test_headers_and_idempotency_key_ride_in_pgmq_headers(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="hdrs")
    async def job() -> None: ...

    await job.options(headers={"trace_id": "abc", "n": [1, 2]}).defer()
    await job.options(headers={"trace_id": "def"}, idempotency_key="order-1").defer()
    first, second = await messages(conn, "hdrs")
    assert first["headers"] == {"trace_id": "abc", "n": [1, 2]}
    assert second["headers"] == {"trace_id": "def", "idempotency_key": "order-1"}


@pytest.mark.parametrize("delay", [60, 2.5, dt.timedelta(minutes=5)])
async def test_delay_is_counted_on_the_database_clock(
    app: pgtasks.App, conn: asyncpg.Connection, delay: float | dt.timedelta
) -> None:
    @app.task(queue="later")
    async def job() -> None: ...

    seconds = delay.total_seconds() if isinstance(delay, dt.timedelta) else delay
    await job.options(delay=delay).defer()
    [msg] = await messages(conn, "later")
    assert abs((msg["vt"] - msg["enqueued_at"]).total_seconds() - seconds) < 0.5
    # not visible yet: a read claims nothing
    assert await conn.fetch("SELECT * FROM pgmq.read('later', 30, 10)") == []


async def test_eta_is_the_exact_visibility_time(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    @app.task(queue="at")
    async def job() -> None: ...

    tz = dt.timezone(dt.timedelta(hours=-7))
    eta = dt.datetime.now(tz).replace(microsecond=123_456) + dt.timedelta(hours=2)
    past = dt.datetime(2001, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    await job.options(eta=eta).defer()
    await job.options(eta=past).defer()
    future_msg, past_msg = await messages(conn, "at")
    assert future_msg["vt"] == eta
    assert past_msg["vt"] == past
    claimed = await conn.fetch("SELECT msg_id FROM pgmq.read('at', 30, 10)")
    assert [r[0] for r in claimed] == [past_msg["msg_id"]]


async def test_queue_is_created_on_first_defer(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    @app.task(queue="declared")
    async def job() -> None: ...

    assert not await queue_exists(conn, "brand_new")
    ref = await job.options(queue="brand_new").defer()
    assert ref.queue == "brand_new"
    assert await queue_exists(conn, "brand_new")
    assert [m["msg_id"] for m in await messages(conn, "brand_new")] == [ref.id]
    assert not await queue_exists(conn, "declared")  # only the queue actually used


async def test_the_prepared_send_and_the_sql_function_write_the_same_message(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    # A pooled defer without a key goes through a prepared INSERT once the queue exists, and
    # through pgtasks.send before that (which creates the queue): same message, same delays.
    app = pgtasks.App(db_dsn, pool_min_size=1, pool_max_size=1)  # one connection, reused
    try:

        @app.task(name="paths.job", queue="paths")
        async def job(i: int) -> None: ...

        eta = dt.datetime.now(UTC).replace(microsecond=0) + dt.timedelta(hours=1)
        refs = []
        for _ in range(2):  # the first round creates the queue, the second finds it
            refs.append(await job.defer(1))
            refs.append(await job.options(delay=60, headers={"trace": "t"}).defer(2))
            refs.append(await job.options(eta=eta).defer(3))
        msgs = {m["msg_id"]: m for m in await messages(conn, "paths")}
        assert [r.id for r in refs] == sorted(msgs)
        for first, second in ((refs[0], refs[3]), (refs[1], refs[4]), (refs[2], refs[5])):
            a, b = msgs[first.id], msgs[second.id]
            assert a["message"] == b["message"]
            assert a["headers"] == b["headers"]
            assert a["read_ct"] == b["read_ct"] == 0
            assert abs((a["vt"] - a["enqueued_at"]) - (b["vt"] - b["enqueued_at"])) < dt.timedelta(
                seconds=0.5
            )
        assert msgs[refs[1].id]["headers"] == {"trace": "t"}
        assert msgs[refs[5].id]["vt"] == eta
    finally:
        await app.close()


async def test_a_queue_dropped_after_a_defer_is_created_again_by_the_next(
    db_dsn: str, conn: asyncpg.Connection, notifications: Notifications
) -> None:
    app = pgtasks.App(db_dsn, pool_min_size=1, pool_max_size=1)
    try:

        @app.task(queue="phoenix")
        async def job(i: int) -> None: ...

        await job.defer(1)
        await job.defer(2)  # the prepared INSERT, now cached on the pooled connection
        assert await conn.fetchval("SELECT pgmq.drop_queue('phoenix')")
        ref = await job.defer(3)
        assert await queue_exists(conn, "phoenix")
        assert [m["msg_id"] for m in await messages(conn, "phoenix")] == [ref.id]
        again = await job.defer(4)  # the prepared INSERT finds the new table
        assert [m["msg_id"] for m in await messages(conn, "phoenix")] == [ref.id, again.id]
        assert await notifications.until_now(conn) == ["phoenix"] * 4
    finally:
        await app.close()


# --- transactional enqueue ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def rolled_back(caller: asyncpg.Connection) -> AsyncIterator[None]:
    """A transaction on the caller's connection that is always rolled back."""
    transaction = caller.transaction()
    await transaction.start()
    try:
        yield
    finally:
        await transaction.rollback()


async def test_rollback_leaves_no_message_no_key_and_no_new_queue(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    @app.task(queue="txq")
    async def job(x: int) -> None: ...

    caller = await asyncpg.connect(db_dsn)
    try:
        async with rolled_back(caller):
            ref = await job.options(connection=caller, idempotency_key="tx-key").defer(1)
            await job.options(connection=caller, queue="tx_new").defer(2)
            # inside the transaction the job is there...
            assert await caller.fetchval("SELECT count(*) FROM pgmq.q_txq") == 1
            assert ref.deduplicated is False
    finally:
        await caller.close()
    assert not await queue_exists(conn, "txq")
    assert not await queue_exists(conn, "tx_new")
    assert await key_row(conn, "tx-key") is None


async def test_commit_leaves_exactly_one_message_and_its_key(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    @app.task(queue="txc")
    async def job(x: int) -> None: ...

    await job.defer(0)  # the queue exists before the transaction
    caller = await asyncpg.connect(db_dsn)
    try:
        async with caller.transaction():
            ref = await job.options(connection=caller, idempotency_key="tx-commit").defer(1)
            assert await count(conn, "txc") == 1  # ...and is invisible to others until commit
            assert await key_row(conn, "tx-commit") is None
    finally:
        await caller.close()
    msgs = await messages(conn, "txc")
    assert [m["message"]["kwargs"] for m in msgs] == [{"x": 0}, {"x": 1}]
    key = await key_row(conn, "tx-commit")
    assert key is not None
    assert (key["queue"], key["msg_id"], key["expires_at"]) == ("txc", ref.id, None)


async def test_defer_many_on_the_callers_connection_follows_its_transaction(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    @app.task(queue="txmany")
    async def job(x: int) -> None: ...

    caller = await asyncpg.connect(db_dsn)
    try:
        async with rolled_back(caller):
            await app.defer_many([job.s(i) for i in range(5)], connection=caller)
        assert not await queue_exists(conn, "txmany")
        async with caller.transaction():
            refs = await app.defer_many([job.s(i) for i in range(5)], connection=caller)
    finally:
        await caller.close()
    assert [m["msg_id"] for m in await messages(conn, "txmany")] == [r.id for r in refs]


# --- many jobs ----------------------------------------------------------------------------


async def test_defer_many_ten_thousand_mixed_jobs_keeps_input_order(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(name="bulk.a", queue="bulk_a")
    async def a(i: int) -> None: ...

    @app.task(name="bulk.b", queue="bulk_b")
    async def b(i: int) -> None: ...

    def sig(i: int) -> pgtasks.Signature:
        if i < 6000:  # one group larger than a send_batch chunk
            return a.s(i)
        task = a if i % 2 else b
        return task.options(delay=120).s(i) if i % 3 == 0 else task.s(i)

    n = 10_000
    with anyio.fail_after(60):
        refs = await app.defer_many(sig(i) for i in range(n))
    assert len(refs) == n
    assert not any(r.deduplicated for r in refs)

    by_queue = {q: {m["msg_id"]: m for m in await messages(conn, q)} for q in ("bulk_a", "bulk_b")}
    assert sum(len(v) for v in by_queue.values()) == n  # one message per item, no more
    for i, ref in enumerate(refs):
        expected = sig(i)
        assert (ref.queue, ref.task) == (expected.queue, expected.task.name)
        msg = by_queue[ref.queue][ref.id]
        assert msg["message"]["kwargs"] == {"i": i}
        delayed = (msg["vt"] - msg["enqueued_at"]).total_seconds() > 100
        assert delayed == (expected.options.delay == 120), i


async def test_defer_many_of_nothing_sends_nothing(app: pgtasks.App) -> None:
    assert await app.defer_many([]) == []
    assert await app.defer_many(iter(())) == []


async def test_defer_many_through_both_send_paths_writes_the_same_messages(
    app: pgtasks.App, conn: asyncpg.Connection, notifications: Notifications
) -> None:
    # Without keys, one pooled statement: the first call creates the queue through
    # pgtasks.send_batch, the second takes the prepared INSERT. Same rows, same order.
    @app.task(queue="hdrs")
    async def job(i: int) -> None: ...

    def batch(base: int) -> list[pgtasks.Signature]:
        return [job.s(base), job.options(headers={"n": base + 1}).s(base + 1), job.s(base + 2)]

    first = await app.defer_many(batch(0))
    second = await app.defer_many(iter(batch(3)))  # any iterable
    delayed = await app.defer_many([job.options(delay=60).s(6), job.options(delay=60).s(7)])
    msgs = await messages(conn, "hdrs")
    assert [m["msg_id"] for m in msgs] == [r.id for r in first + second + delayed]
    assert all(r.queue == "hdrs" and not r.deduplicated for r in first + second + delayed)
    assert [m["headers"] for m in msgs] == [None, {"n": 1}, None, None, {"n": 4}, None, None, None]
    assert [m["message"]["kwargs"]["i"] for m in msgs] == list(range(8))
    assert [(m["vt"] - m["enqueued_at"]).total_seconds() > 50 for m in msgs] == [False] * 6 + [
        True
    ] * 2
    assert msgs[6]["vt"] == msgs[7]["vt"]  # one visibility time per batch, as pgmq's
    assert await notifications.until_now(conn) == ["hdrs"] * 3


async def test_defer_many_deduplicates_per_item(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    @app.task(queue="keyed")
    async def job(i: int) -> None: ...

    held = await job.options(idempotency_key="held-before").defer(-1)
    sigs = [
        job.s(0),
        job.options(idempotency_key="k1").s(1),
        job.options(idempotency_key="held-before").s(2),
        job.options(idempotency_key="k1").s(3),  # the same key twice in one batch
        job.options(idempotency_key="k2", delay=60).s(4),  # another group, same queue
        job.s(5),
        job.options(idempotency_key="k2").s(6),  # k2 again, from a different group
    ]
    refs = await app.defer_many(sigs)
    dedup = [r.deduplicated for r in refs]
    assert dedup[:4] == [False, False, True, True]
    assert dedup[5] is False
    assert sorted([dedup[4], dedup[6]]) == [False, True]  # one of the two k2 items is sent
    k2 = refs[4] if not dedup[4] else refs[6]
    assert refs[2].id == held.id
    assert refs[3].id == refs[1].id
    assert refs[6].id == refs[4].id
    kwargs_by_id = {m["msg_id"]: m["message"]["kwargs"]["i"] for m in await messages(conn, "keyed")}
    assert len(kwargs_by_id) == 5
    assert {-1, 0, 1, 5} < set(kwargs_by_id.values())
    assert kwargs_by_id[refs[1].id] == 1
    assert kwargs_by_id[k2.id] in (4, 6)
    for key, ref in (("k1", refs[1]), ("k2", k2), ("held-before", held)):
        row = await key_row(conn, key)
        assert row is not None
        assert row["msg_id"] == ref.id


async def test_defer_many_the_first_item_with_a_key_wins(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="keyed_order")
    async def job(i: int) -> None: ...

    first_with_key = job.options(idempotency_key="k", delay=60).s(1)
    second_with_key = job.options(idempotency_key="k").s(2)
    refs = await app.defer_many([job.s(0), first_with_key, second_with_key])
    assert [r.deduplicated for r in refs] == [False, False, True]
    assert [m["message"]["kwargs"]["i"] for m in await messages(conn, "keyed_order")] == [0, 1]


# --- idempotency keys ---------------------------------------------------------------------


async def test_a_held_key_returns_the_existing_job_and_sends_nothing(
    app: pgtasks.App, conn: asyncpg.Connection, notifications: Notifications
) -> None:
    @app.task(name="pay.charge", queue="pay")
    async def charge(order: int) -> None: ...

    first = await charge.options(idempotency_key="order-7").defer(7)
    again = await charge.options(idempotency_key="order-7").defer(8)
    assert first.deduplicated is False
    assert again == JobRef(first.id, "pay", "pay.charge", deduplicated=True)
    assert [m["message"]["kwargs"] for m in await messages(conn, "pay")] == [{"order": 7}]
    assert await notifications.until_now(conn) == ["pay"]  # the duplicate did not notify


async def test_a_key_whose_message_was_deleted_by_hand_is_reclaimed(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="reclaim")
    async def job(n: int) -> None: ...

    first = await job.options(idempotency_key="k").defer(1)
    assert await conn.fetchval("SELECT pgmq.delete('reclaim', $1::bigint)", first.id)
    second = await job.options(idempotency_key="k").defer(2)
    assert second.deduplicated is False
    assert second.id != first.id
    assert [m["message"]["kwargs"] for m in await messages(conn, "reclaim")] == [{"n": 2}]
    row = await key_row(conn, "k")
    assert row is not None
    assert row["msg_id"] == second.id


async def test_a_key_holds_after_success_until_it_expires(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="done")
    async def job(n: int) -> None: ...

    first = await job.options(idempotency_key="k").defer(1)
    # what the worker's ack does: archive the message, start the key's retention
    await conn.execute("SELECT pgmq.archive('done', $1::bigint)", first.id)
    await conn.execute(
        "UPDATE pgtasks.idempotency_keys SET expires_at = now() + interval '1 hour' WHERE key = 'k'"
    )
    held = await job.options(idempotency_key="k").defer(2)
    assert (held.id, held.deduplicated) == (first.id, True)
    assert await count(conn, "done") == 0

    await conn.execute(
        "UPDATE pgtasks.idempotency_keys SET expires_at = now() - interval '1 second' "
        "WHERE key = 'k'"
    )
    fresh = await job.options(idempotency_key="k").defer(3)
    assert fresh.deduplicated is False
    assert [m["message"]["kwargs"] for m in await messages(conn, "done")] == [{"n": 3}]


@pytest.mark.parametrize("queue_exists_before", [True, False])
async def test_concurrent_defers_of_one_key_send_exactly_one_message(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection, queue_exists_before: bool
) -> None:
    @app.task(queue="race")
    async def job(n: int) -> None: ...

    if queue_exists_before:
        await conn.execute("SELECT pgtasks.ensure_queue('race')")
    callers = [await asyncpg.connect(db_dsn) for _ in range(20)]
    ready = 0
    all_ready, start = asyncio.Event(), asyncio.Event()

    async def one(caller: asyncpg.Connection, n: int) -> JobRef[Any]:
        nonlocal ready
        async with caller.transaction():
            await caller.execute("SELECT 1")  # the transaction is open on the server
            ready += 1
            if ready == len(callers):
                all_ready.set()
            await start.wait()  # every transaction is open before any defer starts
            return await job.options(connection=caller, idempotency_key="once").defer(n)

    try:
        with anyio.fail_after(30):
            tasks = [asyncio.ensure_future(one(c, n)) for n, c in enumerate(callers)]
            await all_ready.wait()
            start.set()
            refs = await asyncio.gather(*tasks)
    finally:
        for c in callers:
            await c.close()
    assert sum(not r.deduplicated for r in refs) == 1
    assert len({r.id for r in refs}) == 1
    [msg] = await messages(conn, "race")
    assert msg["msg_id"] == refs[0].id
    assert msg["headers"] == {"idempotency_key": "once"}


async def test_concurrent_defers_of_one_key_from_many_apps_send_exactly_one_message(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    apps = [pgtasks.App(db_dsn, pool_min_size=1, pool_max_size=1) for _ in range(10)]

    async def job(n: int) -> None: ...

    tasks = [a.task(name="race.apps", queue="race_apps")(job) for a in apps]
    try:
        for a in apps:  # connect first, so the defers themselves overlap
            await a.pool()
        with anyio.fail_after(30):
            refs = await asyncio.gather(
                *(t.options(idempotency_key="shared").defer(n) for n, t in enumerate(tasks))
            )
    finally:
        for a in apps:
            await a.close()
    assert sum(not r.deduplicated for r in refs) == 1
    assert len({r.id for r in refs}) == 1
    assert await count(conn, "race_apps") == 1


async def test_a_key_held_in_another_queue_refers_to_that_queue(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="first_q")
    async def job() -> None: ...

    first = await job.options(idempotency_key="cross").defer()
    again = await job.options(idempotency_key="cross", queue="second_q").defer()
    assert again.deduplicated
    assert (again.queue, again.id) == ("first_q", first.id)


async def test_prune_deletes_only_expired_keys(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    await conn.execute(
        """
        INSERT INTO pgtasks.idempotency_keys (key, queue, msg_id, expires_at) VALUES
            ('expired', 'q', 1, now() - interval '1 minute'),
            ('retained', 'q', 2, now() + interval '1 day'),
            ('waiting', 'q', 3, NULL)
        """
    )
    counts = await app.prune()
    assert counts["keys"] == 1
    left = await conn.fetch("SELECT key FROM pgtasks.idempotency_keys ORDER BY key")
    assert [r[0] for r in left] == ["retained", "waiting"]
    assert (await app.prune())["keys"] == 0


# --- SQL entry point and notifications ----------------------------------------------------


async def test_sql_defer_sends_a_well_formed_envelope_and_notifies(
    conn: asyncpg.Connection, notifications: Notifications
) -> None:
    msg_id = await conn.fetchval("SELECT pgtasks.defer('sqlq', 'mod.task', '{\"a\": 1}')")
    assert await notifications.next() == "sqlq"
    [msg] = await messages(conn, "sqlq")
    assert msg["msg_id"] == msg_id
    assert msg["message"] == {"v": 1, "task": "mod.task", "args": [], "kwargs": {"a": 1}}
    assert envelope.decode(orjson.dumps(msg["message"])) == envelope.Envelope(
        "mod.task", [], {"a": 1}
    )
    delayed = await conn.fetchval("SELECT pgtasks.defer('sqlq', 'mod.task', '{}', 90)")
    wait = await conn.fetchval(
        "SELECT extract(epoch FROM vt - enqueued_at)::float8 FROM pgmq.q_sqlq WHERE msg_id = $1",
        delayed,
    )
    assert 89.5 < wait < 91
    with pytest.raises(asyncpg.InvalidParameterValueError, match="invalid queue name"):
        await conn.fetchval("SELECT pgtasks.defer('Bad Queue', 'mod.task')")


async def test_defer_notifies_with_the_queue_name(
    app: pgtasks.App, conn: asyncpg.Connection, notifications: Notifications
) -> None:
    @app.task(queue="noisy")
    async def job() -> None: ...

    await job.defer()
    await job.options(queue="elsewhere", delay=30).defer()  # a delayed job notifies too
    assert await notifications.until_now(conn) == ["noisy", "elsewhere"]


async def test_defer_many_notifies_once_per_queue_and_transaction(
    app: pgtasks.App, conn: asyncpg.Connection, notifications: Notifications
) -> None:
    @app.task(queue="nq_one")
    async def one(i: int) -> None: ...

    @app.task(queue="nq_two")
    async def two(i: int) -> None: ...

    sigs = [one.s(i) for i in range(50)]
    sigs += [one.options(delay=10).s(i) for i in range(50)]  # a second group, same queue
    sigs += [two.s(i) for i in range(50)]
    await app.defer_many(sigs)
    assert sorted(await notifications.until_now(conn)) == ["nq_one", "nq_two"]

    await app.defer_many([one.s(i) for i in range(20)])
    assert await notifications.until_now(conn) == ["nq_one"]


async def test_no_notification_on_rollback(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection, notifications: Notifications
) -> None:
    @app.task(queue="silent")
    async def job(i: int) -> None: ...

    caller = await asyncpg.connect(db_dsn)
    try:
        async with rolled_back(caller):
            await job.options(connection=caller).defer(1)
            await app.defer_many([job.s(2), job.s(3)], connection=caller)
    finally:
        await caller.close()
    assert await notifications.until_now(conn) == []


# --- validation before sending ------------------------------------------------------------


class Unencodable:
    pass


async def test_an_unencodable_argument_sends_nothing(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(name="t.bad", queue="val")
    async def job(payload: object) -> None: ...

    with pytest.raises(SerializationError, match=r"task 't\.bad'.*argument 'payload'"):
        await job.defer(Unencodable())
    with pytest.raises(SerializationError, match="argument 'payload'"):
        await app.defer_many([job.s(1), job.s(Unencodable()), job.s(3)])
    with pytest.raises(TypeError, match=r"task 't\.bad': missing a required argument"):
        await app.defer_many([job.s(1), job.s(2), job.s()])  # type: ignore[call-arg]
    assert await count(conn, "val") == 0


async def test_an_oversize_message_sends_nothing(db_dsn: str, conn: asyncpg.Connection) -> None:
    app = pgtasks.App(db_dsn, max_message_size=200)

    @app.task(name="t.big", queue="val_big")
    async def job(data: str) -> None: ...

    try:
        with pytest.raises(MessageTooLarge, match=r"over the limit of 200 bytes"):
            await job.defer("x" * 300)
        with pytest.raises(MessageTooLarge):
            await app.defer_many([job.s("small"), job.s("x" * 300)])
        ref = await job.defer("x" * 100)  # under the limit: sent
    finally:
        await app.close()
    assert [m["msg_id"] for m in await messages(conn, "val_big")] == [ref.id]


async def test_an_argument_of_the_wrong_type_sends_nothing(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(name="t.add", queue="val_types")
    async def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(TypeError, match=r"task 't\.add': argument 'a' must be int, got '1'"):
        await add.defer("1", [2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"argument 'b' must be int, got \[2\] \(list\)"):
        await app.defer_many([add.s(1, 2), add.s(1, [2])])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"argument 'a' must be int, got True \(bool\)"):
        await add.options(idempotency_key="k").defer(True, 2)
    assert await count(conn, "val_types") == 0
    assert await key_row(conn, "k") is None


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"delay": float("nan")}, ValueError, "delay must be a number of seconds (got nan)"),
        ({"delay": float("inf")}, ValueError, "delay must be at most 3,650 days"),
        ({"delay": 1e300}, ValueError, "delay must be at most 3,650 days"),
        (
            {"eta": dt.datetime.max.replace(tzinfo=dt.timezone(dt.timedelta(hours=-5)))},
            ValueError,
            "is out of range in UTC",
        ),
        ({"headers": {"idempotency_key": "k"}}, ValueError, "options(idempotency_key=...)"),
        ({"headers": {"x-pgtasks-key": "k"}}, ValueError, "reserved for pgtasks' own metadata"),
        ({"headers": ["a"]}, TypeError, "headers must be a mapping of names (strings)"),
    ],
    ids=["nan", "inf", "1e300", "eta-beyond-utc", "key-header", "reserved-header", "list"],
)
async def test_options_the_database_cannot_honour_are_refused_before_sending(
    app: pgtasks.App,
    db_dsn: str,
    conn: asyncpg.Connection,
    options: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    @app.task(queue="val_opts")
    async def job(i: int) -> None: ...

    caller = await asyncpg.connect(db_dsn)
    try:
        with pytest.raises(error, match=re.escape(message)):
            await job.options(**options).defer(1)
        with pytest.raises(error, match=re.escape(message)):
            await job.options(connection=caller, **options).defer(1)
        with pytest.raises(error, match=re.escape(message)):
            await app.defer_many([job.s(0), job.options(**options).s(1)])
        with pytest.raises(error, match=re.escape(message)):
            await job.apply_async((1,), **_celery(options))
    finally:
        await caller.close()
    assert await count(conn, "val_opts") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.idempotency_keys") == 0


def _celery(options: dict[str, Any]) -> dict[str, Any]:
    """``options(...)`` arguments as ``apply_async`` names them."""
    return {("countdown" if k == "delay" else k): v for k, v in options.items()}


# --- database errors, as errors a user can act on -------------------------------------------


async def test_defer_on_a_database_that_was_never_migrated_says_to_migrate(
    empty_db_dsn: str,
) -> None:
    app = pgtasks.App(empty_db_dsn)

    @app.task(queue="nowhere")
    async def job(i: int) -> None: ...

    caller = await asyncpg.connect(empty_db_dsn)
    try:
        attempts: list[Callable[[], Awaitable[Any]]] = [
            lambda: job.defer(1),
            lambda: job.options(idempotency_key="k").defer(1),
            lambda: job.options(connection=caller).defer(1),
            lambda: app.defer_many([job.s(1), job.s(2)]),
            lambda: app.defer_many([job.s(1)], connection=caller),
        ]
        for attempt in attempts:
            with pytest.raises(pgtasks.SchemaMissing) as info:
                await attempt()
            assert "run 'python -m pgtasks migrate" in str(info.value)
            assert isinstance(info.value, pgtasks.PgTasksError)
            assert isinstance(info.value.__cause__, asyncpg.PostgresError)  # kept for debugging
    finally:
        await caller.close()
        await app.close()


@contextlib.asynccontextmanager
async def role_without_privileges(conn: asyncpg.Connection) -> AsyncIterator[str]:
    """A login role of this test's own (the server is shared: never a fixed name), with no
    privilege on pgmq or pgtasks; dropped afterwards."""
    role = f"pgtasks_norole_{uuid.uuid4().hex[:12]}"
    await conn.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        yield role
    finally:
        await conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def as_user(dsn: str, user: str) -> str:
    """The same DSN (host, port, database, query) for another user, without a password."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rpartition('@')[2]}"))


async def test_defer_as_a_role_without_privileges_is_permission_denied(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    @app.task(queue="guarded")
    async def job(i: int) -> None: ...

    await job.defer(0)  # the queue exists: what is missing is the privilege
    async with role_without_privileges(conn) as role:
        as_role = pgtasks.App(as_user(db_dsn, role))
        try:
            their_job = as_role.task(queue="guarded", name=job.name)(job.fn)
            attempts: list[Callable[[], Awaitable[Any]]] = [
                lambda: their_job.defer(1),  # the prepared INSERT
                lambda: their_job.options(idempotency_key="k").defer(1),  # pgtasks.send
                lambda: as_role.defer_many([their_job.s(1), their_job.s(2)]),
            ]
            for attempt in attempts:
                with pytest.raises(pgtasks.PermissionDenied) as info:
                    await attempt()
                assert "permission denied" in str(info.value)
                assert "grant this role the privileges pgtasks needs" in str(info.value)
        finally:
            await as_role.close()
        caller = await asyncpg.connect(db_dsn)
        try:
            await caller.execute(f'SET ROLE "{role}"')
            with pytest.raises(pgtasks.PermissionDenied):
                await job.options(connection=caller).defer(3)
        finally:
            await caller.close()
    assert [m["message"]["kwargs"] for m in await messages(conn, "guarded")] == [{"i": 0}]


async def test_a_value_the_database_refuses_is_a_database_error(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="refused")
    async def job() -> None: ...

    # jsonb cannot hold a NUL character; pgtasks does not look inside headers' values
    with pytest.raises(pgtasks.DatabaseError, match="the database refused a value"):
        await job.options(headers={"note": "a\x00b"}).defer()
    assert await count(conn, "refused") == 0


async def test_a_lock_timeout_on_the_callers_connection_is_transient(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    @app.task(queue="locked")
    async def job() -> None: ...

    await job.defer()
    holder, caller = await asyncpg.connect(db_dsn), await asyncpg.connect(db_dsn)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE pgmq.q_locked IN ACCESS EXCLUSIVE MODE")
            await caller.execute("SET lock_timeout = '100ms'")
            with pytest.raises(pgtasks.DatabaseUnavailable) as info:
                await job.options(connection=caller).defer()
        assert "refused it for now (LockNotAvailableError" in str(info.value)
        assert "nothing was enqueued" in str(info.value)
    finally:
        await holder.close()
        await caller.close()
    assert await count(conn, "locked") == 1


@pytest.mark.parametrize("cache", [100, 0])
async def test_statement_cache_size_zero_prepares_nothing_on_the_server(
    db_dsn: str, conn: asyncpg.Connection, cache: int
) -> None:
    # 0 is for PgBouncer in transaction mode before 1.21: no named prepared statements
    app = pgtasks.App(db_dsn, pool_min_size=1, pool_max_size=1, statement_cache_size=cache)
    try:

        @app.task(queue="bouncer")
        async def job(i: int) -> None: ...

        refs = [await job.defer(i) for i in range(3)]  # the function, then the prepared INSERT
        refs += await app.defer_many([job.s(i) for i in range(3, 6)])
        async with app.worker(poll_interval=30):
            with anyio.fail_after(20):
                await app.wait_for(refs)
        pool = await app.pool()
        async with pool.acquire() as pooled:  # the one connection that did all of it
            prepared = await pooled.fetchval("SELECT count(*) FROM pg_prepared_statements")
    finally:
        await app.close()
    assert await count(conn, "bouncer") == 0
    if cache:
        assert prepared > 1  # pgtasks' statements, besides this query itself
    else:
        assert prepared == 0
