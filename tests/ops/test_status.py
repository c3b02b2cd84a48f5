"""``pgtasks status`` against a real database and real workers: each state a job can be in
within its queue (waiting, scheduled, running, retrying) is counted where the definitions in
docs/operations.md put it, including the edge cases (a released job, a lapsed lease, a job
whose earlier attempt failed and that runs again); dead letters, done and failed in the last
minute, the oldest waiting job and the live workers; counts past the cap are estimated or
lower bounds and say so; the command prints it as text, JSON and a watch."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import anyio
import asyncpg

import pgtasks
from pgtasks.admin import status as admin_status
from pgtasks.admin.status import QueueState
from tests.helpers import Events


async def state(app: pgtasks.App, queue: str, cap: int = admin_status.DEFAULT_CAP) -> QueueState:
    snapshot = await admin_status.status(app.database, cap=cap)
    [found] = [q for q in snapshot.queues if q.queue == queue]
    return found


def counts(q: QueueState) -> tuple[int, int, int, int, int]:
    return (q.waiting, q.scheduled, q.running, q.retrying, q.dead_letters)


async def test_each_state_is_counted_where_it_belongs(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    release = asyncio.Event()

    @app.task(queue="st")
    async def hold() -> None:
        await release.wait()

    @app.task(queue="st", max_retries=2)
    async def flaky() -> None:
        if pgtasks.current_job().attempt == 1:
            raise pgtasks.Retry(delay=3600)

    @app.task(queue="st")
    async def refuse() -> None:
        raise pgtasks.Fail("no")

    @app.task(queue="st")
    async def fine() -> None: ...

    await hold.options(delay=3600).defer()  # scheduled
    assert counts(await state(app, "st")) == (0, 1, 0, 0, 0)

    worker = app.worker(queues=["st"], concurrency=5)
    async with worker:
        events = Events(worker)
        await hold.defer()  # running, until released
        await flaky.defer()  # retrying: its first attempt failed, back in an hour
        await refuse.defer()  # a dead letter
        await fine.defer()  # done
        await events.until(
            lambda: (
                events.counts["retried"] == 1
                and events.counts["dead"] == 1
                and events.counts["succeeded"] == 1
                and worker.running == 1
            )
        )
        q = await state(app, "st")
        assert counts(q) == (0, 1, 1, 1, 1)
        assert (q.done_1m, q.done_1h, q.failed_1m, q.failed_1h) == (1, 1, 2, 2)
        assert (q.workers, q.oldest_waiting_seconds) == (1, None)
        assert q.estimated == q.at_least == frozenset()
        worker.stop(force=True)  # the running job is released: waiting again, attempt given back
    q = await state(app, "st")
    assert counts(q) == (1, 1, 0, 1, 1)
    assert q.workers == 0

    # a lapsed lease (the worker that held it was killed) is waiting too; the retrying job
    # that is due again and claimed runs its second attempt: running, not retrying
    await conn.execute("UPDATE pgmq.q_st SET vt = now() - interval '5 seconds' WHERE read_ct > 0")
    q = await state(app, "st")
    assert counts(q) == (2, 1, 0, 0, 1)
    assert q.oldest_waiting_seconds is not None
    assert q.oldest_waiting_seconds >= 5
    flaky_id = await conn.fetchval(
        "SELECT msg_id FROM pgmq.q_st WHERE message ->> 'task' = $1", flaky.name
    )
    await conn.execute(
        "UPDATE pgmq.q_st SET vt = now() + interval '30 seconds', read_ct = read_ct + 1 "
        "WHERE msg_id = $1",
        flaky_id,
    )
    assert counts(await state(app, "st")) == (1, 1, 1, 0, 1)


async def test_counts_past_the_cap_are_estimated_or_lower_bounds(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="st_big")
    async def noop(n: int) -> None: ...

    await app.defer_many(noop.s(n) for n in range(40))
    await app.defer_many(noop.options(delay=3600).s(n) for n in range(3))
    q = await state(app, "st_big", cap=10)
    assert (q.waiting, q.at_least) == (10, frozenset({"waiting"}))  # no statistics yet
    await conn.execute("ANALYZE pgmq.q_st_big")
    q = await state(app, "st_big", cap=10)
    assert q.estimated == frozenset({"waiting"})
    assert 30 <= q.waiting <= 50  # the table's 43 rows, less the 3 scheduled
    assert (q.scheduled, q.exact("scheduled")) == (3, True)
    assert (await state(app, "st_big")).waiting == 40  # under the default cap: exact

    await app.worker(burst=True, concurrency=20).run()
    q = await state(app, "st_big", cap=10)
    assert {"done_1m", "done_1h"} <= q.estimated  # 40 done in well under a minute
    assert q.done_1m >= 10
    assert (await state(app, "st_big")).done_1m == 40


def cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PGTASKS_DSN", "DATABASE_URL")}
    return subprocess.run(
        [sys.executable, "-m", "pgtasks", *args, "--dsn", dsn],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_command_prints_text_json_and_a_watch(app: pgtasks.App, db_dsn: str) -> None:
    @app.task(queue="st_cli")
    async def noop() -> None: ...

    await noop.defer()
    await noop.options(delay=60).defer()
    worker = app.worker()
    async with worker:
        text = await anyio.to_thread.run_sync(lambda: cli("status", dsn=db_dsn))
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0].split()[:7] == [
            "queue", "waiting", "scheduled", "running", "retrying", "dead", "oldest"
        ]  # fmt: skip
        [row] = [line.split() for line in lines if line.startswith("st_cli")]
        assert row[2] == "1"  # scheduled
        assert row[-1] == "1"  # one live worker
        assert "workers: 1 alive" in text.stdout

        as_json = await anyio.to_thread.run_sync(lambda: cli("status", "--json", dsn=db_dsn))
        document = json.loads(as_json.stdout)
        [queue] = [q for q in document["queues"] if q["queue"] == "st_cli"]
        assert (queue["scheduled"], queue["workers"]) == (1, 1)
        [info] = document["workers"]
        assert (info["state"], info["queues"], info["id"]) == ("alive", ["st_cli"], str(worker.id))

    # --watch --json: a line per refresh, until interrupted (exit 0)
    env = {k: v for k, v in os.environ.items() if k not in ("PGTASKS_DSN", "DATABASE_URL")}
    proc = subprocess.Popen(  # noqa: ASYNC220 (read from a thread below)
        [sys.executable, "-m", "pgtasks", "status", "--json", "--watch", "0.2", "--dsn", db_dsn],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = await anyio.to_thread.run_sync(proc.stdout.readline)
        second = await anyio.to_thread.run_sync(proc.stdout.readline)
        assert json.loads(first)["queues"]
        assert json.loads(second)["at"] != json.loads(first)["at"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=30))
    assert proc.returncode == 0, err


async def test_one_statement_is_fast_with_many_queues(app: pgtasks.App) -> None:
    @app.task(queue="st_fast")
    async def noop() -> None: ...

    for n in range(30):
        await noop.options(queue=f"st_q{n}").defer()
    await admin_status.status(app.database)  # plans cached, pool open
    started = time.perf_counter()
    snapshot = await admin_status.status(app.database)
    assert len(snapshot.queues) == 30
    assert time.perf_counter() - started < 1.0
