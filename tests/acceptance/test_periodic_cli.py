"""Periodic jobs with real workers in subprocesses: five workers and a one-second schedule
for 20 seconds make one job per tick, also when one worker's host clock is ten minutes
ahead; pause, resume and trigger through the command line while a worker runs; the
scheduler alone beside a worker with --no-schedule."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from ..conftest import _admin, _clone

TASKS = """
import asyncio
import datetime as dt
import os

import pgtasks

app = pgtasks.App()


@app.periodic(every=dt.timedelta(seconds=1), name="every-second")
@app.task(queue="periodic_cli")
async def tick() -> None:
    job = pgtasks.current_job()
    pool = await app.pool()
    await pool.execute(
        "INSERT INTO runs (tick, msg_id, pid, started) VALUES ($1, $2, $3, clock_timestamp())",
        job.scheduled_at, job.id, os.getpid(),
    )
"""

# Runs the worker CLI with this process's host time shifted: the wall clock (time.time)
# and the scheduler's host clock. The database's clock is the only one the scheduler takes
# instants from, so nothing may change.
SHIFTED = """
import sys
import time

SHIFT = float(sys.argv[1])
_time, _time_ns, _monotonic = time.time, time.time_ns, time.monotonic
time.time = lambda: _time() + SHIFT
time.time_ns = lambda: _time_ns() + int(SHIFT * 1e9)

from pgtasks.worker import scheduler

scheduler.host_clock = lambda: _monotonic() + SHIFT

from pgtasks.cli import main

sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture
def project(tmp_path: Path, db_dsn: str) -> tuple[Path, dict[str, str]]:
    (tmp_path / "periodictasks.py").write_text(textwrap.dedent(TASKS))
    (tmp_path / "shifted.py").write_text(textwrap.dedent(SHIFTED))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGTASKS_APP")}
    env["PGTASKS_DSN"] = db_dsn
    env["PYTHONPATH"] = str(tmp_path)
    return tmp_path, env


