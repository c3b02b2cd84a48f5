"""``pgtasks status``: every queue's jobs by state, its oldest waiting job, what was done and
what failed in the last minute and hour, and the live workers, from one statement per
refresh (`pgtasks.admin.status`). ``--json`` for scripts, ``--watch`` to refresh.

A count that went past the cap is shown ``~`` (estimated) or ``+`` (at least); ``--json``
lists those fields in ``estimated`` and ``at_least``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence

import anyio
import orjson

from ..admin import status as admin_status
from ..admin.status import QueueState, Status
from ..admin.workers import WorkerInfo
from ..app import App
from .output import one_line, print_json


async def status(app: App, args: argparse.Namespace) -> int:
    if args.watch is None:
        snapshot = await admin_status.status(app.database)
        if args.json:
            print_json(snapshot.to_json())
        else:
            print("\n".join(render(snapshot)))
        return 0
    clear = sys.stdout.isatty() and not args.json
    while True:
        snapshot = await admin_status.status(app.database)
        if args.json:  # one document per line and refresh
            print(orjson.dumps(snapshot.to_json()).decode(), flush=True)
        else:
            text = "\n".join(render(snapshot))
            at = f"{snapshot.at.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
            header = f"every {args.watch:g}s, at {at} (Ctrl-C to stop)"
            print(("\x1b[H\x1b[2J" if clear else "\n") + header + "\n\n" + text, flush=True)
        await anyio.sleep(args.watch)


def count(state: QueueState, name: str) -> str:
    """A count with thousands separators: ``~`` before an estimate, ``+`` after a lower
    bound."""
    value = f"{getattr(state, name):,}"
    if name in state.estimated:
        return "~" + value
    if name in state.at_least:
        return value + "+"
    return value


def age(seconds: float | None) -> str:
    """``4.2s``, ``3m05s``, ``2h10m``, ``3d04h``; ``-`` for none."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{max(seconds, 0.0):.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def columns(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Columns as wide as their widest cell; the first ``left`` columns left-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(
            cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in [header, *rows]
    ]


def render(snapshot: Status) -> list[str]:
    """The text of one snapshot: the queues, then the workers alive."""
    header = (
        "queue",
        "waiting",
        "scheduled",
        "running",
        "retrying",
        "dead",
        "oldest",
        "done 1m",
        "done 1h",
        "failed 1m",
        "failed 1h",
        "workers",
    )
    rows = [
        (
            q.queue,
            count(q, "waiting"),
            count(q, "scheduled"),
            count(q, "running"),
            count(q, "retrying"),
            count(q, "dead_letters"),
            age(q.oldest_waiting_seconds),
            count(q, "done_1m"),
            count(q, "done_1h"),
            count(q, "failed_1m"),
            count(q, "failed_1h"),
            str(q.workers),
        )
        for q in snapshot.queues
    ]
    lines = columns(header, rows) if rows else ["no queues yet"]
    lines.append("")
    lines += workers(snapshot.workers, snapshot.at)
    return lines


def workers(infos: Sequence[WorkerInfo], now: dt.datetime) -> list[str]:
    alive = [w for w in infos if w.state == "alive"]
    if not alive:
        return ["workers: none alive"]
    rows = [
        (
            one_line(w.name, 60),  # a host name is text from the worker: one line
            one_line(",".join(w.queues), 60),
            f"{w.running}/{w.concurrency}",
            f"{w.stats.get('succeeded', 0):,}",
            f"{w.stats.get('failed', 0):,}",
            one_line(w.version, 20),
            age((now - w.started_at).total_seconds()) + " ago",
            age((now - w.last_seen).total_seconds()) + " ago",
        )
        for w in alive
    ]
    header = ("worker", "queues", "running", "succeeded", "failed", "version", "up", "seen")
    return [f"workers: {len(alive)} alive", *columns(header, rows, left=2)]
