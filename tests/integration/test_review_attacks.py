"""An adversarial review of the hardened worker: each test here reproduces a defect (it fails
on the code it was written against) and says which promise it breaks.

Run: PGTASKS_TEST_DSN=... pytest tests/integration/test_review_attacks.py -q
"""

from __future__ import annotations

import json

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks.serialization.envelope import HEADER_RELEASED
from tests.helpers import Events

# --- R1: a forged x-pgtasks-released header makes a poison message loop "forever" ---------------


async def test_a_forged_released_header_cannot_buy_endless_retries(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    # A SQL producer (or a copy of a message's headers) sets the worker's own bookkeeping
    # header. The executor subtracts it from read_ct, so the attempt is hugely negative, the
    # pre-run "attempts exceed the policy" check never fires and should_retry() always says
    # yes: a poison message retries ~a million times instead of max_retries.
    runs: list[int] = []

    @app.task(queue="forged", max_retries=2, retry_backoff=0.01, retry_jitter=False)
    async def poison() -> None:
        runs.append(pgtasks.current_job().attempt)
        raise ValueError("always fails")

    await app.migrate()
    await conn.execute(
        "SELECT pgmq.send('forged', $1::jsonb, $2::jsonb, 0)",
        json.dumps({"v": 1, "task": poison.name, "args": [], "kwargs": {}}),
        json.dumps({HEADER_RELEASED: 999_990}),
    )
    async with app.worker(poll_interval=0.05) as worker:
        events = Events(worker)
        with anyio.move_on_after(6):
            await events.until(lambda: events.counts["dead"] == 1, timeout=6)
    assert events.counts["dead"] == 1, f"not dead-lettered after {len(runs)} runs: {runs[:5]}"
    assert len(runs) == 3
    assert runs[0] >= 1  # an attempt number is 1-based


# --- R2: a queue dropped and re-created: an old claim token matches a new message ---------------


async def test_an_old_claim_cannot_ack_a_new_message_after_the_queue_is_recreated(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    # msg_id restarts at 1 in a re-created queue, and read_ct starts again at 0, so the
    # token (msg_id, read_ct) of a run that started before the drop equals the token of
    # the first claim of the first new message. The old run's ack then archives the new
    # message while the new message's own run is still going (and is later cancelled as
    # "lost"): a job that never finished is archived as done.
    release_old = anyio.Event()
    release_new = anyio.Event()
    finished: list[str] = []

    @app.task(queue="phoenix")
    async def job(tag: str) -> None:
        await (release_old if tag == "old" else release_new).wait()
        finished.append(tag)

    old = await job.defer("old")
    async with app.worker(concurrency=4, poll_interval=0.1) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["started"] == 1)
        await conn.execute("SELECT pgmq.drop_queue('phoenix')")
        new = await job.defer("new")  # pgtasks.send re-creates the queue
        assert new.id == old.id == 1
        await events.until(lambda: events.counts["started"] == 2)
        release_old.set()  # the old run succeeds and acks (1, 1)
        await anyio.sleep(0.5)
        # the new job is still running: its message must still be in the queue
        in_queue = await conn.fetchval("SELECT count(*) FROM pgmq.q_phoenix")
        archived = await conn.fetch("SELECT message FROM pgmq.a_phoenix")
        release_new.set()
        await anyio.sleep(0.5)
    assert finished[0] == "old"
    assert archived == [], f"the new job was archived while it ran: {archived}"
    assert in_queue == 1


# --- R3: headers that are JSON but not an object: the message is never handed back -----------


@pytest.mark.parametrize("headers", ["[]", "null", '"text"', "42"])
async def test_a_message_with_non_object_headers_is_handed_back_at_stop(
    app: pgtasks.App, conn: asyncpg.Connection, headers: str
) -> None:
    # Invariant 6: a stop releases running jobs' messages at once (and gives the attempt
    # back). The release statement jsonb_set()s the released counter into the headers,
    # which fails for an array or a scalar; the completer gives the release up and the
    # message waits out its lease (30 s here), its attempt counted.
    started = anyio.Event()

    @app.task(queue="oddheaders")
    async def job() -> None:
        started.set()
        await anyio.sleep(60)

    await app.migrate()
    msg_id = await conn.fetchval(
        "SELECT pgmq.send('oddheaders', $1::jsonb, $2::jsonb, 0)",
        json.dumps({"v": 1, "task": job.name, "args": [], "kwargs": {}}),
        headers,
    )
    async with app.worker(poll_interval=30, shutdown_timeout=0):
        with anyio.fail_after(10):
            await started.wait()
    row = await conn.fetchrow(
        "SELECT vt <= clock_timestamp() AS visible, read_ct FROM pgmq.q_oddheaders "
        "WHERE msg_id = $1",
        msg_id,
    )
    assert row is not None
    assert row["visible"], "the stopped job's message was not handed back"


# --- R4: one message whose read_ct is at the integer limit blocks its whole queue -------------


async def test_a_message_at_the_read_ct_limit_does_not_block_its_queue(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    # read_ct is an integer; the claim's "read_ct + 1" overflows for this one row, the whole
    # claim statement fails (22003, "bad data"), and the fetcher blocks the queue with
    # backoff up to a minute, for good: every other job of the queue waits forever.
    @app.task(queue="maxed")
    async def job(n: int) -> None: ...

    poisoned = await job.defer(0)
    await conn.execute(
        "UPDATE pgmq.q_maxed SET read_ct = 2147483647 WHERE msg_id = $1", poisoned.id
    )
    for i in range(1, 6):
        await job.defer(i)
    async with app.worker(poll_interval=0.1) as worker:
        events = Events(worker)
        with anyio.move_on_after(8):
            await events.until(lambda: events.counts["succeeded"] == 5, timeout=8)
    assert events.counts["succeeded"] == 5, f"failed queues: {worker.failed_queues}"


# --- R5: an ambiguous commit (committed, reply lost) is replayed, and the replay is not idempotent


def _lose_the_reply_once(monkeypatch: pytest.MonkeyPatch, kinds: set[str]) -> list[str]:
    """The completer's next write of one of ``kinds`` commits on the server, then the client
    sees the connection break (a backend killed, a network cut, a server restart right
    after COMMIT): the classic ambiguous commit, which the completer retries. Simulated at
    the client: the statement (autocommit) or the COMMIT runs for real, then the call
    raises ConnectionResetError, as asyncpg does when the reply never arrives."""
    from asyncpg.transaction import Transaction

    from pgtasks.worker.completer import Completer

    write, tx_exit = Completer._write, Transaction.__aexit__
    lost: list[str] = []
    armed: list[bool] = []

    async def _write(self, conn, key, items):  # type: ignore[no-untyped-def]
        done = await write(self, conn, key, items)
        if key[0] in kinds and not lost:
            lost.append(key[0])
            if conn.is_in_transaction():
                armed.append(True)  # fail once the COMMIT went through
            else:
                raise ConnectionResetError("the reply to the statement was lost")
        return done

    async def __aexit__(self, exc_type, exc, tb):  # type: ignore[no-untyped-def]
        await tx_exit(self, exc_type, exc, tb)
        if armed and exc_type is None:
            armed.clear()
            raise ConnectionResetError("the reply to COMMIT was lost")

    monkeypatch.setattr(Completer, "_write", _write)
    monkeypatch.setattr(Transaction, "__aexit__", __aexit__)
    return lost


async def test_a_release_whose_reply_was_lost_gives_the_attempt_back_once(
    app: pgtasks.App, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The replayed release still matches (msg_id, read_ct): nobody claimed the message in
    # between. It adds 1 to x-pgtasks-released again, so one stop gives back two attempts
    # and the next run sees attempt 0 (with more stops like it, attempts run negative and
    # max_retries stops bounding the runs).
    lost = _lose_the_reply_once(monkeypatch, {"release"})
    attempts: list[int] = []
    started = anyio.Event()

    @app.task(queue="replay")
    async def job() -> None:
        attempts.append(pgtasks.current_job().attempt)
        started.set()
        await anyio.sleep(0 if len(attempts) > 1 else 60)

    ref = await job.defer()
    async with app.worker(poll_interval=30, shutdown_timeout=0):
        with anyio.fail_after(10):
            await started.wait()
    assert lost == ["release"]
    headers = await conn.fetchval("SELECT headers FROM pgmq.q_replay WHERE msg_id = $1", ref.id)
    await app.worker(burst=True).run()
    assert attempts == [1, 1], f"headers after one stop: {headers}"


async def test_a_retry_whose_reply_was_lost_records_its_error_once(
    app: pgtasks.App, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the replayed retry matches again (the row is still held at the same read_ct) and
    # inserts the attempt's error a second time
    lost = _lose_the_reply_once(monkeypatch, {"retry"})

    @app.task(queue="replay2", max_retries=1)
    async def job() -> None:
        raise pgtasks.Retry(delay=600)

    await job.defer()
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["retried"] == 1)
        await anyio.sleep(0.5)
    assert lost == ["retry"]
    rows = await conn.fetch("SELECT msg_id, attempt FROM pgtasks.attempt_errors")
    assert len(rows) == 1, f"one failed attempt recorded {len(rows)} times"


async def test_an_ack_whose_reply_was_lost_still_reports_success(
    app: pgtasks.App, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the ack committed; its replay finds no row, so the job is settled as "not written:
    # the message is no longer held by this claim (its lease expired and another worker
    # took it...)": no succeeded event, stats say 0 succeeded, and the log blames a lost
    # lease that never happened
    lost = _lose_the_reply_once(monkeypatch, {"ack"})

    @app.task(queue="replay3")
    async def job() -> None: ...

    await job.defer()
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        with anyio.move_on_after(3):
            await events.until(lambda: events.counts["succeeded"] == 1, timeout=3)
    assert lost == ["ack"]
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_replay3") == 1  # it was acked
    assert events.counts["succeeded"] == 1


# --- R6: a transactional job that cannot get a connection -----------------------------------


async def _refuse_new_connections(server_dsn: str, conn: asyncpg.Connection, refuse: bool) -> None:
    """Open connections stay; new ones to this database are refused (as when the server is
    at max_connections, which a superuser test role would not hit)."""
    database = await conn.fetchval("SELECT current_database()")
    admin = await asyncpg.connect(server_dsn)
    try:
        allow = "false" if refuse else "true"
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {allow}')
    finally:
        await admin.close()


async def _warm_up(conn: asyncpg.Connection, worker: pgtasks.Worker, queue: str, task: str) -> None:
    done = anyio.Event()
    unsubscribe = worker.subscribe(lambda e: done.set() if e.kind == "succeeded" else None)
    await conn.execute(
        "SELECT pgtasks.send($1, $2::jsonb)",
        queue,
        json.dumps({"v": 1, "task": task, "args": [], "kwargs": {}}),
    )
    with anyio.fail_after(10):
        await done.wait()
    unsubscribe()


async def test_a_transactional_job_that_cannot_connect_is_not_spun_in_a_hot_loop(
    db_dsn: str, server_dsn: str, conn: asyncpg.Connection
) -> None:
    # acquire() fails (the server takes no new connections: max_connections reached, say):
    # the job is handed back at once (vt = enqueued_at) and claimed again at once, with no
    # backoff at all: claim, connection attempt, release, claim... as fast as round trips go.
    app = pgtasks.App(db_dsn, pool_min_size=0, pool_max_size=2)

    @app.task(queue="txspin")
    async def warm() -> None: ...

    @app.task(queue="txspin", transactional=True)
    async def job() -> None: ...

    try:
        async with app.worker(poll_interval=1) as worker:
            await _warm_up(conn, worker, "txspin", warm.name)  # the worker's own connections
            await _refuse_new_connections(server_dsn, conn, True)
            try:
                await conn.execute(
                    "SELECT pgtasks.send('txspin', $1::jsonb)",
                    json.dumps({"v": 1, "task": job.name, "args": [], "kwargs": {}}),
                )
                await anyio.sleep(3)
                released = worker.stats["released"]
            finally:
                await _refuse_new_connections(server_dsn, conn, False)
        assert released < 30, f"{released} claim/release cycles in 3 s"
    finally:
        await app.close()


async def test_a_transactional_job_is_not_dead_lettered_because_the_pool_cannot_open(
    db_dsn: str, server_dsn: str, conn: asyncpg.Connection
) -> None:
    # The same condition while the app's pool is not open yet (a worker process that has
    # not deferred anything): create_pool's DatabaseUnavailable is raised outside the
    # try/except around acquire(), so it counts as a failed attempt of the task, and the
    # job that never ran is dead-lettered once its retries are used up ("retries exhausted
    # ... DatabaseUnavailable").
    # pool_min_size=1: create_pool connects at once
    app = pgtasks.App(db_dsn, pool_max_size=2, max_retries=2, retry_backoff=0.01)

    @app.task(queue="txnopool")
    async def warm() -> None: ...

    @app.task(queue="txnopool", transactional=True)
    async def job() -> None: ...

    try:
        async with app.worker(poll_interval=0.1) as worker:
            events = Events(worker)
            await _warm_up(conn, worker, "txnopool", warm.name)  # the worker's own connections
            await _refuse_new_connections(server_dsn, conn, True)
            try:
                await conn.execute(
                    "SELECT pgtasks.send('txnopool', $1::jsonb)",
                    json.dumps({"v": 1, "task": job.name, "args": [], "kwargs": {}}),
                )
                with anyio.move_on_after(4):
                    await events.until(lambda: events.counts["dead"] == 1, timeout=4)
            finally:
                await _refuse_new_connections(server_dsn, conn, False)
        dead = await conn.fetchval("SELECT reason FROM pgtasks.dead_letters")
        assert dead is None, f"a job that never ran was dead-lettered: {dead}"
    finally:
        await app.close()


# --- R7: Retry(delay=<a number that is not int/float>) is silently ignored --------------------


async def test_retry_with_a_decimal_delay_waits_that_long(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    # clean_delay() accepts only int and float, so Retry(delay=Decimal("600")) (or a numpy
    # integer, a Fraction) falls back to the policy's backoff (~2 s) without a word
    from decimal import Decimal

    @app.task(queue="decimal", max_retries=3)
    async def job() -> None:
        raise pgtasks.Retry(delay=Decimal("600"))  # type: ignore[arg-type]

    ref = await job.defer()
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["retried"] == 1)
        await anyio.sleep(0.3)
    ahead = await conn.fetchval(
        "SELECT extract(epoch FROM vt - clock_timestamp()) FROM pgmq.q_decimal WHERE msg_id = $1",
        ref.id,
    )
    assert ahead > 500, f"retry due in {ahead:.1f}s, asked for 600s"


# --- R1b: the released counter survives "dead retry", so a retried dead letter starts at
# attempt <= 0 and gets extra runs ------------------------------------------------------------


async def test_a_retried_dead_letter_starts_again_at_attempt_one(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    # "dead retry" re-sends the dead letter's message with its headers, x-pgtasks-released
    # included, to a new message whose read_ct starts at 0: "fresh attempts" start at
    # 1 - released. Here two worker stops, then a failure with max_retries=0: after the
    # retry, the job runs three times instead of once.
    attempts: list[int] = []
    started = anyio.Event()
    phase = {"hold": True}

    @app.task(queue="resurrect", max_retries=0)
    async def job() -> None:
        attempts.append(pgtasks.current_job().attempt)
        started.set()
        if phase["hold"]:
            await anyio.sleep(60)
        raise ValueError("fails")

    await job.defer()
    for _ in range(2):  # two stops while it runs: two attempts given back
        started = anyio.Event()
        async with app.worker(poll_interval=30, shutdown_timeout=0):
            with anyio.fail_after(10):
                await started.wait()
    phase["hold"] = False
    await app.worker(burst=True).run()
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 1
    dead_id = await conn.fetchval("SELECT id FROM pgtasks.dead_letters")
    attempts.clear()
    await app.dead_letters.retry([dead_id])
    async with app.worker(poll_interval=0.1) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["dead"] == 1)
    assert attempts == [1], f"runs after the retry, by attempt: {attempts}"


# --- R2b: the same msg_id reuse fools the idempotency key's "is its message still there?" ------


async def test_a_key_is_not_held_by_an_unrelated_message_of_a_recreated_queue(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    # claim_key() treats a key as held while pgtasks.message_exists(queue, msg_id); after
    # the queue is dropped and re-created, msg_id 1 is another, unrelated job, so a new
    # defer with the key is "deduplicated" onto it and never runs.
    ran: list[str] = []

    @app.task(queue="rekey")
    async def job(tag: str) -> None:
        ran.append(tag)

    first = await job.options(idempotency_key="order-7").defer("first")
    await conn.execute("SELECT pgmq.drop_queue('rekey')")  # the pending job is gone
    unrelated = await job.defer("unrelated")
    assert unrelated.id == first.id
    again = await job.options(idempotency_key="order-7").defer("again")
    await app.worker(burst=True).run()
    assert "again" in ran, f"deduplicated onto the unrelated job {again}; ran {ran}"


# --- R8: a lock on one queue's table stalls the whole worker, and a soft stop with it --------


async def test_a_locked_queue_table_does_not_hold_back_the_other_queues(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    # VACUUM FULL / CLUSTER / ALTER TABLE / a pgmq upgrade on one queue's table holds an
    # ACCESS EXCLUSIVE lock. The claim (and the next-visible lookup) on that table waits
    # for it with no lock_timeout, and the fetch pass is sequential: no queue is claimed
    # from until the lock goes. (A10 fixed this for errors, not for waits.)
    @app.task(queue="locked")
    async def a() -> None: ...

    @app.task(queue="open")
    async def b() -> None: ...

    await app.migrate()
    locker = await asyncpg.connect(db_dsn)
    tx = locker.transaction()
    try:
        async with app.worker(poll_interval=0.2) as worker:
            events = Events(worker)
            await tx.start()
            await locker.execute("LOCK TABLE pgmq.q_locked IN ACCESS EXCLUSIVE MODE")
            for _ in range(5):
                await b.defer()
            with anyio.move_on_after(5):
                await events.until(lambda: events.counts["succeeded"] == 5, timeout=5)
            done = events.counts["succeeded"]
            await tx.rollback()
        assert done == 5, f"{done} of 5 jobs of an unlocked queue ran in 5 s"
    finally:
        await locker.close()


async def test_a_soft_stop_keeps_its_grace_period_while_a_claim_waits_on_a_lock(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    # SIGTERM is a soft stop. The claim is shielded from it, and here the claim waits on a
    # table lock: the fetch loop never ends, so the grace period never starts, the running
    # job is neither cancelled nor released, and stop() does not return until the lock
    # goes (an orchestrator's SIGKILL comes first, and the job waits out its lease).
    @app.task(queue="stuck")
    async def job() -> None:
        await anyio.sleep(60)

    await job.defer()
    locker = await asyncpg.connect(db_dsn)
    tx = locker.transaction()
    try:
        worker = app.worker(poll_interval=0.2, shutdown_timeout=0.5)
        elapsed = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            events = Events(worker)
            await events.until(lambda: events.counts["started"] == 1)
            await tx.start()
            await locker.execute("LOCK TABLE pgmq.q_stuck IN ACCESS EXCLUSIVE MODE")
            await anyio.sleep(0.5)  # the next claim now waits on the lock
            started = anyio.current_time()
            worker.stop()
            with anyio.move_on_after(8):
                while worker.running:
                    await anyio.sleep(0.05)
                elapsed = anyio.current_time() - started
            await tx.rollback()
        assert elapsed is not None, "the running job outlived the grace period by 8 s"
        assert elapsed < 5
    finally:
        await locker.close()
