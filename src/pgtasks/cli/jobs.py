"""``job show``, ``job list`` and ``cancel``: one job in full, the newest jobs of a queue, and
cancelling jobs; reading and acting through `admin.jobs`."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import orjson

from ..admin import jobs
from ..app import App
from .output import one_line, print_json


async def show(app: App, args: argparse.Namespace) -> int:
    job = await jobs.get_job(app.database, args.queue, args.id)
    if args.json:
        print_json(dataclasses.asdict(job))
        return 0
    s = job.summary
    print(f"job {s.id} in queue {s.queue}: {s.state}, task {one_line(s.task or '?', 200)}")
    when = f"  enqueued {_time(s.enqueued_at)}"
    print(when + (f", ended {_time(s.finished_at)}" if s.finished_at else ""))
    print(f"  attempts: {s.attempt if s.attempt is not None else '?'}")
    if s.idempotency_key:
        print(f"  idempotency key: {one_line(s.idempotency_key, 200)}")
    if job.cancel_requested:
        print("  cancel requested")
    if job.workflow is not None:
        w = job.workflow
        callback = " (the callback)" if w.kind == "chord" and w.step == w.steps - 1 else ""
        print(
            f"  workflow {w.workflow}, a {w.kind} of {w.steps} steps: step {w.step}{callback}"
            f" (pgtasks workflow show {w.workflow})"
        )
    print(f"  message: {_json(job.body)}")
    if job.headers:
        print(f"  headers: {_json(job.headers)}")
    if job.result is not None:
        print(f"  result: {_json(job.result)}")
    if job.error:
        print(f"  ended with: {_json(job.error)}")
    if job.dead_letter is not None:
        print(f"  dead letter {job.dead_letter}: {one_line(job.reason or '', 200)}")
    if job.retried_as is not None:
        print(f"  retried as job {job.retried_as} (its dead letter was retried)")
    for a in job.attempts:
        print(
            f"  attempt {a.attempt} on {a.worker} at {_time(a.failed_at)}: "
            f"{one_line(a.error_type, 200)}: {one_line(a.message, 500)}"
        )
        if a.traceback:
            print("    " + a.traceback.rstrip().replace("\n", "\n    "))
    return 0


async def list_jobs(app: App, args: argparse.Namespace) -> int:
    found = await jobs.list_jobs(
        app.database, args.queue, args.state, task=args.task, limit=args.limit
    )
    if args.json:
        print_json({"jobs": [dataclasses.asdict(j) for j in found]})
        return 0
    print(f"{'id':>10}  {'state':<10} {'attempts':>8}  {'enqueued (UTC)':<19}  task")
    for j in found:
        attempts = j.attempt if j.attempt is not None else "-"
        task = one_line(j.task or "?", 80)
        print(f"{j.id:>10}  {j.state:<10} {attempts:>8}  {_time(j.enqueued_at):<19}  {task}")
    return 0


async def cancel(app: App, args: argparse.Namespace) -> int:
    outcomes = await app.cancel(app.job(args.queue, i) for i in args.ids)
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
