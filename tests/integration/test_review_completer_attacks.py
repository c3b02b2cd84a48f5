"""Attacks on the completer's quiet-spell flush (a lone outcome written at once, a full
batch ending the wait) and on the executor's checks inlined in `run`, against a real
database: outcomes left pending, drains that hang, transient failures in a flush, leases
extended late, and early exits that record more or less than one outcome."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import asyncpg
import orjson
import pytest

import pgtasks
from pgtasks.db import jobs
from pgtasks.worker import completer as completer_module
from pgtasks.worker import executor as executor_module
from pgtasks.worker.completer import Completer
from pgtasks.worker.connection import OwnConnection
from pgtasks.worker.job import Job
from pgtasks.worker.outcome import Outcome
from tests.helpers import Events


async def _claim(app: pgtasks.App, conn: asyncpg.Connection, queue: str, n: int) -> list[Any]:
    @app.task(queue=queue, name=f"{queue}.job", on_success="delete")
    async def job() -> None: ...

    await app.defer_many([job.s() for _ in range(n)])
    claimed = await jobs.message_read(conn, queue, 60, n, 1 << 20)
    assert len(claimed) == n
    return claimed


def _acker(completer: Completer, queue: str, archive: bool = False) -> Callable[[Any], Job]:
    def ack(m: Any) -> Job:
        done = Job(queue, m, lease=60.0, attempt=1, token=m.token)
        done.finish()
        completer.submit(Outcome("ack", done, archive=archive))
        return done

    return ack


async def _terminate(conn: asyncpg.Connection, pid: int) -> None:
    await conn.execute("SELECT pg_terminate_backend($1)", pid)
    with anyio.fail_after(10):  # gone for real before the statement goes out
        while await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            await anyio.sleep(0.01)


async def test_a_random_stream_with_killed_backends_leaves_nothing_pending(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bursts, trickles, quiet spells and full batches, while the completer's backend is
    # terminated right before some of its writes: every outcome is written in the end and
    # wait_idle returns (nothing stuck pending while the loop waits for a wake-up)
    queue = "fuzz_acks"
    claimed = await _claim(app, conn, queue, 400)
    own = OwnConnection(lambda: asyncpg.connect(db_dsn))
    completer = Completer(own, key_retention=60, emit=lambda _e: None, interval=0.02, batch_size=7)
    ack = _acker(completer, queue)
    real_ack = jobs.messages_ack
    rng = random.Random(7)
    kills = 0

    async def flaky_ack(c: asyncpg.Connection, *args: Any, **kwargs: Any) -> list[int]:
        nonlocal kills
        if rng.random() < 0.15:
            kills += 1
            await _terminate(conn, c.get_server_pid())
        return await real_ack(c, *args, **kwargs)

    monkeypatch.setattr(jobs, "messages_ack", flaky_ack)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run)
            i = 0
            while i < len(claimed):
                burst = rng.choice([1, 1, 2, 3, 7, 9, 20])
                for m in claimed[i : i + burst]:
                    ack(m)
                    if rng.random() < 0.5:
                        await anyio.sleep(rng.choice([0, 0.001, 0.003, 0.006]))
                i += burst
                await anyio.sleep(rng.choice([0, 0.002, 0.004, 0.012, 0.03]))
            with anyio.fail_after(60):
                await completer.wait_idle()
            tg.cancel_scope.cancel()
    finally:
        own.close()
    assert kills > 0
    assert completer.pending == 0
    assert await conn.fetchval(f"SELECT count(*) FROM pgmq.q_{queue}") == 0


async def test_a_full_batch_ends_the_wait_for_the_interval(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    queue = "full_mid_wait"
    claimed = await _claim(app, conn, queue, 11)
    own = OwnConnection(lambda: asyncpg.connect(db_dsn))
    completer = Completer(own, key_retention=60, emit=lambda _e: None, interval=30, batch_size=5)
    ack = _acker(completer, queue)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run)
            ack(claimed[0])  # after a quiet spell: at once
            with anyio.fail_after(10):
                await completer.wait_idle()
            for m in claimed[1:5]:  # 4 of 5: the loop waits for the interval (30 s)
                ack(m)
            await anyio.sleep(0.3)
            assert completer.pending == 4
            ack(claimed[5])  # the batch is full mid-wait: written now, not in 30 s
            with anyio.fail_after(10):
                await completer.wait_idle()
            assert completer.pending == 0
            for m in claimed[6:]:  # a full batch at once, right after a flush
                ack(m)
            with anyio.fail_after(10):
                await completer.wait_idle()
            tg.cancel_scope.cancel()
    finally:
        own.close()
    assert await conn.fetchval(f"SELECT count(*) FROM pgmq.q_{queue}") == 0


async def test_a_lone_outcome_after_each_quiet_spell_is_not_held(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    # a trickle (each outcome after a quiet spell) is written one by one at once, never
    # held for the interval (here 20 s, so that any hold is unmistakable)
    queue = "trickle"
    claimed = await _claim(app, conn, queue, 8)
    own = OwnConnection(lambda: asyncpg.connect(db_dsn))
    completer = Completer(own, key_retention=60, emit=lambda _e: None, interval=20)
    ack = _acker(completer, queue)
    took: list[float] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run)
            for m in claimed:
                await anyio.sleep(5.1 + random.random() * 0.3)  # > interval / 4
                t0 = time.monotonic()
                ack(m)
                with anyio.fail_after(10):
                    await completer.wait_idle()
                took.append(time.monotonic() - t0)
            tg.cancel_scope.cancel()
    finally:
        own.close()
    assert max(took) < 5, took


async def test_drain_writes_what_waits_for_the_interval_and_a_flush_killed_in_flight(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = "drain_wait"
    claimed = await _claim(app, conn, queue, 30)
    own = OwnConnection(lambda: asyncpg.connect(db_dsn))
    completer = Completer(own, key_retention=60, emit=lambda _e: None, interval=30)
    ack = _acker(completer, queue)
    real_ack = jobs.messages_ack
    entered = anyio.Event()
    release = anyio.Event()

    async def slow_ack(c: asyncpg.Connection, *args: Any, **kwargs: Any) -> list[int]:
        if not entered.is_set():
            entered.set()
            await release.wait()
            await _terminate(conn, c.get_server_pid())  # this write fails: transient
        return await real_ack(c, *args, **kwargs)

    monkeypatch.setattr(jobs, "messages_ack", slow_ack)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run)
            ack(claimed[0])  # at once, and held in flight
            with anyio.fail_after(10):
                await entered.wait()
            for m in claimed[1:]:  # wait for the interval behind it
                ack(m)
            tg.cancel_scope.cancel()  # the run loop is cancelled with a flush in flight
            release.set()
        with anyio.fail_after(30):
            await completer.drain(timeout=20)
    finally:
        own.close()
    assert completer.pending == 0
    assert completer.closed
    assert await conn.fetchval(f"SELECT count(*) FROM pgmq.q_{queue}") == 0


async def test_a_transient_failure_confirming_a_replayed_ack_is_retried(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an ack is written but its reply is lost (the backend is killed after it commits);
    # the replay finds nothing and asks the archive, and that query too meets a killed
    # backend: the flush is tried again later, the completer's loop goes on
    queue = "replay_confirm"
    claimed = await _claim(app, conn, queue, 2)
    own = OwnConnection(lambda: asyncpg.connect(db_dsn))
    completer = Completer(own, key_retention=60, emit=lambda _e: None, interval=0.01)
    ack = _acker(completer, queue, archive=True)
    real_ack = jobs.messages_ack
    real_archived = jobs.messages_archived
    calls: Counter[str] = Counter()

    async def lost_reply(c: asyncpg.Connection, *args: Any, **kwargs: Any) -> list[int]:
        calls["ack"] += 1
        done = await real_ack(c, *args, **kwargs)
        if calls["ack"] == 1:
            await _terminate(conn, c.get_server_pid())
            await c.fetchval("SELECT 1")  # the reply that never came: a real broken link
        return done

    async def archived(c: asyncpg.Connection, *args: Any, **kwargs: Any) -> Any:
        calls["archived"] += 1
        if calls["archived"] == 1:
            await _terminate(conn, c.get_server_pid())
        return await real_archived(c, *args, **kwargs)

    monkeypatch.setattr(jobs, "messages_ack", lost_reply)
    monkeypatch.setattr(jobs, "messages_archived", archived)
    done: list[Job] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run)
            done.append(ack(claimed[0]))
            with anyio.fail_after(30):
                await completer.wait_idle()
            done.append(ack(claimed[1]))  # the loop still writes
            with anyio.fail_after(30):
                await completer.wait_idle()
            tg.cancel_scope.cancel()
    finally:
        own.close()
    assert calls["archived"] >= 2
    assert completer.pending == 0
    assert await conn.fetchval(f"SELECT count(*) FROM pgmq.q_{queue}") == 0
    assert await conn.fetchval(f"SELECT count(*) FROM pgmq.a_{queue}") == 2


async def test_a_short_lease_is_extended_in_time_under_a_busy_stream_of_acks(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="busy_lease", lease=2)
    async def long() -> str:
        await asyncio.sleep(6)  # three leases
        return "done"

    @app.task(queue="busy_lease")
    async def short(n: int) -> None:
        await asyncio.sleep(0.001)

    ref = await long.defer()
    async with app.worker(queues=["busy_lease"], concurrency=8, poll_interval=0.1) as worker:
        events = Events(worker)
        deadline = time.monotonic() + 7
        n = 0
        while time.monotonic() < deadline:
            await app.defer_many([short.s(n + i) for i in range(20)])
            n += 20
            await anyio.sleep(0.02)
        with anyio.fail_after(30):
            assert await ref.result() == "done"
        await events.until(lambda: events.counts["succeeded"] >= n + 1, timeout=60)
    assert events.counts["lost"] == 0
    assert [e.attempt for e in events.of("succeeded") if e.task == long.name] == [1]


async def test_an_idle_round_trip_is_not_held_by_the_interval(app: pgtasks.App) -> None:
    # a trickle, one job every 3-9 ms: each result is heard well within a second, and the
    # median under the 10 ms interval (printed; the bound is generous for a loaded machine)
    @app.task(queue="idle_trip")
    async def ping(n: int) -> int:
        return n

    trips: list[float] = []
    async with app.worker(queues=["idle_trip"], concurrency=4):
        for n in range(150):
            t0 = time.monotonic()
            ref = await ping.defer(n)
            with anyio.fail_after(10):
                assert await ref.result() == n
            trips.append(time.monotonic() - t0)
            await anyio.sleep(random.uniform(0.003, 0.009))
    trips.sort()
    print(f"\nround trip p50 {trips[len(trips) // 2] * 1000:.2f} ms p90 {trips[135] * 1000:.2f} ms")
    assert trips[len(trips) // 2] < 0.5


# --- the executor's checks, inline in run -----------------------------------------------------


def _count_outcomes(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Counter[tuple[str, int, int]], dict[tuple[str, int, int], list[str]]]:
    """Every outcome but an extension, by (queue, msg_id, attempt) and kind."""
    seen: Counter[tuple[str, int, int]] = Counter()
    kinds: dict[tuple[str, int, int], list[str]] = {}
    submit = Completer.submit

    def counted(self: Completer, outcome: Outcome) -> None:
        if outcome.kind != "extend":
            key = (outcome.job.queue, outcome.job.msg_id, outcome.job.attempt)
            seen[key] += 1
            kinds.setdefault(key, []).append(outcome.kind)
        submit(self, outcome)

    monkeypatch.setattr(completer_module.Completer, "submit", counted)
    return seen, kinds


async def test_every_early_exit_ends_with_exactly_one_outcome(
    app: pgtasks.App, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen, kinds = _count_outcomes(monkeypatch)

    @app.task(queue="exits", max_retries=0)
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task(queue="exits", max_retries=0)
    async def keyed() -> None: ...

    await keyed.options(idempotency_key="k1").defer()  # creates the queue
    send = "SELECT pgmq.send('exits', $1::jsonb, $2::jsonb)"

    def body(task: str, args: list[Any]) -> str:
        return orjson.dumps({"v": 1, "task": task, "args": args}).decode()

    await conn.fetchval(send, '{"not": "an envelope"}', "{}")  # malformed
    ghost = await conn.fetchval(send, body("nobody.knows", []), "{}")  # unknown task
    await conn.fetchval(send, body(add.name, [1]), "{}")  # does not bind
    await conn.fetchval(send, body(add.name, ["x", "y", "z"]), "{}")  # does not bind
    await conn.fetchval(  # expired
        send, body(add.name, [1, 2]), '{"x-pgtasks-expires": "2000-01-01T00:00:00+00:00"}'
    )
    over = await conn.fetchval(send, body(add.name, [1, 2]), "{}")  # attempts exceeded
    asked = await conn.fetchval(send, body(add.name, [1, 2]), "{}")  # cancel requested
    await conn.execute(
        "INSERT INTO pgtasks.cancel_requests (queue, msg_id) VALUES ('exits', $1)", asked
    )
    await conn.execute("UPDATE pgmq.q_exits SET read_ct = 5 WHERE msg_id = $1", over)
    await app.worker(queues=["exits"], burst=True).run()
    await conn.fetchval(send, body(keyed.name, []), '{"idempotency_key": "k1"}')  # done
    await add.defer(2, 3)  # runs
    await app.worker(queues=["exits"], burst=True).run()
    assert len({k[1] for k in seen}) == 10, seen
    assert all(c == 1 for c in seen.values()), seen
    by_kind = Counter(k for ks in kinds.values() for k in ks)
    # malformed, no bind x2, over attempts: dead; expired; cancelled; ghost's retries; acks
    assert by_kind["dead"] == 4, kinds
    assert by_kind["expire"] == 1, kinds
    assert by_kind["cancel"] == 1, kinds
    assert by_kind["ack"] == 3, kinds
    assert by_kind["retry"] >= 1, kinds
    # only the unknown task's message is left (retried by the default policy)
    assert await conn.fetchval("SELECT array_agg(msg_id) FROM pgmq.q_exits") == [ghost]


async def test_a_pgtasks_error_between_the_steps_is_recorded_once(
    app: pgtasks.App, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen, _ = _count_outcomes(monkeypatch)
    runs: list[int] = []

    @app.task(queue="bug_between", max_retries=2, retry_backoff=0)
    async def job(n: int) -> None:
        runs.append(n)

    real = pgtasks.JobContext
    broken = [True]

    def context(*args: Any) -> Any:
        if broken:
            broken.clear()
            raise RuntimeError("a pgtasks bug")
        return real(*args)

    monkeypatch.setattr(executor_module, "JobContext", context)
    ref = await job.defer(1)
    async with app.worker(queues=["bug_between"], poll_interval=0.1) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] == 1)
    assert runs == [1]
    assert sorted(seen.values()) == [1, 1], seen  # a retry for attempt 1, an ack for 2
    assert [e.attempt for e in events.of("succeeded")] == [2]
    assert ref.id in {k[1] for k in seen}
