"""Attacks on plain ``def`` tasks and ``--processes N`` with real processes (the review of
issue 16): a thread that never returns when the worker is told to stop, a SIGTERM that
reaches worker processes before they can handle it, and a supervisor killed while a
thread runs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

import pgtasks

TASKS = """
import os
import re
import time

import psycopg

import pgtasks

app = pgtasks.App()


def record(table: str, n: int, note: str = "") -> None:
    with psycopg.connect(os.environ["PGTASKS_DSN"], autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {table} (n, pid, note) VALUES (%s, %s, %s)", (n, os.getpid(), note)
        )


@app.task(queue="rev_deaf", lease=3)
def deaf(n: int) -> None:
    record("started", n)
    if pgtasks.current_job().attempt == 1:
        time.sleep(3600)  # never looks at cancel_requested
    record("runs", n)


@app.task(queue="rev_polite", lease=3)
def polite(n: int) -> None:
    record("started", n)
    job = pgtasks.current_job()
    while not job.cancel_requested:
        time.sleep(0.05)
    record("runs", n, job.cancel_reason or "")
"""


class Project:
    """A module of tasks in a directory of its own, its tables, and the processes a test
    starts there (each one's output in a file, read while it runs)."""

    def __init__(self, path: Path, dsn: str) -> None:
        self.path = path
        self.dsn = dsn
        self.env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGTASKS_APP")}
        self.env["PGTASKS_DSN"] = dsn
        self.env["PYTHONPATH"] = str(path)
        (path / "revtasks.py").write_text(textwrap.dedent(TASKS))
        for table in ("started", "runs"):
            self.sql(f"CREATE TABLE {table} (n integer NOT NULL, pid integer NOT NULL, note text)")
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = self.path / f"worker-{len(self.procs)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pgtasks", "worker", "--app", "revtasks:app", *args],
                cwd=self.path,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append((proc, log_path))
        return proc, log_path

    def sql(self, sql: str) -> list[tuple[object, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description is not None else []

    def defer(self, task: str, n: int) -> None:
        app = pgtasks.App(self.dsn)

        @app.task(queue=f"rev_{task}", name=f"revtasks.{task}")
        def stub(n: int) -> None: ...

        try:
            stub.defer_sync(n)
        finally:
            app.close_sync()

    def until(self, check: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(log.read_text(errors="replace") for _, log in self.procs)

    def close(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def project(tmp_path: Path, db_dsn: str) -> Iterator[Project]:
    p = Project(tmp_path, db_dsn)
    try:
        yield p
    finally:
        p.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait(proc: subprocess.Popen[bytes], timeout: float, project: Project) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pid {proc.pid} did not exit within {timeout}s:\n{project.logs()}")


def _count(project: Project, sql: str) -> int:
    (row,) = project.sql(sql)
    return int(str(row[0]))


@pytest.mark.slow
def test_a_thread_that_never_returns_ends_with_its_process_and_runs_again_once(
    project: Project,
) -> None:
    """SIGTERM to a worker whose thread sleeps for an hour, deaf to the flag: the worker
    exits within its grace (1 s) + 3 s + its shutdown (status 1: a job was left), writes
    nothing for the job (neither released nor acked: the lease lapses), and the next
    worker runs it once, after the process (and so the thread) is gone."""
    project.defer("deaf", 1)
    first, _ = project.start("-q", "rev_deaf", "--shutdown-timeout", "1")
    project.until(lambda: _count(project, "SELECT count(*) FROM started") == 1, "a start", 30)
    stopped_at = time.monotonic()
    first.send_signal(signal.SIGTERM)
    assert _wait(first, 30, project) == 1, project.logs()
    assert time.monotonic() - stopped_at < 20, project.logs()  # 1 s + 3 s + its shutdown
    assert "still runs in its thread" in project.logs()
    ((read_ct, released),) = project.sql(
        "SELECT read_ct, headers->>'x-pgtasks-released' FROM pgmq.q_rev_deaf"
    )
    assert (read_ct, released) == (1, None)  # neither handed back nor acked
    second, _ = project.start("-q", "rev_deaf", "--poll-interval", "0.2")
    project.until(lambda: _count(project, "SELECT count(*) FROM runs") == 1, "the rerun", 30)
    second.send_signal(signal.SIGTERM)
    assert _wait(second, 30, project) == 0, project.logs()
    assert _count(project, "SELECT count(*) FROM started") == 2
    assert _count(project, f"SELECT count(*) FROM runs WHERE pid = {first.pid}") == 0
    assert _count(project, "SELECT count(*) FROM pgmq.q_rev_deaf") == 0


def test_sigterm_while_the_workers_start_is_a_clean_stop(project: Project) -> None:
    """A SIGTERM forwarded to worker processes that have not installed their handlers yet
    (Python still starting) ends them by the signal's default action: they had claimed
    nothing, so the supervisor's stop is clean (exit 0), not a failure."""
    sup, log = project.start("--processes", "2")
    project.until(lambda: "worker process 1 started" in log.read_text(), "the starts", 30)
    sup.send_signal(signal.SIGTERM)
    assert _wait(sup, 60, project) == 0, project.logs()


def test_a_killed_supervisor_lets_a_thread_stop_and_hand_its_job_back(
    project: Project,
) -> None:
    """kill -9 of the supervisor while its worker runs a plain def task: the worker notices
    within a second and stops gracefully; the thread is told "stop", returns, and the
    message is handed back at once with the attempt given back."""
    project.defer("polite", 1)
    sup, log = project.start("--processes", "2", "--shutdown-timeout", "0.5")
    project.until(lambda: _count(project, "SELECT count(*) FROM started") == 1, "a start", 30)
    sup.kill()
    sup.wait()
    project.until(lambda: _count(project, "SELECT count(*) FROM runs") == 1, "the stop", 30)
    ((pid, note),) = project.sql("SELECT pid, note FROM runs")
    assert note == "stop"
    project.until(lambda: not _alive(int(str(pid))), "the worker to exit", 30)
    ((read_ct, released, visible),) = project.sql(
        "SELECT read_ct, (headers->>'x-pgtasks-released')::int, vt <= clock_timestamp() "
        "FROM pgmq.q_rev_polite"
    )
    assert (read_ct, released, visible) == (1, 1, True), log.read_text()


def test_a_worker_stopped_alone_is_restarted(project: Project) -> None:
    """A SIGTERM sent to one worker process rather than to the supervisor: that worker
    stops cleanly (exit 0), and the supervisor, asked for two workers, starts another
    instead of running on with one without a word."""
    sup, log = project.start("--processes", "2")

    def pids() -> list[int]:
        text = log.read_text()
        return [int(p) for p in re.findall(r"worker process \d+ started \(pid (\d+)\)", text)]

    project.until(lambda: len(pids()) == 2, "two workers", 30)
    project.until(lambda: log.read_text().count("worker started") >= 2, "both running", 30)
    os.kill(pids()[0], signal.SIGTERM)
    project.until(lambda: len(pids()) == 3, "a replacement", 30)
    assert "exited with status 0; restarting it" in log.read_text()
    sup.send_signal(signal.SIGTERM)
    assert _wait(sup, 60, project) == 0, project.logs()
    assert not any(_alive(pid) for pid in pids())
