"""``pgtasks dead list|show|retry|purge``: the dead letters, through `App.dead_letters`."""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

from ..app import App
from ..exceptions import ConfigurationError
from ..tasks import JobRef
from .output import dead_table, print_json, print_letter, summary_json


async def list_letters(app: App, args: argparse.Namespace) -> int:
    letters = await app.dead_letters.list(queue=args.queue, task=args.task, limit=args.limit)
    if args.json:
        print_json([summary_json(d) for d in letters])
    else:
        print("\n".join(dead_table(letters, shutil.get_terminal_size((120, 24)).columns)))
    return 0


async def show_letter(app: App, args: argparse.Namespace) -> int:
    letter = await app.dead_letters.get(args.id)
    if args.json:
        print_json(letter)
    else:
        print_letter(letter)
    return 0


async def retry_letters(app: App, args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all):
        raise ConfigurationError("dead retry: give dead letter ids, or --all")
    pairs = await app.dead_letters.retry_by_id(None if args.all else args.ids, queue=args.queue)
    if args.json:
        print_json({"retried": [{"dead_letter": i, **_ref_fields(ref)} for i, ref in pairs]})
        return 0
    for dead_id, ref in pairs:
        note = " (deduplicated: its idempotency key is held)" if ref.deduplicated else ""
        print(f"dead letter {dead_id} re-enqueued as job {ref.id} in queue {ref.queue}{note}")
    print(f"pgtasks: {len(pairs)} dead letter(s) retried")
    return 0


async def purge_letters(app: App, args: argparse.Namespace) -> int:
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


def _ref_fields(ref: JobRef[Any]) -> dict[str, Any]:
    return {"id": ref.id, "queue": ref.queue, "task": ref.task, "deduplicated": ref.deduplicated}
