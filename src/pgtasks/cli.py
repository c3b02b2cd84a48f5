"""``python -m pgtasks``: the command line.

Commands: ``worker``, ``migrate``, ``status``, ``prune``, ``dead list|show|retry|purge``.
``--app module:attr`` (or ``PGTASKS_APP``) names the user's `App`; ``--dsn`` overrides its
database. Errors pgtasks raises on purpose print as one line on stderr with exit status 1.
Only this module installs signal handlers: SIGTERM and SIGINT stop a worker gracefully, a
second SIGINT at once.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from . import schema
from ._version import __version__
from .app import App
from .dead_letters import DeadLetter
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
        "--log-level",
        help="DEBUG, INFO, WARNING or ERROR (default: INFO for worker, else WARNING)",
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
    prune = sub.add_parser(
        "prune",
        parents=[common],
        help="delete expired idempotency keys, old error history and (optionally) archives",
    )
    prune.add_argument(
        "--errors-older-than",
        type=duration,
        default=dt.timedelta(days=7),
        help="error history age to keep, e.g. 7d, 12h (default 7d; dead letters keep theirs)",
    )
    prune.add_argument(
        "--archive-older-than",
        type=duration,
        help="also delete archived (succeeded) messages older than this, e.g. 30d",
    )

    dead = sub.add_parser("dead", help="inspect, retry and purge dead letters")
    dead_sub = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    dead_list = dead_sub.add_parser("list", parents=[common], help="the newest dead letters")
    dead_list.add_argument("--queue")
    dead_list.add_argument("--task")
    dead_list.add_argument("--limit", type=int, default=50)
    dead_show = dead_sub.add_parser(
        "show", parents=[common], help="one dead letter: payload and every attempt's error"
    )
    dead_show.add_argument("id", type=int)
    dead_retry = dead_sub.add_parser(
        "retry", parents=[common], help="enqueue dead letters again, with fresh attempts"
    )
    dead_retry.add_argument("ids", type=int, nargs="*", metavar="ID")
    dead_retry.add_argument("--all", action="store_true", help="every dead letter (of --queue)")
    dead_retry.add_argument("--queue")
    dead_purge = dead_sub.add_parser("purge", parents=[common], help="delete dead letters")
    dead_purge.add_argument("--older-than", type=duration, help="e.g. 7d, 12h, 30m")
    dead_purge.add_argument("--queue")
    return parser


def duration(text: str) -> dt.timedelta:
    """``7d``, ``12h``, ``30m``, ``45s`` (or plain seconds) as a timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhms]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: use a number with d, h, m or s, like 7d or 12h"
        )
    unit = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds", "": "seconds"}
    return dt.timedelta(**{unit[match[2]]: float(match[1])})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "worker" else "WARNING")
    logging.basicConfig(
        level=level.upper(),
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
        counts = await app.prune(
            errors_older_than=args.errors_older_than,
            archive_older_than=args.archive_older_than,
        )
    print(
        f"pgtasks: deleted {counts['keys']} expired idempotency key(s), {counts['errors']} "
        f"error record(s), {counts['archived']} archived message(s)"
    )
    return 0


async def _dead(app: App, args: argparse.Namespace) -> int:
    async with app:
        dead = app.dead_letters
        if args.dead_command == "list":
            rows = await dead.list(queue=args.queue, task=args.task, limit=args.limit)
            print(f"{'id':>8} {'queue':<20} {'task':<40} {'tries':>5} {'failed at':<20} reason")
            for d in rows:
                print(
                    f"{d.id:>8} {d.queue:<20} {d.task or '?':<40} {d.attempts:>5} "
                    f"{d.failed_at:%Y-%m-%d %H:%M:%S}  {d.reason}"
                )
        elif args.dead_command == "show":
            _show(await dead.get(args.id))
        elif args.dead_command == "retry":
            if bool(args.ids) == bool(args.all):
                raise ConfigurationError("dead retry: give dead letter ids, or --all")
            refs = (
                await dead.retry_all(queue=args.queue)
                if args.all
                else await dead.retry(args.ids, queue=args.queue)
            )
            for ref in refs:
                note = " (deduplicated: its idempotency key is held)" if ref.deduplicated else ""
                print(f"re-enqueued as job {ref.id} in queue {ref.queue}{note}")
            print(f"pgtasks: {len(refs)} dead letter(s) retried")
        else:
            count = await dead.purge(older_than=args.older_than, queue=args.queue)
            print(f"pgtasks: {count} dead letter(s) deleted")
    return 0


def _show(d: DeadLetter) -> None:
    print(f"dead letter {d.id}: job {d.msg_id} in queue {d.queue}, task {d.task or '?'}")
    print(
        f"  enqueued {d.enqueued_at:%Y-%m-%d %H:%M:%S%z}, failed {d.failed_at:%Y-%m-%d %H:%M:%S%z}"
    )
    print(f"  attempts: {d.attempts}")
    print(f"  reason: {d.reason}")
    print(f"  message: {orjson.dumps(d.message).decode()}")
    if d.headers:
        print(f"  headers: {orjson.dumps(d.headers).decode()}")
    for h in d.history:
        print(
            f"  attempt {h.attempt} on {h.worker} at {h.failed_at:%Y-%m-%d %H:%M:%S%z}: "
            f"{h.error_type}: {h.message}"
        )
        if h.traceback:
            print("    " + h.traceback.rstrip().replace("\n", "\n    "))


_COMMANDS: dict[str, Any] = {
    "migrate": _migrate,
    "status": _status,
    "prune": _prune,
    "dead": _dead,
}


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
                "%s received, %s",
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
