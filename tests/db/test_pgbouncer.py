"""pgtasks through a real PgBouncer (Debian's package; the tests skip where it is missing),
as docs/operations.md describes it: in transaction mode, producers (with
``statement_cache_size=0``, since PgBouncer before 1.21 cannot keep prepared statements) and
a poll-only worker; in session mode, a listening worker woken by its notifications.

PgBouncer refuses ``lock_timeout`` as a connection parameter, which the worker's own
connections send: the worker then connects without it and says so once."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import asyncpg
import pytest

import pgtasks
from tests.helpers import Events

from ..ops.test_metrics import free_port

PGBOUNCER = shutil.which("pgbouncer") or (
    "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
)
pytestmark = pytest.mark.skipif(PGBOUNCER is None, reason="pgbouncer is not installed")


def _target(dsn: str) -> str:
    """The `[databases]` line's connection string for the server of ``dsn``, any database."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
    line = f"host={host} port={parts.port or 5432} user={unquote(parts.username or 'postgres')}"
    if parts.password:
        line += f" password={unquote(parts.password)}"
    return line


def _bouncer_user(dsn: str) -> str:
    """Whom PgBouncer runs as when started by root: the owner of the server's socket
    directory (an embedded server's is private to it), else ``postgres`` or ``nobody``."""
    parts = urlsplit(dsn)
    host = parse_qs(parts.query).get("host", [parts.hostname or ""])[0]
    if host.startswith("/"):
        return Path(host).owner()
    names = {p.pw_name for p in pwd.getpwall()}
    return "postgres" if "postgres" in names else "nobody"


def _via(dsn: str, port: int) -> str:
    """``dsn``'s database, user and password, through the bouncer on ``port``."""
    parts = urlsplit(dsn)
    user = parts.username or "postgres"
    secret = f":{parts.password}" if parts.password else ""
    return f"postgresql://{user}{secret}@127.0.0.1:{port}{parts.path}"


@pytest.fixture(scope="module")
def bouncer(server_dsn: str) -> Iterator[Callable[[str, str], str]]:
    """Starts PgBouncers on demand: ``bouncer(mode, dsn)`` is ``dsn`` through one in
    ``mode`` (``transaction`` or ``session``); all are stopped after the module."""
    started: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    base = Path(tempfile.mkdtemp(prefix="pgtasks-pgbouncer-"))
    base.chmod(0o755)

    def start(mode: str, dsn: str) -> str:
        if mode not in started:
            port = free_port()
            ini = base / f"{mode}.ini"
            ini.write_text(
                "[databases]\n"
                f"* = {_target(server_dsn)}\n"
                "[pgbouncer]\n"
                "listen_addr = 127.0.0.1\n"
                f"listen_port = {port}\n"
                "unix_socket_dir =\n"
                "auth_type = any\n"
                f"pool_mode = {mode}\n"
                "max_client_conn = 500\n"
                "default_pool_size = 40\n"
                "ignore_startup_parameters = extra_float_digits\n"
            )
            ini.chmod(0o644)
            command = [str(PGBOUNCER), str(ini)]
            if os.geteuid() == 0:  # it refuses to run as root: it drops to another user
                command[1:1] = ["-u", _bouncer_user(server_dsn)]
            log = base / f"{mode}.log"  # it logs every connection: a file, not a pipe to fill
            with log.open("wb") as out:
                process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        output = log.read_text(errors="replace")
                        raise RuntimeError(f"pgbouncer did not start: {output}") from None
                    time.sleep(0.05)
            started[mode] = (process, port)
        return _via(dsn, started[mode][1])

    try:
        yield start
    finally:
        for process, _ in started.values():
            process.terminate()
            process.wait(10)
        shutil.rmtree(base, ignore_errors=True)


async def test_producers_and_a_poll_only_worker_through_transaction_pooling(
    db_dsn: str,
    bouncer: Callable[[str, str], str],
    conn: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = pgtasks.App(bouncer("transaction", db_dsn), statement_cache_size=0)
    runs: list[int] = []

    @app.task(queue="bounced")
    async def square(n: int) -> int:
        runs.append(n)
        return n * n

    try:
        refs = [await square.defer(n) for n in range(50)]
        refs += await app.defer_many(square.s(n) for n in range(50, 200))
        first = await square.options(idempotency_key="once").defer(1000)
        again = await square.options(idempotency_key="once").defer(1000)
        assert again.id == first.id
        pool = await app.pool()
        async with pool.acquire() as held:  # the caller's transaction, through the bouncer
            tx = held.transaction()
            await tx.start()
            await square.options(connection=held).defer(-1)
            await tx.rollback()

        with caplog.at_level(logging.WARNING, logger="pgtasks"):
            async with app.worker(listen=False, poll_interval=0.1, concurrency=20) as worker:
                events = Events(worker)
                await events.until(lambda: events.counts["succeeded"] == 201, timeout=60)
                assert [await r.result(timeout=10) for r in refs[:3]] == [0, 1, 4]
        assert sorted(runs) == [*range(200), 1000]  # each once; the rolled-back one never
        refused = [r for r in caplog.records if "refuses lock_timeout" in r.getMessage()]
        assert len(refused) == 1  # said once, though the worker opened several connections
        assert "ALTER ROLE" in refused[0].getMessage()
    finally:
        await app.close()
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_bounced") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_bounced") == 201


async def test_a_listening_worker_through_session_pooling_is_woken_by_notifications(
    db_dsn: str, bouncer: Callable[[str, str], str]
) -> None:
    app = pgtasks.App(bouncer("session", db_dsn))
    started = anyio.Event()

    @app.task(queue="woken")
    async def ping() -> None:
        started.set()

    try:
        async with app.worker(poll_interval=30):  # only a notification wakes it in time
            await anyio.sleep(0.5)  # idle: listening
            before = time.monotonic()
            await ping.defer()
            with anyio.fail_after(5):
                await started.wait()
            assert time.monotonic() - before < 2
    finally:
        await app.close()
