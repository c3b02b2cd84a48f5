"""A real PgBouncer for the tests (Debian's package): `Bouncers` starts one per pool mode in
front of the test server, on demand, and stops them all at the end. Used by
tests/db/test_pgbouncer.py, and by ``pytest --via-pgbouncer MODE``, which sends every test's
``db_dsn`` through one (``session`` runs tests/integration/test_worker.py unchanged)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from tests.ops.test_metrics import free_port

PGBOUNCER = shutil.which("pgbouncer") or (
    "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
)


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


def via(dsn: str, port: int) -> str:
    """``dsn``'s database, user and password, through the bouncer on ``port``."""
    parts = urlsplit(dsn)
    user = parts.username or "postgres"
    secret = f":{parts.password}" if parts.password else ""
    return f"postgresql://{user}{secret}@127.0.0.1:{port}{parts.path}"


class Bouncers:
    """PgBouncers in front of the server of ``server_dsn``, one per pool mode."""

    def __init__(self, server_dsn: str) -> None:
        if PGBOUNCER is None:
            raise RuntimeError("pgbouncer is not installed")
        self.server_dsn = server_dsn
        self.started: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        self.base = Path(tempfile.mkdtemp(prefix="pgtasks-pgbouncer-"))
        self.base.chmod(0o755)

    def dsn(self, mode: str, dsn: str) -> str:
        """``dsn`` through the bouncer in ``mode`` (``transaction`` or ``session``)."""
        return via(dsn, self.port(mode))

    def port(self, mode: str) -> int:
        if mode not in self.started:
            self.started[mode] = self._start(mode)
        return self.started[mode][1]

    def _start(self, mode: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        ini = self.base / f"{mode}.ini"
        ini.write_text(
            "[databases]\n"
            f"* = {_target(self.server_dsn)}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {port}\n"
            "unix_socket_dir =\n"
            "auth_type = any\n"
            f"pool_mode = {mode}\n"
            "max_client_conn = 1000\n"
            "default_pool_size = 40\n"
            "ignore_startup_parameters = extra_float_digits\n"
        )
        ini.chmod(0o644)
        command = [str(PGBOUNCER), str(ini)]
        if os.geteuid() == 0:  # it refuses to run as root: it drops to another user
            command[1:1] = ["-u", _bouncer_user(self.server_dsn)]
        log = self.base / f"{mode}.log"  # it logs every connection: a file, not a pipe to fill
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return process, port
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    output = log.read_text(errors="replace")
                    raise RuntimeError(f"pgbouncer did not start: {output}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        for process, _ in self.started.values():
            process.terminate()
            process.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)
