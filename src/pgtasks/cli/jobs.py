"""``job show``, ``job list`` and ``cancel``: one job in full, the newest jobs of a queue, and
cancelling jobs; reading and acting through `admin.jobs`."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import orjson

from ..admin import jobs
from ..app import App
from ..exceptions import JobNotFound
from .output import one_line, print_json


async def show(app: App, args: argparse.Namespace) -> int:
    job = await jobs.job_show(app.database, args.queue, args.id)
    if job.state == "unknown":
        raise JobNotFound(f"no job {args.id} in queue {args.queue!r} (or its record was pruned)")
    if args.json:
        print_json(dataclasses.asdict(job))
        return 0
    print(f"job {job.id} in queue {job.queue}: {job.state}, task {one_line(job.task or '?', 200)}")
    when = f"  enqueued {_time(job.enqueued_at)}"
    print(when + (f", ended {_time(job.finished_at)}" if job.finished_at else ""))
    print(f"  attempts: {job.attempts if job.attempts is not None else '?'}")
    if job.cancel_requested:
        print("  cancel requested")
    print(f"  message: {_json(job.message)}")
    if job.headers:
        print(f"  headers: {_json(job.headers)}")
    if job.result is not None:
        print(f"  result: {_json(job.result)}")
    if job.error:
        print(f"  ended with: {_json(job.error)}")
    for a in job.attempts_failed:
        print(
            f"  attempt {a.attempt} on {a.worker} at {_time(a.failed_at)}: "
            f"{one_line(a.error_type, 200)}: {one_line(a.message, 500)}"
        )
        if a.traceback:
            print("    " + a.traceback.rstrip().replace("\n", "\n    "))
    return 0


async def list_jobs(app: App, args: argparse.Namespace) -> int:
    found = await jobs.job_list(
        app.database, args.queue, state=args.state, task=args.task, limit=args.limit
    )
    if args.json:
        print_json({"jobs": [dataclasses.asdict(j) for j in found]})
        return 0
    print(f"{'id':>10}  {'state':<10} {'attempts':>8}  {'enqueued (UTC)':<19}  task")
    for j in found:
        attempts = j.attempts if j.attempts is not None else "-"
        task = one_line(j.task or "?", 80)
        print(f"{j.id:>10}  {j.state:<10} {attempts:>8}  {_time(j.enqueued_at):<19}  {task}")
    return 0


async def cancel(app: App, args: argparse.Namespace) -> int:
    ttl = app.defaults.result_ttl or 7 * 86400.0
    outcomes = await jobs.cancel(app.database, args.queue, args.ids, ttl)
    if args.json:
        pairs = zip(args.ids, outcomes, strict=True)
        print_json({"cancel": [{"id": i, "outcome": o} for i, o in pairs]})
    else:
        for msg_id, outcome in zip(args.ids, outcomes, strict=True):
            print(f"job {msg_id} in queue {args.queue}: {_SAY[outcome]}")
    return 1 if "unknown" in outcomes else 0


_SAY = {
    "cancelled": "cancelled",
    "requested": "running: its worker was asked to cancel it",
    "finished": "already over, nothing to cancel",
    "unknown": "no such job",
}


def _time(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else "-"


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()
