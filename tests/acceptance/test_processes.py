"""``pgtasks worker --processes N`` with real processes: jobs run in N worker processes, a
SIGTERM to the supervisor stops them all and exits 0, a worker killed with SIGKILL is
restarted and its jobs run elsewhere, a burst ends when the queues are empty, and the
workers stop by themselves when the supervisor is killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

import pgtasks

TASKS = """
import os
import time

import anyio
import psycopg

import pgtasks

app = pgtasks.App()


@app.task(queue="proc_runs")
def record(n: int) -> None:  # a plain def: in a worker thread
    with psycopg.connect(os.environ["PGTASKS_DSN"]) as conn:
        conn.execute("INSERT INTO runs (n, pid) VALUES (%s, %s)", (n, os.getpid()))


@app.task(queue="proc_slow", lease=2)
async def slow(n: int, seconds: float) -> None:
    pool = await app.pool()
    await pool.execute("INSERT INTO started (n, pid) VALUES ($1, $2)", n, os.getpid())
    await anyio.sleep(seconds)
    await pool.execute("INSERT INTO runs (n, pid) VALUES ($1, $2)", n, os.getpid())
"""


@pytest.fixture
def project(tmp_path: Path, db_dsn: str) -> tuple[Path, dict[str, str]]:
    (tmp_path / "proctasks.py").write_text(textwrap.dedent(TASKS))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGTASKS_APP")}
    env["PGTASKS_DSN"] = db_dsn
    env["PYTHONPATH"] = str(tmp_path)
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE runs (n integer NOT NULL, pid integer NOT NULL)")
        conn.execute("CREATE TABLE started (n integer NOT NULL, pid integer NOT NULL)")
    return tmp_path, env


class Supervised:
    """The supervisor process, its output in a file (read while it runs)."""

    def __init__(self, project: tuple[Path, dict[str, str]], *args: str) -> None:
        cwd, env = project
        self.log_path = cwd / f"supervisor-{time.monotonic_ns()}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgtasks", "worker", "--app", "proctasks:app", *args],
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"worker process \d+ started \(pid (\d+)\)", self.log())]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the supervisor did not exit within {timeout}s:\n{self.log()}")

    def close(self) -> None:
        """Whatever a test left running: the supervisor, then its workers (by PID)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.worker_pids():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a child of ours that exited but was not reaped yet is a zombie: not alive
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _until(check: Callable[[], bool], what: str, timeout: float, sup: Supervised) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if sup.proc.poll() is not None:
            pytest.fail(
                f"the supervisor exited ({sup.proc.returncode}) before {what}:\n{sup.log()}"
            )
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{sup.log()}")


def _count(dsn: str, sql: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


def _defer(dsn: str, calls: list[tuple[str, tuple[object, ...]]]) -> None:
    app = pgtasks.App(dsn)

    @app.task(queue="proc_runs", name="proctasks.record")
    def record(n: int) -> None: ...

    @app.task(queue="proc_slow", name="proctasks.slow")
    def slow(n: int, seconds: float) -> None: ...

    tasks: dict[str, pgtasks.SyncTask[..., None]] = {"record": record, "slow": slow}
    try:
        app.defer_many_sync([tasks[name].s(*args) for name, args in calls])
    finally:
        app.close_sync()


def test_jobs_run_in_every_process_and_sigterm_stops_them_all(
    project: tuple[Path, dict[str, str]], db_dsn: str
) -> None:
    _defer(db_dsn, [("record", (i,)) for i in range(300)])
    sup = Supervised(project, "--processes", "2", "-c", "4")
    try:
        _until(lambda: _count(db_dsn, "SELECT count(*) FROM runs") >= 300, "300 runs", 60, sup)
        pids = sup.worker_pids()
        assert len(pids) == 2
        ran_in = _count(db_dsn, "SELECT count(DISTINCT pid) FROM runs")
        assert ran_in == 2, "both worker processes should have run jobs"
        assert _count(db_dsn, f"SELECT count(*) FROM runs WHERE pid = {sup.proc.pid}") == 0
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0, sup.log()
        assert not any(_alive(pid) for pid in pids)
        log = sup.log()
        assert log.count("SIGTERM received") >= 3  # the supervisor's line and each worker's
        assert "supervisor: every worker process has exited" in log
        assert "[worker 0, pid" in log
        assert "[worker 1, pid" in log
    finally:
        sup.close()
    assert _count(db_dsn, "SELECT count(*) FROM runs") == 300  # each exactly once
    assert _count(db_dsn, "SELECT count(DISTINCT n) FROM runs") == 300


def test_a_killed_worker_is_restarted_and_its_jobs_run_elsewhere(
    project: tuple[Path, dict[str, str]], db_dsn: str
) -> None:
    _defer(db_dsn, [("slow", (i, 3.0)) for i in range(8)])
    sup = Supervised(project, "--processes", "2", "-c", "4", "--poll-interval", "0.5")
    try:
        _until(lambda: len(set(sup.worker_pids())) == 2, "two workers", 30, sup)
        _until(
            lambda: _count(db_dsn, "SELECT count(DISTINCT pid) FROM started") == 2,
            "both workers running jobs",
            30,
            sup,
        )
        victim = sup.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        _until(lambda: "was killed by SIGKILL; restarting it" in sup.log(), "the restart", 10, sup)
        _until(lambda: len(sup.worker_pids()) == 3, "a new worker", 10, sup)
        # the killed worker's jobs come back when their 2 s leases lapse, and run to the end
        _until(
            lambda: _count(db_dsn, "SELECT count(DISTINCT n) FROM runs") == 8,
            "every job to finish",
            60,
            sup,
        )
        assert _count(db_dsn, f"SELECT count(*) FROM runs WHERE pid = {victim}") == 0
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0, sup.log()
    finally:
        sup.close()


def test_a_burst_ends_when_the_queues_are_empty(
    project: tuple[Path, dict[str, str]], db_dsn: str
) -> None:
    _defer(db_dsn, [("record", (i,)) for i in range(100)])
    sup = Supervised(project, "--processes", "2", "--burst")
    try:
        assert sup.wait(90) == 0, sup.log()
    finally:
        sup.close()
    assert _count(db_dsn, "SELECT count(DISTINCT n) FROM runs") == 100


def test_workers_stop_when_the_supervisor_is_killed(
    project: tuple[Path, dict[str, str]], db_dsn: str
) -> None:
    sup = Supervised(project, "--processes", "2")
    try:
        _until(lambda: len(sup.worker_pids()) == 2, "two workers", 30, sup)
        time.sleep(1.0)
        pids = sup.worker_pids()
        sup.proc.send_signal(signal.SIGKILL)
        sup.proc.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), sup.log()
        assert sup.log().count("the supervisor (pid") == 2
    finally:
        sup.close()
