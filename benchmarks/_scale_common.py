"""What the sections of ``benchmarks/scale.py`` share: the sizes, the scratch app, the
helper processes (worker CLIs, producers, raw consumers) and the target lines."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from typing import Any

import asyncpg
from _harness import Summary, fmt_ms, fmt_ratio, scratch_database
from _scale_tasks import Bench, make

HERE = os.path.dirname(os.path.abspath(__file__))
SCRATCH = "bench_scale"
ENQUEUE_CHUNK = 5_000  # jobs per defer_many while filling (untimed)

Log = Callable[[str], None]


@dataclass(frozen=True)
class Sizes:
    """Every section's sizes: the issue's by default, small ones with ``--quick``; each
    overridable by its option (same name)."""

    queue_counts: Sequence[int] = (1, 10, 100, 1000)
    drain_jobs: int = 20_000
    drain_cap: float = 30.0
    defers: int = 2_000
    duration: float = 20.0
    level: int = 4_000
    worker_counts: Sequence[int] = (1, 2, 4, 8)
    size: int = 50_000
    backlog: int = 1_000_000
    backlog_seconds: float = 15.0
    hold: float = 60.0
    phase: float = 15.0
    readers: Sequence[int] = (1, 4)
    rate: float = 500.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sizes:
        base = QUICK if args.quick else cls()
        given = {f.name: getattr(args, f.name) for f in fields(cls)}
        return cls(**{k: v if v is not None else getattr(base, k) for k, v in given.items()})


QUICK = Sizes(
    queue_counts=(1, 10, 100),
    drain_jobs=2_000,
    drain_cap=10.0,
    defers=300,
    duration=3.0,
    worker_counts=(1, 2),
    size=5_000,
    backlog=20_000,
    backlog_seconds=3.0,
    hold=5.0,
    phase=3.0,
    readers=(1,),
)


# --- the scratch database and its app -------------------------------------------------------


@dataclass(frozen=True)
class Scratch:
    dsn: str
    bench: Bench
    conn: asyncpg.Connection  # an admin connection of the benchmark's own


@asynccontextmanager
async def scratch_app(admin_dsn: str) -> AsyncIterator[Scratch]:
    """A fresh, migrated database with the benchmark's app; dropped afterwards."""
    async with scratch_database(admin_dsn, SCRATCH) as dsn:
        bench = make(dsn)
        await bench.app.migrate()
        conn = await asyncpg.connect(dsn)
        try:
            yield Scratch(dsn, bench, conn)
        finally:
            await conn.close()
            await bench.app.close()


async def empty(conn: asyncpg.Connection, *queues: str) -> None:
    """Empty queues and their archives (untimed) and let autovacuum forget them."""
    tables = ", ".join(f"pgmq.q_{q}, pgmq.a_{q}" for q in queues)
    await conn.execute(f"TRUNCATE {tables}")


async def fill(
    bench: Bench, queue: str, jobs: int, *, delay: float = 0.0, log: Log | None = None
) -> float:
    """``jobs`` no-op jobs into ``queue`` through ``defer_many``; returns the seconds taken."""
    call = (
        bench.noop.options(queue=queue, delay=delay) if delay else bench.noop.options(queue=queue)
    )
    began = time.perf_counter()
    for start in range(0, jobs, ENQUEUE_CHUNK):
        await bench.app.defer_many(
            call.s(i) for i in range(start, min(jobs, start + ENQUEUE_CHUNK))
        )
        if log is not None and start and start % 200_000 == 0:
            log(f"  filled {start:,} of {jobs:,}")
    return time.perf_counter() - began


async def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.005) -> bool:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(step)
    return True


# --- helper processes ---------------------------------------------------------------------------


def _env(dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGTASKS_APP")}
    path = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH", "")) if p)
    env.update(PGTASKS_DSN=dsn, PYTHONPATH=path)
    return env


def spawn_role(dsn: str, role: str, *args: object) -> subprocess.Popen[str]:
    """A helper process of `_scale_roles` (stdin and stdout are pipes: ready, go)."""
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_scale_roles.py"), role, dsn, *map(str, args)],
        env=_env(dsn),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def spawn_workers(
    dsn: str, queues: Sequence[str], concurrency: int, count: int, *extra: str
) -> list[subprocess.Popen[str]]:
    """``count`` worker processes, as deployed: ``python -m pgtasks worker``."""
    command = [
        sys.executable,
        "-m",
        "pgtasks",
        "worker",
        "-A",
        "_scale_tasks:app",
        "-q",
        ",".join(queues),
        "-c",
        str(concurrency),
        "--no-log-jobs",
        "--log-level",
        "WARNING",
        *extra,
    ]
    return [
        subprocess.Popen(command, env=_env(dsn), cwd=HERE, stdout=subprocess.DEVNULL, text=True)
        for _ in range(count)
    ]


async def wait_ready(procs: Sequence[subprocess.Popen[str]], timeout: float = 60.0) -> None:
    """Until each process printed its ``ready`` line."""

    def read(p: subprocess.Popen[str]) -> str:
        assert p.stdout is not None
        return p.stdout.readline().strip()

    loop = asyncio.get_running_loop()
    lines = await asyncio.wait_for(
        asyncio.gather(*(loop.run_in_executor(None, read, p) for p in procs)), timeout
    )
    if any(line != "ready" for line in lines):
        raise RuntimeError(f"a helper process did not start: {lines}")


def go(procs: Sequence[subprocess.Popen[str]]) -> None:
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()


async def stop(procs: Sequence[subprocess.Popen[str]], timeout: float = 40.0) -> None:
    """SIGTERM, then wait (a worker finishes its jobs and writes its outcomes)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    for p in procs:
        try:
            await asyncio.wait_for(loop.run_in_executor(None, p.wait), timeout)
        except asyncio.TimeoutError:
            p.kill()
            p.wait()
        if p.returncode not in (0, -signal.SIGTERM):
            raise RuntimeError(f"a helper process exited with {p.returncode}")


@asynccontextmanager
async def running(procs: list[subprocess.Popen[str]]) -> AsyncIterator[list[subprocess.Popen[str]]]:
    try:
        yield procs
    finally:
        await stop(procs)


# --- results ------------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> Summary | None:
    return Summary.of(values) if values else None


def fmt_num(s: Summary | None, digits: int = 0) -> str:
    if s is None:
        return "-"
    return f"{s.median:,.{digits}f} ({s.low:,.{digits}f}-{s.high:,.{digits}f})"


def target_row(
    label: str, s: Summary | None, goal: float, *, higher: bool = True, ms: bool = False
) -> list[str]:
    """[measure, median (min-max), target, met|MISSED]."""
    if s is None:
        return [label, "-", "", ""]
    shown = fmt_ms(s) if ms else fmt_ratio(s)
    value = s.median * 1e3 if ms else s.median
    unit = " ms" if ms else ""
    met = value >= goal if higher else value <= goal
    return [label, shown, f"{'>=' if higher else '<='} {goal:g}{unit}", "met" if met else "MISSED"]


def missed(rows: Sequence[Sequence[str]]) -> int:
    return sum(1 for r in rows if r[-1] == "MISSED")


Values = dict[Any, list[float]]
