"""The real CLI worker in subprocesses: burst, two workers, SIGTERM, double SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import asyncpg
import pytest

import pgtasks

TASKS = """
import asyncio
import os

import pgtasks

app = pgtasks.App()


@app.task(queue="cli_runs")
async def record(n: int) -> None:
    pool = await app.pool()
    await pool.execute("INSERT INTO runs (n, pid) VALUES ($1, $2)", n, os.getpid())


@app.task(queue="cli_slow")
async def slow(seconds: float) -> None:
    await asyncio.sleep(seconds)
"""


@pytest.fixture
def project(tmp_path: Path, db_dsn: str) -> tuple[Path, dict[str, str]]:
    (tmp_path / "clitasks.py").write_text(textwrap.dedent(TASKS))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGTASKS_APP")}
    env["PGTASKS_DSN"] = db_dsn
    env["PYTHONPATH"] = str(tmp_path)
    return tmp_path, env


def start_worker(project: tuple[Path, dict[str, str]], *args: str) -> subprocess.Popen[str]:
    cwd, env = project
    return subprocess.Popen(
        [sys.executable, "-m", "pgtasks", "worker", "--app", "clitasks:app", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"worker did not exit within {timeout}s:\n{out}")
    return proc.returncode, out


async def wait_claimed(conn: asyncpg.Connection, queue: str, count: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        claimed = await conn.fetchval(f"SELECT count(*) FROM pgmq.q_{queue} WHERE read_ct > 0")
        if claimed >= count:
            return
        await _sleep(0.05)
    pytest.fail(f"the worker never claimed {count} message(s) in {queue}")


async def _sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)


async def test_two_workers_run_every_job_exactly_once(
    project: tuple[Path, dict[str, str]], db_dsn: str, conn: asyncpg.Connection
) -> None:
    await conn.execute("CREATE TABLE runs (n integer NOT NULL, pid integer NOT NULL)")
    app = pgtasks.App(db_dsn)
    record = app.task(queue="cli_runs", name="clitasks.record")(_record_stub)
    try:
        await app.defer_many([record.s(i) for i in range(10_000)])
    finally:
        await app.close()
    workers = [start_worker(project, "--burst", "-c", "20") for _ in range(2)]
    for proc in workers:
        code, out = finish(proc, timeout=180)
        assert code == 0, out
        assert "burst: the queues are empty" in out
    row = await conn.fetchrow("SELECT count(*), count(DISTINCT n) FROM runs")
    assert row is not None
    assert tuple(row) == (10_000, 10_000)
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_cli_runs") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_cli_runs") == 10_000


async def _record_stub(n: int) -> None:
    raise AssertionError("only deferred from the test, run by the subprocess")


async def test_sigterm_finishes_short_jobs_and_releases_the_rest(
    project: tuple[Path, dict[str, str]], db_dsn: str, conn: asyncpg.Connection
) -> None:
    app = pgtasks.App(db_dsn)
    slow = app.task(queue="cli_slow", name="clitasks.slow")(_slow_stub)
    try:
        long_refs = [await slow.defer(600), await slow.defer(600)]
        short_ref = await slow.defer(0.5)
    finally:
        await app.close()
    proc = start_worker(project, "-c", "4", "--shutdown-timeout", "2")
    await wait_claimed(conn, "cli_slow", 3)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=15)
    elapsed = time.monotonic() - started
    assert code == 0, out
    assert elapsed < 2 + 2, f"exit took {elapsed:.1f}s"
    rows = await conn.fetch(
        "SELECT msg_id, read_ct, vt <= clock_timestamp() AS visible, "
        "headers->>'x-pgtasks-released' AS released FROM pgmq.q_cli_slow ORDER BY msg_id"
    )
    assert [(r["msg_id"], r["read_ct"], r["visible"], r["released"]) for r in rows] == [
        (ref.id, 1, True, "1")
        for ref in long_refs  # visible now, the attempt given back
    ]
    archived = await conn.fetchval("SELECT array_agg(msg_id) FROM pgmq.a_cli_slow")
    assert archived == [short_ref.id]
    assert "worker stopped: 1 succeeded" in out


async def test_second_sigint_stops_at_once(
    project: tuple[Path, dict[str, str]], db_dsn: str, conn: asyncpg.Connection
) -> None:
    app = pgtasks.App(db_dsn)
    slow = app.task(queue="cli_slow", name="clitasks.slow")(_slow_stub)
    try:
        ref = await slow.defer(600)
    finally:
        await app.close()
    proc = start_worker(project, "--shutdown-timeout", "600")
    await wait_claimed(conn, "cli_slow", 1)
    proc.send_signal(signal.SIGINT)
    await _sleep(0.3)
    proc.send_signal(signal.SIGINT)
    code, out = finish(proc, timeout=10)
    assert code == 0, out
    visible = await conn.fetchval(
        "SELECT vt <= clock_timestamp() FROM pgmq.q_cli_slow WHERE msg_id = $1", ref.id
    )
    assert visible, out


async def _slow_stub(seconds: float) -> None:
    raise AssertionError("only deferred from the test, run by the subprocess")


def test_worker_with_a_bad_dsn_prints_one_line(project: tuple[Path, dict[str, str]]) -> None:
    proc = start_worker(project, "--dsn", "postgresql://nobody@127.0.0.1:1/nothing")
    code, out = finish(proc, timeout=30)
    assert code == 1
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("pgtasks: error: cannot connect to PostgreSQL at")
    assert "127.0.0.1:1/nothing" in lines[0]
