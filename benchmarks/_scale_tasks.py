"""The tasks of ``benchmarks/scale.py``, in a module of their own so that worker
subprocesses can load them (``python -m pgtasks worker -A _scale_tasks:app``, with this
directory on ``PYTHONPATH`` and the scratch database in ``PGTASKS_DSN``) and the
benchmark's own process can build the same tasks on an app of its own (`make`).

What a task records lives in module globals: only the process that runs the job sees it,
which is what the in-process measurements (a worker in the benchmark's process) read.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

import pgtasks

executed: Counter[str] = Counter()  # jobs run, per task
slept = [0.0]  # short: seconds its 1 ms sleeps took, summed
started: dict[int, float] = {}  # stamp(i): perf_counter at its first line
stream_samples: list[tuple[float, float]] = []  # stream(sent): (start, start - sent), wall


@dataclass(frozen=True)
class Bench:
    app: pgtasks.App
    noop: pgtasks.Task[[int], None]
    stamp: pgtasks.Task[[int], None]
    short: pgtasks.Task[[int], None]
    stream: pgtasks.Task[[float], None]


def make(dsn: str | None) -> Bench:
    """An app on ``dsn`` (None: ``PGTASKS_DSN``) with the benchmark's tasks."""
    app = pgtasks.App(dsn)

    @app.task(name="scale.noop", queue="busy")
    async def noop(i: int) -> None:
        executed["noop"] += 1

    @app.task(name="scale.stamp", queue="busy")
    async def stamp(i: int) -> None:
        started[i] = time.perf_counter()

    @app.task(name="scale.short", queue="short")
    async def short(i: int) -> None:
        began = time.perf_counter()
        await asyncio.sleep(0.001)
        slept[0] += time.perf_counter() - began
        executed["short"] += 1

    @app.task(name="scale.stream", queue="stream")
    async def stream(sent: float) -> None:
        now = time.time()  # the producer is another process: the wall clock, same host
        stream_samples.append((now, now - sent))

    return Bench(app, noop, stamp, short, stream)


app = make(None).app