def start(
    project: tuple[Path, dict[str, str]], *args: str, shift: float | None = None
) -> subprocess.Popen[str]:
    cwd, env = project
    prefix = [sys.executable, "-m", "pgtasks"]
    if shift is not None:
        prefix = [sys.executable, str(cwd / "shifted.py"), str(shift)]
    return subprocess.Popen(
        [*prefix, *args, "--app", "periodictasks:app"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"did not stop within 40s:\n{out}")
    assert proc.returncode == 0, out
    return out


def cli(project: tuple[Path, dict[str, str]], *args: str) -> subprocess.CompletedProcess[str]:
    cwd, env = project
    return subprocess.run(
        [sys.executable, "-m", "pgtasks", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def prepare(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "CREATE TABLE runs (tick timestamptz NOT NULL, msg_id bigint NOT NULL, "
        "pid integer NOT NULL, started timestamptz NOT NULL)"
    )


async def wait_until(conn: asyncpg.Connection, sql: str, timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while not await conn.fetchval(sql):
            await anyio.sleep(0.1)


@pytest.fixture
def second_db_dsn(server_dsn: str, template_db: str) -> Iterator[str]:
    """Another fresh, migrated database, for a second group of workers at the same time."""
    name, dsn = _clone(server_dsn, template_db)
    yield dsn
    asyncio.run(_admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def check_one_job_per_tick(
    conn: asyncpg.Connection, begin: dt.datetime, end: dt.datetime, outputs: list[str]
) -> None:
    rows = await conn.fetch("SELECT tick, msg_id, pid, started FROM runs ORDER BY tick")
    ticks = [r["tick"] for r in rows]
    assert len(ticks) == len(set(ticks)), Counter(ticks).most_common(3)  # no tick twice
    window = [t for t in ticks if begin < t <= begin + dt.timedelta(seconds=20)]
    assert 19 <= len(window) <= 21, (window, outputs)
    # every second of the run has its job: none skipped, none early
    between = [t for t in ticks if begin < t <= end]
    assert all(b - a == dt.timedelta(seconds=1) for a, b in itertools.pairwise(between))
    assert all(r["started"] >= r["tick"] for r in rows)
    enqueued = await conn.fetch(
        "SELECT headers ->> 'x-pgtasks-scheduled-at' AS tick, enqueued_at FROM pgmq.a_periodic_cli"
    )
    assert len(enqueued) == len(rows)  # one message per tick, each run once
    for r in enqueued:
        assert r["enqueued_at"] >= dt.datetime.fromisoformat(r["tick"])  # never early


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_five_workers_make_one_job_per_tick_also_with_one_clock_ten_minutes_ahead(
    project: tuple[Path, dict[str, str]], conn: asyncpg.Connection, second_db_dsn: str
) -> None:
    # two groups of five workers at once, each on a database of its own: in the second
    # group, one worker's host clock is ten minutes ahead
    shifted_project = (project[0], {**project[1], "PGTASKS_DSN": second_db_dsn})
    shifted_conn = await asyncpg.connect(second_db_dsn)
    try:
        for c in (conn, shifted_conn):
            await prepare(c)
        agree = [start(project, "worker", "--no-log-jobs") for _ in range(5)]
        shifted = [
            start(shifted_project, "worker", "--no-log-jobs", shift=600.0 if i == 0 else None)
            for i in range(5)
        ]
        try:
            # every worker is up (each wrote its definition); then 20 s of database time
            for c in (conn, shifted_conn):
                await wait_until(c, "SELECT count(*) >= 3 FROM runs")
            begin: dt.datetime = await conn.fetchval("SELECT clock_timestamp()")
            await anyio.sleep(20.5)
            end: dt.datetime = await conn.fetchval("SELECT clock_timestamp()")
            await anyio.sleep(1.5)  # the last ticks' jobs finish
        finally:
            outputs = [stop(w) for w in agree]
            shifted_outputs = [stop(w) for w in shifted]
        await check_one_job_per_tick(conn, begin, end, outputs)
        await check_one_job_per_tick(shifted_conn, begin, end, shifted_outputs)
        # the shifted worker's scheduler ran and raced the others like them
        assert "scheduler started" in shifted_outputs[0]
    finally:
        await shifted_conn.close()


@pytest.mark.slow
async def test_pause_resume_and_trigger_through_the_command_line(
    project: tuple[Path, dict[str, str]], conn: asyncpg.Connection
) -> None:
    await prepare(conn)
    worker = start(project, "worker", "--no-log-jobs")
    try:
        await wait_until(conn, "SELECT count(*) >= 2 FROM runs")
        listed = cli(project, "schedules", "--json")
        assert listed.returncode == 0, listed.stderr
        (row,) = json.loads(listed.stdout)["schedules"]
        assert row["name"] == "every-second"
        assert row["expression"] == "every 1s"
        assert row["state"] == "active"
        assert row["last_job"] in ("waiting", "running", "succeeded")
        paused = cli(project, "schedules", "pause", "every-second")
        assert paused.returncode == 0, paused
        assert "paused" in paused.stdout
        await anyio.sleep(1.0)  # a pass that read the row before the pause may still fire
        count = await conn.fetchval("SELECT count(*) FROM runs")
        await anyio.sleep(3.0)
        assert await conn.fetchval("SELECT count(*) FROM runs") == count
        text = cli(project, "schedules")
        assert text.returncode == 0
        header, line = text.stdout.splitlines()
        assert header.split()[:5] == ["name", "task", "schedule", "tz", "state"]
        assert line.split()[0] == "every-second"
        assert " paused " in line
        triggered = cli(project, "schedules", "trigger", "every-second", "--json")
        assert triggered.returncode == 0, triggered.stderr
        ref = json.loads(triggered.stdout)
        await wait_until(conn, f"SELECT EXISTS (SELECT 1 FROM runs WHERE msg_id = {ref['id']})")
        assert await conn.fetchval("SELECT count(*) FROM runs") == count + 1
        resumed = cli(project, "schedules", "resume", "every-second")
        assert resumed.returncode == 0, resumed
        await wait_until(conn, f"SELECT count(*) >= {count + 3} FROM runs", timeout=10)
        missing = cli(project, "schedules", "pause", "nope")
        assert missing.returncode == 1
        assert missing.stderr.strip() == "pgtasks: error: no schedule named 'nope'"
    finally:
        stop(worker)


@pytest.mark.slow
async def test_the_scheduler_alone_beside_a_worker_without_one(
    project: tuple[Path, dict[str, str]], conn: asyncpg.Connection
) -> None:
    await prepare(conn)
    worker = start(project, "worker", "--no-schedule", "--no-log-jobs")
    try:
        await anyio.sleep(2.5)
        assert await conn.fetchval("SELECT count(*) FROM runs") == 0
        assert not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pgtasks.schedules)")
        scheduler = start(project, "scheduler")
        started = time.monotonic()
        await wait_until(conn, "SELECT count(*) >= 2 FROM runs")
        assert time.monotonic() - started < 15
        out = stop(scheduler)
        assert "scheduler started: every-second (every 1s)" in out
        assert "scheduler stopped" in out
    finally:
        stop(worker)
