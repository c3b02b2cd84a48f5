"""``python -m pgtasks``: the command line.

Commands: ``worker``, ``migrate``, ``status``, ``prune``. ``--app module:attr`` (or
``PGTASKS_APP``) names the user's `App`; ``--dsn`` overrides its database. Errors pgtasks
raises on purpose print as one line on stderr with exit status 1. Only this module installs
signal handlers: SIGTERM and SIGINT stop a worker gracefully, a second SIGINT at once.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from . import schema
from ._version import __version__
from .app import App
from .exceptions import ConfigurationError, PgTasksError

logger = logging.getLogger("pgtasks")


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
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise ConfigurationError(
            f"--app {spec!r}: {module_name}.{attr} is {type(app).__name__}, not a pgtasks.App"
        )
    if dsn:
        app._explicit_dsn = dsn
        app._dsn_source = None
    return app


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--app",
        default=os.environ.get("PGTASKS_APP"),
        help="the App to use, as module:attribute (default: $PGTASKS_APP)",
    )
    common.add_argument("--dsn", help="database URL (default: the app's, $PGTASKS_DSN, ...)")
    common.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )

    parser = argparse.ArgumentParser(
        prog="pgtasks", description="pgtasks: a task queue on pgmq, inside your Postgres."
    )
    parser.add_argument("--version", action="version", version=f"pgtasks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = sub.add_parser("worker", parents=[common], help="run a worker")
    worker.add_argument(
        "-q", "--queues", help="comma-separated queues (default: every registered task's)"
    )
    worker.add_argument("-c", "--concurrency", type=int, default=10, help="jobs at once")
    worker.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds running jobs get to finish on SIGTERM (default 30)",
    )
    worker.add_argument(
        "--burst", action="store_true", help="exit 0 once the queues have no visible jobs"
    )
    worker.add_argument(
        "--no-listen",
        action="store_true",
        help="poll only, no LISTEN (e.g. behind PgBouncer in transaction mode)",
    )
    worker.add_argument(
        "--poll-interval", type=float, default=5.0, help="safety poll, seconds (default 5)"
    )

    migrate = sub.add_parser(
        "migrate", parents=[common], help="install pgmq, the pgtasks schema and the queues"
    )
    migrate.add_argument(
        "--sql", action="store_true", help="print the SQL it would run, and change nothing"
    )

    sub.add_parser("status", parents=[common], help="queue depths and dead letters")
    sub.add_parser("prune", parents=[common], help="delete idempotency keys past their retention")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        app = load_app(args.app, args.dsn)
        if args.command == "worker":
            return _run_worker(app, args)
        status: int = asyncio.run(_COMMANDS[args.command](app, args))
        return status
    except PgTasksError as exc:
        print(f"pgtasks: error: {exc}", file=sys.stderr)
        return 1


async def _migrate(app: App, args: argparse.Namespace) -> int:
    async with app:
        if args.sql:
            print(schema.render(await app.migration_plan()), end="")
        else:
            steps = await app.migrate()
            print(f"pgtasks: {len(steps)} step(s) applied" if steps else "pgtasks: up to date")
    return 0


async def _status(app: App, args: argparse.Namespace) -> int:
    async with app:
        pool = await app.pool()
        rows = await pool.fetch(
            "SELECT queue_name, queue_length, queue_visible_length, oldest_msg_age_sec "
            "FROM pgmq.metrics_all() ORDER BY queue_name"
        )
        dead = await pool.fetchval("SELECT count(*) FROM pgtasks.dead_letters")
    print(f"{'queue':<40} {'waiting':>9} {'visible':>9} {'oldest (s)':>10}")
    for r in rows:
        print(f"{r[0]:<40} {r[1]:>9} {r[2]:>9} {r[3] if r[3] is not None else '-':>10}")
    print(f"dead letters: {dead}")
    return 0


async def _prune(app: App, args: argparse.Namespace) -> int:
    async with app:
        print(f"pgtasks: {await app.prune_keys()} expired idempotency key(s) deleted")
    return 0


_COMMANDS: dict[str, Any] = {"migrate": _migrate, "status": _status, "prune": _prune}


def _run_worker(app: App, args: argparse.Namespace) -> int:
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    worker = app.worker(
        queues=queues,
        concurrency=args.concurrency,
        burst=args.burst,
        shutdown_timeout=args.shutdown_timeout,
        listen=not args.no_listen,
        poll_interval=args.poll_interval,
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        interrupts = 0

        def on_signal(signum: int) -> None:
            nonlocal interrupts
            interrupts += signum == signal.SIGINT
            force = interrupts > 1
            logger.info(
                "pgtasks: %s received, %s",
                signal.Signals(signum).name,
                "stopping now" if force else "finishing running jobs (SIGINT again: stop now)",
            )
            worker.stop(force=force)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            await worker.run()
        finally:
            await app.close()

    asyncio.run(run())
    return 0
