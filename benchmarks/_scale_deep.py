"""Sections 4-5 of ``benchmarks/scale.py``: a deep backlog, and a snapshot held open.

* **backlog**: ``--backlog`` no-op jobs deferred (``defer_many``, 5,000 a call) into
  ``big``, then VACUUM ANALYZE. Per round: the status snapshot's time (the admin status
  API, what ``pgtasks status`` runs); an in-process worker at concurrency 100 serving
  ``big`` and ``fresh`` for ``--backlog-seconds``: the rate it drains ``big``, and the
  defer->start latency of jobs deferred to ``fresh`` at 10/s meanwhile (a fresh job in
  ``big`` itself would wait behind the backlog, by design). Then ``big`` is emptied and as
  many jobs are deferred a day ahead into ``later``: status again, and a worker serving
  ``later`` while due jobs trickle into the same queue at 20/s: their latency, and how
  many of them it ran per second. Once per backlog, the wall time of the command line
  ``python -m pgtasks status`` (Python's start included).
* **vacuum**: a producer process defers ``--rate`` jobs/s (50 batches a second) to
  ``stream``; an in-process worker (concurrency 16) runs them. ``--phase`` seconds before,
  ``--hold`` seconds while ``k`` REPEATABLE READ transactions hold a snapshot (each ran a
  query), ``--phase`` seconds after: jobs/s, defer->start latency (the wall clock, which
  both processes share) and the queue table's ``n_dead_tup`` (pg_stat_user_tables, sampled
  every second: at the start, the highest, at the end) and autovacuum runs. One round per
  ``k`` (a hold is long).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import _scale_tasks as tasks
import asyncpg
from _harness import Summary, fmt_ms, fmt_rate, markdown_table, percentile
from _scale_common import (
    HERE,
    Log,
    Scratch,
    Sizes,
    empty,
    fill,
    missed,
    running,
    scratch_app,
    spawn_role,
    summary,
    target_row,
    wait_ready,
)
from _scale_queues import status_seconds
from drain import Workload, paced_latency

FRESH_RATE = 10.0  # jobs/s beside the waiting backlog
TRICKLE_RATE = 20.0  # due jobs/s beside the scheduled backlog
STATUS_TARGET = 1.0  # seconds
STREAM_CONCURRENCY = 16


# --- backlog ------------------------------------------------------------------------------------


@dataclass
class BacklogCase:
    label: str
    status: list[float]
    rate: list[float]
    p50: list[float]
    p99: list[float]
    fill_seconds: float = 0.0
    cli_seconds: float = 0.0


def cli_status_seconds(dsn: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGTASKS_APP")}
    began = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pgtasks", "status", "--dsn", dsn],
        env=env,
        cwd=HERE,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - began


async def backlog_round(
    s: Scratch, queues: list[str], defer_to: str, rate: float, seconds: float, case: BacklogCase
) -> None:
    case.status.append(await status_seconds(s))
    tasks.executed["noop"] = 0
    jobs = max(5, int(seconds * rate))
    w = Workload(0, latency_jobs=jobs, latency_rate=rate, latency_warmup=3)
    stamp = s.bench.stamp.options(queue=defer_to)
    async with s.bench.app.worker(queues=queues, concurrency=100):
        began = time.perf_counter()
        m = await paced_latency(lambda i: stamp.defer(i), tasks.started, w)
        elapsed = time.perf_counter() - began
    drained = tasks.executed["noop"] if defer_to != queues[0] else len(m.latencies)
    case.rate.append(drained / elapsed)
    case.p50.append(percentile(m.latencies, 50))
    case.p99.append(percentile(m.latencies, 99))


async def section_backlog(admin_dsn: str, runs: int, sizes: Sizes, log: Log) -> int:
    n, seconds = sizes.backlog, sizes.backlog_seconds
    waiting = BacklogCase(f"{n:,} waiting", [], [], [], [])
    scheduled = BacklogCase(f"{n:,} scheduled a day ahead", [], [], [], [])
    async with scratch_app(admin_dsn) as s:
        await s.conn.execute(
            "SELECT pgmq.create('big'), pgmq.create('fresh'), pgmq.create('later')"
        )
        waiting.fill_seconds = await fill(s.bench, "big", n, log=log)
        await s.conn.execute("VACUUM ANALYZE pgmq.q_big")
        log(f"filled {n:,} waiting jobs in {waiting.fill_seconds:.0f} s")
        waiting.cli_seconds = cli_status_seconds(s.dsn)
        for r in range(runs):
            await backlog_round(s, ["big", "fresh"], "fresh", FRESH_RATE, seconds, waiting)
            log(f"round {r + 1}/{runs}  waiting: {waiting.rate[-1]:,.0f} jobs/s")
        await empty(s.conn, "big", "fresh")
        scheduled.fill_seconds = await fill(s.bench, "later", n, delay=86_400.0, log=log)
        await s.conn.execute("VACUUM ANALYZE pgmq.q_later")
        log(f"filled {n:,} scheduled jobs in {scheduled.fill_seconds:.0f} s")
        scheduled.cli_seconds = cli_status_seconds(s.dsn)
        for r in range(runs):
            await backlog_round(s, ["later"], "later", TRICKLE_RATE, seconds, scheduled)
            log(f"round {r + 1}/{runs}  scheduled: p50 {scheduled.p50[-1] * 1e3:.1f} ms")
    print(
        f"### backlog: {n:,} jobs in one queue, a worker at concurrency 100 for {seconds:g} s "
        f"per round; fresh jobs beside the waiting backlog at {FRESH_RATE:g}/s (own queue), "
        f"due jobs into the scheduled one at {TRICKLE_RATE:g}/s (same queue)\n"
    )
    headers = [
        "backlog",
        "fill s (defer_many)",
        "status ms (API)",
        "status s (CLI, incl. start)",
        "worker jobs/s",
        "fresh defer->start p50 ms",
        "p99 ms",
    ]
    rows = [
        [
            c.label,
            f"{c.fill_seconds:.0f}",
            fmt_ms(summary(c.status)),
            f"{c.cli_seconds:.2f}",
            fmt_rate(Summary.of(c.rate)) + (" (due jobs)" if c is scheduled else ""),
            fmt_ms(summary(c.p50)),
            fmt_ms(summary(c.p99)),
        ]
        for c in (waiting, scheduled)
    ]
    print(markdown_table(headers, rows))
    targets = [
        target_row(
            f"status, {c.label}", summary(c.status), STATUS_TARGET * 1e3, higher=False, ms=True
        )
        for c in (waiting, scheduled)
    ]
    print("\n" + markdown_table(["measure", "median (min-max)", "target", ""], targets))
    return missed(targets)


# --- vacuum -------------------------------------------------------------------------------------

DEAD = (
    "SELECT n_dead_tup, autovacuum_count FROM pg_stat_user_tables "
    "WHERE schemaname = 'pgmq' AND relname = 'q_stream'"
)


@dataclass
class Phase:
    name: str
    began: float  # time.time()
    ended: float
    dead: list[int]
    autovacuums: int


async def sample_phase(conn: asyncpg.Connection, name: str, seconds: float) -> Phase:
    began = time.time()
    dead: list[int] = []
    first_vacuums = None
    row = None
    while True:
        row = await conn.fetchrow(DEAD)
        assert row is not None
        dead.append(row[0])
        if first_vacuums is None:
            first_vacuums = row[1]
        if time.time() - began >= seconds:
            break
        await asyncio.sleep(1.0)
    return Phase(name, began, time.time(), dead, row[1] - first_vacuums)


async def hold_snapshot(dsn: str, readers: int) -> list[asyncpg.Connection]:
    conns = [await asyncpg.connect(dsn) for _ in range(readers)]
    for c in conns:
        await c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await c.fetchval("SELECT count(*) FROM pgmq.q_stream")  # now it holds a snapshot
    return conns


async def release(conns: Sequence[asyncpg.Connection]) -> None:
    for c in conns:
        await c.execute("COMMIT")
        await c.close()


async def vacuum_case(s: Scratch, readers: int, sizes: Sizes) -> list[Phase]:
    await empty(s.conn, "stream")
    await s.conn.execute("VACUUM ANALYZE pgmq.q_stream")
    tasks.stream_samples.clear()
    producer = spawn_role(s.dsn, "stream", sizes.rate)
    worker = s.bench.app.worker(queues=["stream"], concurrency=STREAM_CONCURRENCY)
    async with running([producer]), worker:
        await wait_ready([producer])
        await asyncio.sleep(2.0)  # warm-up
        before = await sample_phase(s.conn, "before", sizes.phase)
        held = await hold_snapshot(s.dsn, readers)
        try:
            during = await sample_phase(s.conn, "during the hold", sizes.hold)
        finally:
            await release(held)
        after = await sample_phase(s.conn, "after", sizes.phase)
    return [before, during, after]


async def section_vacuum(admin_dsn: str, runs: int, sizes: Sizes, log: Log) -> int:
    rows: list[list[str]] = []
    async with scratch_app(admin_dsn) as s:
        await s.conn.execute("SELECT pgmq.create('stream')")
        for k in sizes.readers:
            phases = await vacuum_case(s, k, sizes)
            samples = list(tasks.stream_samples)
            log(f"{k} reader(s): {len(samples):,} jobs")
            rows += [[str(k), *row] for row in rows_for(phases, samples)]
    print(
        f"### vacuum: {sizes.rate:g} jobs/s streamed, one worker (concurrency "
        f"{STREAM_CONCURRENCY}); REPEATABLE READ snapshot(s) held {sizes.hold:g} s, "
        f"{sizes.phase:g} s before and after; one round per case\n"
    )
    headers = [
        "readers",
        "phase",
        "jobs/s",
        "p50 ms",
        "p99 ms",
        "n_dead_tup start / max / end",
        "autovacuums",
    ]
    print(markdown_table(headers, rows))
    return 0


def rows_for(phases: Sequence[Phase], samples: Sequence[tuple[float, float]]) -> list[list[str]]:
    rows = []
    for p in phases:
        lat = [late for at, late in samples if p.began <= at < p.ended]
        rate = len(lat) / (p.ended - p.began)
        rows.append(
            [
                p.name,
                f"{rate:,.0f}",
                f"{percentile(lat, 50) * 1e3:.2f}",
                f"{percentile(lat, 99) * 1e3:.2f}",
                f"{p.dead[0]:,} / {max(p.dead):,} / {p.dead[-1]:,}",
                str(p.autovacuums),
            ]
        )
    return rows
