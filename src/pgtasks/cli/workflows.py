"""``workflow show``: a workflow's state and every step's (with its job's state and its
timings), read through `admin.workflows`."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
from typing import Any

from ..admin.workflows import get_workflow
from ..app import App
from .output import one_line, print_json


async def show(app: App, args: argparse.Namespace) -> int:
    w = await get_workflow(app.database, args.id)
    if args.json:
        print_json(dataclasses.asdict(w))
        return 0
    at = f", at step {w.step}" if w.state == "running" and w.step is not None else ""
    print(f"workflow {w.id}, a {w.kind} of {len(w.steps)} steps: {w.state}{at}")
    took = f", took {_seconds(w.created_at, w.finished_at)}" if w.finished_at else ""
    print(f"  created {_time(w.created_at)}" + (f", ended {_time(w.finished_at)}{took}"))
    if w.error:
        where = f" at step {w.failed_step}" if w.failed_step is not None else ""
        print(f"  {w.state}{where}: {_error(w.error)}")
    header = ("step", "task", "queue", "job", "state", "sent (UTC)", "finished (UTC)", "took")
    rows = [
        (
            str(s.step)
            + (" (callback)" if w.kind == "chord" and s.step == len(w.steps) - 1 else ""),
            one_line(s.task, 60),
            s.queue,
            str(s.job_id) if s.job_id is not None else "-",
            s.job_state if s.state == "sent" and s.job_state else s.state,
            _time(s.sent_at),
            _time(s.finished_at),
            _seconds(s.sent_at, s.finished_at),
        )
        for s in w.steps
    ]
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    for r in [header, *rows]:
        print("  " + "  ".join(c.ljust(n) for c, n in zip(r, widths, strict=True)).rstrip())
    return 0


def _error(error: dict[str, Any]) -> str:
    """A workflow's error as one line: the step's exception (type: message), else why it
    ended (a reason, or its outcome); its outcome when that is not its state."""
    kind, message = error.get("type"), error.get("message")
    text = f"{kind}: {message}" if kind else str(error.get("reason") or message or "")
    outcome = error.get("outcome")
    if outcome and outcome != "failed":
        text = f"{text} ({outcome})" if text else str(outcome)
    return one_line(text, 500)


def _time(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return f"{value.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S.%f}"[:-3]


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> str:
    if start is None or end is None:
        return "-"
    return f"{(end - start).total_seconds():.3f}s"
