"""What the chaos scenarios share: real CLI workers in subprocesses, and waiting on the state
of the database (never on sleeps alone).

Every process a test starts goes through a `Fleet`, which stops the ones still running when
the test ends (SIGTERM, then SIGKILL by PID), so no scenario leaves a worker behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import asyncpg
import pytest

# Terminate every pgtasks backend (pool and listener) of one database, except our own.
TERMINATE_PGTASKS_BACKENDS = """
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
FROM pg_stat_activity
WHERE datname = current_database()
  AND application_name IN ('pgtasks', 'pgtasks-listener')
  AND pid <> pg_backend_pid()
"""


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


@dataclass
class Proc:
    """One CLI worker: its process and its log file."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)
    stopped: bool = False  # the test stopped it on purpose

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Fleet:
    """The CLI worker processes of one test (``python -m pgtasks worker --app ...``)."""

    def __init__(self, directory: Path, dsn: str, app: str = "chaostasks:app") -> None:
        self.directory = directory
        self.dsn = dsn
        self.app = app
        self.procs: list[Proc] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> Proc:
        environ = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "PGTASKS_APP", "PGTASKS_DSN")
        }
        environ.update(PGTASKS_DSN=self.dsn, PYTHONPATH=str(self.directory), **(env or {}))
        log_path = self.directory / f"worker-{len(self.procs)}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "pgtasks", "worker", "--app", self.app, *args],
                cwd=self.directory,
                env=environ,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proc = Proc(popen, log_path)
        self.procs.append(proc)
        return proc

    def running(self) -> list[Proc]:
        return [p for p in self.procs if p.alive()]

    def kill9(self, proc: Proc) -> None:
        proc.stopped = True
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(timeout=10)

    def terminate(self, proc: Proc) -> None:
        """Send SIGTERM (the caller waits for the exit)."""
        proc.stopped = True
        proc.popen.send_signal(signal.SIGTERM)

    def check_alive(self, procs: list[Proc]) -> None:
        """Fail the test, with its log, if one of these workers has exited."""
        for proc in procs:
            if not proc.alive():
                pytest.fail(
                    f"worker {proc.pid} exited with status {proc.popen.returncode}:\n"
                    + tail(proc.log())
                )

    def check_no_crash(self) -> None:
        """Fail the test at once if a worker the test did not stop has exited."""
        self.check_alive([p for p in self.procs if not p.stopped])

    def close(self) -> None:
        """Stop every worker still running: SIGTERM, then SIGKILL after 15 s."""
        alive = self.running()
        for proc in alive:
            self.terminate(proc)
        deadline = time.monotonic() + 15
        for proc in alive:
            try:
                proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(f"--- worker {p.pid}:\n{tail(p.log())}" for p in self.procs)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float,
    what: str,
    fleet: Fleet | None = None,
    interval: float = 0.1,
) -> float:
    """Poll ``check`` until it is true; returns the seconds it took. Fails the test (with the
    workers' logs) after ``timeout``, or at once if one of the fleet's workers crashed."""
    started = time.monotonic()
    while not await check():
        if fleet is not None:
            fleet.check_no_crash()
        if time.monotonic() - started > timeout:
            logs = f"\n{fleet.logs()}" if fleet is not None else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{logs}")
        await anyio.sleep(interval)
    return time.monotonic() - started


async def count(conn: asyncpg.Connection, sql: str, *args: object) -> int:
    value = await conn.fetchval(sql, *args)
    return int(value or 0)


async def queue_empty(conn: asyncpg.Connection, queue: str) -> bool:
    return await count(conn, f"SELECT count(*) FROM pgmq.q_{queue}") == 0
