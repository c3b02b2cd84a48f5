"""The commands that run against a database and end: ``migrate``, ``status``, ``prune``,
(from `dead`) ``dead ...`` and (from `schedules`) ``schedules ...``. Each first checks that
the database was migrated, except ``migrate``.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

from ..app import App
from ..db import schema
from . import dead, jobs, schedules, workflows
from .doctor import doctor
from .output import print_json
from .status import status


async def run(app: App, args: argparse.Namespace) -> int:
    async with app:
        if args.command != "migrate":
            await schema.check_installed(await app.pool())
        handler = COMMANDS[_name(args)]
        return await handler(app, args)


def _name(args: argparse.Namespace) -> str:
    if args.command == "dead":
        return str(args.dead_command)
    if args.command in ("job", "workflow"):
        sub = args.job_command if args.command == "job" else args.workflow_command
        return f"{args.command} {sub}"
    return str(args.command)


async def migrate(app: App, args: argparse.Namespace) -> int:
    if args.sql:
        steps = await app.migration_plan()
        if args.json:
            print_json({"steps": [{"description": s.description, "sql": s.sql} for s in steps]})
        else:
            print(schema.render(steps), end="")
        return 0
    steps = await app.migrate()
    if args.json:
        print_json({"steps": [{"description": s.description} for s in steps]})
    else:
        print(f"pgtasks: {len(steps)} step(s) applied" if steps else "pgtasks: up to date")
    return 0


async def prune(app: App, args: argparse.Namespace) -> int:
    counts = await app.prune(
        errors_older_than=args.errors_older_than,
        archive_older_than=args.archive_older_than,
        workers_older_than=args.workers_older_than,
        workflows_older_than=args.workflows_older_than,
    )
    if args.json:
        print_json(counts)
        return 0
    print(
        f"pgtasks: deleted {counts['keys']} expired idempotency key(s), {counts['errors']} "
        f"error record(s), {counts['results']} job record(s) past result_ttl, "
        f"{counts['cancel_requests']} stale cancel request(s), {counts['workers']} worker "
        f"row(s), {counts['workflows']} finished workflow(s), {counts['archived']} archived "
        "message(s)"
    )
    return 0


COMMANDS: dict[str, Callable[[App, argparse.Namespace], Awaitable[int]]] = {
    "migrate": migrate,
    "status": status,
    "doctor": doctor,
    "prune": prune,
    "list": dead.list_letters,
    "show": dead.show_letter,
    "retry": dead.retry_letters,
    "purge": dead.purge_letters,
    "job show": jobs.show,
    "job list": jobs.list_jobs,
    "cancel": jobs.cancel,
    "workflow show": workflows.show,
    "schedules": schedules.command,
}
