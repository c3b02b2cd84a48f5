"""Workers you can see, against a real database and real workers: a worker registers itself
before it says it started (host, pid, queues, concurrency, version), its heartbeat carries the
jobs running and its outcomes, a clean stop is recorded, a worker that stops heartbeating is
shown as gone and `prune` deletes its row later, it writes nothing per job, and a heartbeat
that fails never stops the worker."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import uuid

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks.admin import workers as admin_workers
from pgtasks.db import workers as workers_sql
from tests.helpers import Events


async def test_a_worker_registers_beats_and_records_its_stop(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    release = asyncio.Event()

    @app.task(queue="seen_a")
    async def slow() -> None:
        await release.wait()

    @app.task(queue="seen_b")
    async def quick() -> None: ...

    worker = app.worker(concurrency=3)
    worker.heartbeat_interval = 0.1
    async with worker:
        [info] = await admin_workers.list_workers(app.database)
        assert info.id == worker.id
        assert (info.host, info.pid) == (socket.gethostname(), os.getpid())
        assert info.name == f"{socket.gethostname()}:{os.getpid()}"
        assert (info.queues, info.concurrency) == (("seen_a", "seen_b"), 3)
        assert (info.version, info.state, info.stopped_at) == (pgtasks.__version__, "alive", None)

        events = Events(worker)
        await quick.defer()
        await slow.defer()
        await events.until(lambda: events.counts["succeeded"] == 1 and worker.running == 1)
        with anyio.fail_after(5):
            while (info := (await admin_workers.list_workers(app.database))[0]).running != 1:
                await anyio.sleep(0.05)
        assert info.stats["succeeded"] == 1
        assert info.last_seen > info.started_at
        release.set()
        await events.until(lambda: events.counts["succeeded"] == 2)

    assert await admin_workers.list_workers(app.database) == []  # only the live ones
    [info] = await admin_workers.list_workers(app.database, everyone=True)
    assert info.state == "stopped"
    assert info.stopped_at is not None
    assert (info.running, info.stats["succeeded"]) == (0, 2)


async def test_a_worker_writes_nothing_per_job(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    @app.task(queue="seen_many")
    async def noop(n: int) -> None: ...

    await app.defer_many(noop.s(n) for n in range(300))
    worker = app.worker(concurrency=20)  # the default interval: 5 s
    async with worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] == 300)
        row = await conn.fetchrow("SELECT started_at, last_seen, xmin::text FROM pgtasks.workers")
        assert row is not None
        # 300 jobs later, the row is the one registration wrote: no write per job
        assert row["last_seen"] == row["started_at"]


async def test_a_silent_worker_is_gone_and_pruned_later(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    crashed = uuid.uuid4()
    await workers_sql.worker_beat(
        conn,
        crashed,
        host="elsewhere",
        pid=4242,
        queues=["q1"],
        concurrency=5,
        running=2,
        version="0.0.1",
        interval=0.2,
        stats={"succeeded": 7},
    )
    [alive] = await admin_workers.list_workers(app.database)
    assert (alive.id, alive.state, alive.running) == (crashed, "alive", 2)

    await anyio.sleep(0.7)  # three missed heartbeats of 0.2 s
    assert await admin_workers.list_workers(app.database) == []
    [gone] = await admin_workers.list_workers(app.database, everyone=True)
    assert (gone.id, gone.state, gone.stopped_at) == (crashed, "gone", None)

    # prune keeps it for a day by default, and deletes it once it is older than asked
    assert (await app.prune())["workers"] == 0
    assert (await app.prune(workers_older_than=dt.timedelta(0)))["workers"] == 1
    assert await admin_workers.list_workers(app.database, everyone=True) == []


async def test_prune_never_deletes_a_live_worker(app: pgtasks.App) -> None:
    @app.task(queue="seen_live")
    async def noop() -> None: ...

    worker = app.worker()
    worker.heartbeat_interval = 0.1
    async with worker:
        await anyio.sleep(0.3)
        assert (await app.prune(workers_older_than=dt.timedelta(0)))["workers"] == 0
        assert len(await admin_workers.list_workers(app.database)) == 1


async def test_a_failing_heartbeat_never_stops_the_worker(
    app: pgtasks.App, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(queue="seen_broken")
    async def noop(n: int) -> None: ...

    worker = app.worker()
    worker.heartbeat_interval = 0.05
    caplog.set_level(logging.INFO, logger="pgtasks")
    async with worker:
        events = Events(worker)
        await conn.execute("ALTER TABLE pgtasks.workers RENAME TO workers_away")
        await anyio.sleep(0.3)  # several heartbeats fail
        await app.defer_many(noop.s(n) for n in range(20))
        await events.until(lambda: events.counts["succeeded"] == 20)
        await conn.execute("ALTER TABLE pgtasks.workers_away RENAME TO workers")
        with anyio.fail_after(5):
            while "worker heartbeat written again" not in caplog.text:
                await anyio.sleep(0.05)
        await noop.defer(21)
        await events.until(lambda: events.counts["succeeded"] == 21)
    failures = [r for r in caplog.records if "worker heartbeat failed" in r.getMessage()]
    assert len(failures) == 1  # logged once, not at every tick
    assert failures[0].levelno == logging.ERROR  # a missing table is no passing trouble
    assert "permanent" in failures[0].getMessage()
    [info] = await admin_workers.list_workers(app.database, everyone=True)
    assert (info.state, info.stats["succeeded"]) == ("stopped", 21)


async def test_a_heartbeat_in_flight_at_the_stop_never_marks_the_worker_alive_again(
    app: pgtasks.App,
) -> None:
    # heartbeats back to back: one is nearly always being written when the stop is
    @app.task(queue="beating")
    async def noop() -> None: ...

    for _ in range(10):
        worker = app.worker()
        worker.heartbeat_interval = 0.001
        async with worker:
            await anyio.sleep(0.05)
    infos = await admin_workers.list_workers(app.database, everyone=True)
    assert len(infos) == 10
    assert [i.state for i in infos] == ["stopped"] * 10
