"""Sections 1-3 of ``benchmarks/scale.py``: many queues, short jobs, many worker processes.

* **queues**: one in-process worker serving N queues (``busy`` and N-1 empty ones). Per N
  and round: (a) ``--drain-jobs`` no-op jobs in ``busy`` drained at concurrency 100 (the
  span covers the worker's start; a drain still running after ``--drain-cap`` seconds is
  stopped and its rate is what it did so far); (b) defer->start latency on an idle worker
  (concurrency 10), jobs deferred one at a time to ``busy`` at 20/s (drain.py's
  `paced_latency`); (c) serial ``defer()`` throughput, job i to queue i mod N; (d) one
  status snapshot (``pgtasks status``'s statement). Ratios to N=1 are paired by round.
* **short**: ``await asyncio.sleep(0.001)`` jobs kept ~``--level`` deep by a producer
  process; an in-process worker at concurrency 16 and 4, against ``c`` plain pgmq
  consumers (one connection each: ``pgmq.read(q, 30, 64)``, 1 ms per message,
  ``pgmq.delete`` of the batch). Jobs/s over ``--duration`` s after a warm-up, and the share
  of the slot limit (c jobs per ms).
* **workers**: 1, 2, 4, 8 ``python -m pgtasks worker -c 100`` processes on one backlog of
  ``--size`` no-op jobs. The backlog is deferred a day ahead, the processes start and
  report in (``pgtasks.workers``), then one UPDATE makes it visible (and VACUUM ANALYZE
  cleans up after it) and a NOTIFY wakes them: the span runs from the NOTIFY until the
  queue is empty, so no process start is timed. Raw pgmq: as many processes looping
  ``pgmq.read(q, 30, 100)`` + ``pgmq.archive``, released by the same go.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import _scale_tasks as tasks
import asyncpg
from _harness import Summary, fmt_ms, fmt_rate, markdown_table, percentile, rotated
from _scale_common import (
    Log,
    Scratch,
    Sizes,
    Values,
    empty,
    fill,
    go,
    missed,
    running,
    scratch_app,
    spawn_role,
    spawn_workers,
    summary,
    target_row,
    wait_ready,
    wait_until,
)
from drain import Workload, paced_latency

from pgtasks.admin import status as admin_status

LATENCY_RATE = 20.0  # jobs/s, section queues
SHORT_WARMUP = 2.0  # seconds before the short jobs are counted
WORKER_CONCURRENCY = 100  # per process, section workers


async def status_seconds(scratch: Scratch, times: int = 3) -> float:
    """The median time of ``times`` status snapshots (what ``pgtasks status`` runs), after
    one untimed."""
    database = scratch.bench.app.database
    await admin_status.status(database)
    spans = []
    for _ in range(times):
        began = time.perf_counter()
        await admin_status.status(database)
        spans.append(time.perf_counter() - began)
    return statistics.median(spans)


# --- queues -------------------------------------------------------------------------------------


async def create_empty_queues(conn: asyncpg.Connection, count: int) -> list[str]:
    """``e0001``... with ``pgmq.create``, 50 per transaction (each takes locks on a dozen
    relations, and the lock table is sized for max_locks_per_transaction x connections)."""
    for first in range(1, count + 1, 50):
        last = min(count, first + 49)
        await conn.execute(
            f"""DO $$ BEGIN
                FOR g IN {first}..{last} LOOP
                    PERFORM pgmq.create(format('e%s', lpad(g::text, 4, '0')));
                END LOOP; END $$"""
        )
    return [f"e{g:04d}" for g in range(1, count + 1)]


async def queues_drain(s: Scratch, queues: Sequence[str], sizes: Sizes) -> float:
    await empty(s.conn, "busy")
    await fill(s.bench, "busy", sizes.drain_jobs)
    await s.conn.execute("VACUUM ANALYZE pgmq.q_busy")
    tasks.executed["noop"] = 0
    began = time.perf_counter()
    async with s.bench.app.worker(queues=queues, concurrency=100):
        await wait_until(lambda: tasks.executed["noop"] >= sizes.drain_jobs, sizes.drain_cap)
        elapsed = time.perf_counter() - began
        done = tasks.executed["noop"]
    return done / elapsed


async def queues_latency(s: Scratch, queues: Sequence[str], jobs: int) -> list[float]:
    await empty(s.conn, "busy")
    w = Workload(0, latency_jobs=jobs, latency_rate=LATENCY_RATE, latency_warmup=5)
    async with s.bench.app.worker(queues=queues, concurrency=10):
        await asyncio.sleep(0.2)
        m = await paced_latency(lambda i: s.bench.stamp.defer(i), tasks.started, w)
    return list(m.latencies)


async def queues_defer(s: Scratch, queues: Sequence[str], defers: int) -> float:
    calls = [s.bench.noop.options(queue=q) for q in queues]
    for i in range(20):  # warm-up: the pool's connection, the first statements
        await calls[0].defer(-i)
    began = time.perf_counter()
    for i in range(defers):
        await calls[i % len(calls)].defer(i)
    rate = defers / (time.perf_counter() - began)
    for start in range(0, len(queues), 25):  # untimed; 25 tables per TRUNCATE (locks)
        await s.conn.execute(
            "TRUNCATE " + ", ".join(f"pgmq.q_{q}" for q in queues[start : start + 25])
        )
    return rate


async def section_queues(admin_dsn: str, runs: int, sizes: Sizes, log: Log) -> int:
    counts = sorted(sizes.queue_counts)
    latency_jobs = 100 if sizes.drain_jobs >= 10_000 else 30
    drain: Values = defaultdict(list)
    defer: Values = defaultdict(list)
    p50: Values = defaultdict(list)
    p99: Values = defaultdict(list)
    status: Values = defaultdict(list)
    async with scratch_app(admin_dsn) as s:
        began = time.perf_counter()
        await s.conn.execute("SELECT pgmq.create('busy')")
        names = ["busy", *await create_empty_queues(s.conn, max(counts) - 1)]
        log(f"created {len(names)} queues in {time.perf_counter() - began:.1f} s")
        for r in range(runs):
            for n in rotated(counts, r):
                queues = names[:n]
                drain[n].append(await queues_drain(s, queues, sizes))
                latencies = await queues_latency(s, queues, latency_jobs)
                p50[n].append(percentile(latencies, 50))
                p99[n].append(percentile(latencies, 99))
                defer[n].append(await queues_defer(s, queues, sizes.defers))
                status[n].append(await status_seconds(s))
                log(
                    f"round {r + 1}/{runs}  {n:>5} queues: drain {drain[n][-1]:>8,.0f}/s, "
                    f"p50 {p50[n][-1] * 1e3:7.1f} ms, p99 {p99[n][-1] * 1e3:7.1f} ms, defer "
                    f"{defer[n][-1]:>6,.0f}/s, status {status[n][-1] * 1e3:6.1f} ms"
                )
    print(
        f"### queues: one worker, N queues (one busy), {sizes.drain_jobs:,} jobs per drain "
        f"(capped at {sizes.drain_cap:g} s), {latency_jobs} latency jobs at "
        f"{LATENCY_RATE:g}/s, {sizes.defers:,} serial defers round-robin\n"
    )
    headers = [
        "queues",
        "drain c=100 jobs/s",
        "defer->start p50 ms",
        "p99 ms",
        "defer() jobs/s",
        f"status ms (all {max(counts):,} queues)",
    ]
    rows = [
        [
            f"{n:,}",
            fmt_rate(Summary.of(drain[n])),
            fmt_ms(summary(p50[n])),
            fmt_ms(summary(p99[n])),
            fmt_rate(Summary.of(defer[n])),
            fmt_ms(summary(status[n])),
        ]
        for n in counts
    ]
    print(markdown_table(headers, rows))
    base = counts[0]

    def paired(values: Values, n: int) -> list[float]:
        return [a / b for a, b in zip(values[n], values[base], strict=True)]

    targets = []
    for n in counts[1:]:
        targets.append(target_row(f"drain, {n} / {base} queue(s)", summary(paired(drain, n)), 0.8))
        targets.append(
            target_row(f"p50, {n} / {base} queue(s)", summary(paired(p50, n)), 1.2, higher=False)
        )
        targets.append(
            target_row(f"p99, {n} / {base} queue(s)", summary(paired(p99, n)), 1.2, higher=False)
        )
        row = target_row(f"defer(), {n} / {base} queue(s)", summary(paired(defer, n)), 0.8)
        targets.append([*row[:2], "(none set)", ""])
    print(
        "\n"
        + markdown_table(["ratio (paired by round)", "median (min-max)", "target", ""], targets)
    )
    return missed(targets)


# --- short jobs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShortRun:
    """One short-jobs case: jobs a second; the share of the slots' time spent in the jobs'
    sleeps (what is left is the consumer's own work and its waits for the database); and
    how long a 1 ms sleep took on average (the event loop's wait is in whole milliseconds,
    and it waits that long only after it has done its other work)."""

    rate: float
    in_sleep: float
    sleep_ms: float


async def short_pgtasks(s: Scratch, concurrency: int, seconds: float) -> ShortRun:
    tasks.executed["short"] = 0
    async with s.bench.app.worker(queues=["short"], concurrency=concurrency):
        await asyncio.sleep(SHORT_WARMUP)
        return await short_measure(
            lambda: (tasks.executed["short"], tasks.slept[0]), concurrency, seconds
        )


async def short_measure(
    read: Callable[[], tuple[int, float]], concurrency: int, seconds: float
) -> ShortRun:
    """Jobs done and seconds slept over ``seconds``, from ``read()`` before and after."""
    (n0, s0), t0 = read(), time.perf_counter()
    await asyncio.sleep(seconds)
    (n1, s1), elapsed = read(), time.perf_counter() - t0
    done, slept = n1 - n0, s1 - s0
    return ShortRun(done / elapsed, slept / (concurrency * elapsed), 1000 * slept / max(done, 1))


async def short_raw(s: Scratch, concurrency: int, seconds: float) -> ShortRun:
    done = [0]
    slept = [0.0]
    stopping = asyncio.Event()
    conns = [await asyncpg.connect(s.dsn) for _ in range(concurrency)]

    async def consume(conn: asyncpg.Connection) -> None:
        while not stopping.is_set():
            rows = await conn.fetch("SELECT msg_id FROM pgmq.read('short_raw', 30, 64)")
            if not rows:
                await asyncio.sleep(0.001)
                continue
            for _ in rows:
                began = time.perf_counter()
                await asyncio.sleep(0.001)
                slept[0] += time.perf_counter() - began
                done[0] += 1
            await conn.execute(
                "SELECT pgmq.delete('short_raw', $1::bigint[])", [r[0] for r in rows]
            )

    consumers = [asyncio.create_task(consume(c)) for c in conns]
    try:
        await asyncio.sleep(SHORT_WARMUP)
        return await short_measure(lambda: (done[0], slept[0]), concurrency, seconds)
    finally:
        stopping.set()
        await asyncio.gather(*consumers)
        for c in conns:
            await c.close()


async def section_short(admin_dsn: str, runs: int, sizes: Sizes, log: Log) -> int:
    cases = [("pgtasks", 16), ("pgtasks", 4), ("raw pgmq", 16), ("raw pgmq", 4)]
    runs_of: dict[tuple[str, int], list[ShortRun]] = defaultdict(list)
    async with scratch_app(admin_dsn) as s:
        await s.conn.execute("SELECT pgmq.create('short'), pgmq.create('short_raw')")
        for r in range(runs):
            for kind, c in rotated(cases, r):
                raw = kind == "raw pgmq"
                queue = "short_raw" if raw else "short"
                await empty(s.conn, queue)
                producer = spawn_role(
                    s.dsn, "topup", queue, "raw" if raw else "pgtasks", sizes.level
                )
                async with running([producer]):
                    await wait_ready([producer])
                    await s.conn.execute(f"VACUUM ANALYZE pgmq.q_{queue}")
                    measure = short_raw if raw else short_pgtasks
                    runs_of[kind, c].append(await measure(s, c, sizes.duration))
                log(f"round {r + 1}/{runs}  {kind} c={c}: {runs_of[kind, c][-1].rate:,.0f} jobs/s")
    print(
        f"### short: 1 ms jobs, ~{sizes.level:,} kept waiting by a producer process, "
        f"{sizes.duration:g} s per case\n"
    )
    rows, targets = [], []
    for kind, c in cases:
        limit = c * 1000.0
        done = runs_of[kind, c]
        rate = Summary.of([d.rate for d in done])
        share = Summary.of([d.rate / limit for d in done])
        in_sleep = Summary.of([d.in_sleep for d in done]).median
        sleep_ms = Summary.of([d.sleep_ms for d in done]).median
        rows.append(
            [
                kind,
                str(c),
                f"{limit:,.0f}",
                fmt_rate(rate),
                f"{share.median:.0%}",
                f"{in_sleep:.0%}",
                f"{sleep_ms:.2f}",
            ]
        )
        if kind == "pgtasks":
            targets.append(target_row(f"pgtasks c={c}, share of the slot limit", share, 0.6))
    headers = [
        "consumer",
        "concurrency",
        "slot limit jobs/s",
        "jobs/s",
        "% of limit",
        "slot time in the sleeps",
        "a 1 ms sleep took, ms",
    ]
    print(markdown_table(headers, rows))
    print("\n" + markdown_table(["measure", "median (min-max)", "target", ""], targets))
    return missed(targets)


# --- worker processes ---------------------------------------------------------------------------


async def workers_alive(conn: asyncpg.Connection, count: int, since: object) -> None:
    query = "SELECT count(*) FROM pgtasks.workers WHERE stopped_at IS NULL AND started_at >= $1"
    deadline = time.perf_counter() + 120
    while await conn.fetchval(query, since) < count:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{count} workers did not report in within 120 s")
        await asyncio.sleep(0.1)


async def workers_drain(s: Scratch, kind: str, processes: int, size: int) -> float:
    await empty(s.conn, "drain")
    await fill(s.bench, "drain", size, delay=86_400.0)
    since = await s.conn.fetchval("SELECT clock_timestamp()")
    if kind == "pgtasks":
        procs = spawn_workers(
            s.dsn, ["drain"], WORKER_CONCURRENCY, processes, "--poll-interval", "3600"
        )
    else:
        procs = [spawn_role(s.dsn, "consume", "drain", 100) for _ in range(processes)]
    async with running(procs):
        if kind == "pgtasks":
            await workers_alive(s.conn, processes, since)
        else:
            await wait_ready(procs)
        await s.conn.execute("UPDATE pgmq.q_drain SET vt = clock_timestamp()")
        await s.conn.execute("VACUUM ANALYZE pgmq.q_drain")
        began = time.perf_counter()
        if kind != "pgtasks":
            go(procs)
        await s.conn.execute("SELECT pg_notify('pgtasks', 'drain')")
        while await s.conn.fetchval("SELECT count(*) FROM pgmq.q_drain"):
            if time.perf_counter() - began > 600:
                raise RuntimeError("the backlog was not drained within 600 s")
            await asyncio.sleep(0.02)
        return size / (time.perf_counter() - began)


async def section_workers(admin_dsn: str, runs: int, sizes: Sizes, log: Log) -> int:
    counts = sorted(sizes.worker_counts)
    cases = [(kind, p) for kind in ("pgtasks", "raw pgmq") for p in counts]
    rates: Values = defaultdict(list)
    async with scratch_app(admin_dsn) as s:
        await s.conn.execute("SELECT pgmq.create('drain')")
        for r in range(runs):
            for kind, p in rotated(cases, r):
                rates[kind, p].append(await workers_drain(s, kind, p, sizes.size))
                log(f"round {r + 1}/{runs}  {kind} x{p}: {rates[kind, p][-1]:,.0f} jobs/s")
    print(
        f"### workers: processes draining one backlog of {sizes.size:,} no-op jobs "
        f"(pgtasks: -c {WORKER_CONCURRENCY} each; raw: read 100 + archive)\n"
    )
    rows, targets = [], []
    base = counts[0]
    for p in counts:
        ours, raw = rates["pgtasks", p], rates["raw pgmq", p]
        ratio = Summary.of([a / b for a, b in zip(ours, raw, strict=True)])
        rows.append(
            [str(p), fmt_rate(Summary.of(ours)), fmt_rate(Summary.of(raw)), f"{ratio.median:.2f}"]
        )
        if p != base:
            paired = [a / b for a, b in zip(ours, rates["pgtasks", base], strict=True)]
            targets.append(target_row(f"pgtasks x{p} / x{base}", summary(paired), 1.0))
    print(markdown_table(["processes", "pgtasks jobs/s", "raw pgmq jobs/s", "pgtasks / raw"], rows))
    print(
        "\n"
        + markdown_table(
            ["total drain (paired by round)", "median (min-max)", "target", ""], targets
        )
    )
    return missed(targets)
