"""The commands that run against a database and end: ``migrate``, ``status``, ``prune``,
(from `dead`) ``dead ...`` and (from `schedules`) ``schedules ...``. Each first checks that
the database was migrated, except ``migrate``.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

from ..admin import queues
from ..app import App
from ..db import schema
from . import dead, schedules
from .output import print_json


async def run(app: App, args: argparse.Namespace) -> int:
    async with app:
        if args.command != "migrate":
            await schema.check_installed(await app.pool())
        handler = COMMANDS[args.dead_command if args.command == "dead" else args.command]
        return await handler(app, args)


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


async def status(app: App, args: argparse.Namespace) -> int:
    rows = await queues.status(app.database)
    dead = await app.dead_letters.count()
    if args.json:
        print_json({"queues": [r._asdict() for r in rows], "dead_letters": dead})
        return 0
    print(f"{'queue':<40} {'waiting':>9} {'visible':>9} {'oldest (s)':>10}")
    for r in rows:
        oldest = r.oldest_seconds if r.oldest_seconds is not None else "-"
        print(f"{r.queue:<40} {r.waiting:>9} {r.visible:>9} {oldest:>10}")
    print(f"dead letters: {dead}")
    return 0


async def prune(app: App, args: argparse.Namespace) -> int:
    counts = await app.prune(
        errors_older_than=args.errors_older_than, archive_older_than=args.archive_older_than
    )
    if args.json:
        print_json(counts)
        return 0
    print(
        f"pgtasks: deleted {counts['keys']} expired idempotency key(s), {counts['errors']} "
        f"error record(s), {counts['archived']} archived message(s)"
    )
    return 0


COMMANDS: dict[str, Callable[[App, argparse.Namespace], Awaitable[int]]] = {
    "migrate": migrate,
    "status": status,
    "prune": prune,
    "list": dead.list_letters,
    "show": dead.show_letter,
    "retry": dead.retry_letters,
    "purge": dead.purge_letters,
    "schedules": schedules.command,
}
