"""Benchmarks of pgtasks beyond asyncio: processes, threads, and enqueueing from sync code.

    python benchmarks/sync.py [--dsn DSN] [--runs 3] [--sections cpu,threads,enqueue]

1. **cpu**: ``--cpu-jobs`` plain ``def`` tasks of about 20 ms of pure-Python work each,
   drained by the real CLI, ``python -m pgtasks worker --burst --processes P``, for P = 1
   and 2 (alternating, round by round). Time from the start of the command to its exit
   (interpreter start-up and connections included). The ratio says how far a second process
   gets on this machine, whose cores the database shares.
2. **threads**: ``--n`` no-op jobs drained in-process by ``app.worker(concurrency=16,
   burst=True).run()``: a plain ``def`` no-op (run in the worker's threads) against an
   ``async def`` no-op. The ratio is what a thread hop costs per job.
3. **enqueue**: ``--n`` jobs deferred one at a time: ``task.defer_sync()`` from plain code
   (through the app's background event loop), against ``await task.defer()`` on the
   caller's loop; and ``defer_sync()`` on a psycopg 3 cursor in autocommit mode (the
   caller's connection: no loop at all).

Every case gets a fresh queue state (the queue is emptied and refilled, untimed, before a
drain) in one scratch database (``bench_sync``), dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (
    Summary,
    add_common_arguments,
    create_database,
    drop_database,
    fmt_rate,
    fmt_ratio,
    machine_description,
    markdown_table,
    server_description,
)

import pgtasks

SCRATCH = "bench_sync"
SECTIONS = ("cpu", "threads", "enqueue")

TASKS = """
import pgtasks

app = pgtasks.App()


@app.task(queue="bench_cpu")
def burn(rounds: int) -> int:
    total = 0
    for i in range(rounds):
        total = (total + i * i) % 1_000_003
    return total
"""


def burn(rounds: int) -> int:
    total = 0
    for i in range(rounds):
        total = (total + i * i) % 1_000_003
    return total


def calibrate(target: float = 0.020) -> int:
    """Rounds of `burn` that take about ``target`` seconds here."""
    rounds = 10_000
    while True:
        began = time.perf_counter()
        burn(rounds)
        took = time.perf_counter() - began
        if took > 0.005:
            return max(1, int(rounds * target / took))
        rounds *= 4


def summary(values: list[float]) -> Summary:
    return Summary.of(values)


def paired(a: list[float], b: list[float]) -> Summary:
    return Summary.of([x / y for x, y in zip(a, b, strict=True)])


async def _empty(app: pgtasks.App, queue: str) -> None:
    pool = await app.pool()
    await pool.execute(f"SELECT pgmq.purge_queue('{queue}')")


# --- cpu: --processes 1 and 2 -------------------------------------------------------------------


def bench_cpu(dsn: str, runs: int, jobs: int, concurrency: int) -> list[list[str]]:
    rounds = calibrate()
    workdir = Path(tempfile.mkdtemp(prefix="pgtasks-bench-sync-"))
    (workdir / "benchsync.py").write_text(textwrap.dedent(TASKS))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGTASKS_APP")}
    env.update(PGTASKS_DSN=dsn, PYTHONPATH=str(workdir))
    app = pgtasks.App(dsn)

    @app.task(queue="bench_cpu", name="benchsync.burn")
    def task(rounds: int) -> int:
        raise NotImplementedError("benchsync.burn runs in the worker processes")

    rates: dict[int, list[float]] = {1: [], 2: []}
    try:
        for r in range(runs):
            for processes in (1, 2) if r % 2 == 0 else (2, 1):
                asyncio.run(_refill_cpu(app, task, jobs, rounds))
                began = time.perf_counter()
                done = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pgtasks",
                        "worker",
                        "--app",
                        "benchsync:app",
                        "--burst",
                        "--processes",
                        str(processes),
                        "-c",
                        str(concurrency),
                        "--no-log-jobs",
                        "--log-level",
                        "WARNING",
                    ],
                    cwd=workdir,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                took = time.perf_counter() - began
                if done.returncode != 0:
                    raise RuntimeError(f"the worker failed:\n{done.stdout}{done.stderr}")
                rates[processes].append(jobs / took)
                print(
                    f"cpu round {r + 1}/{runs}: --processes {processes}: {jobs / took:,.1f} jobs/s",
                    file=sys.stderr,
                )
    finally:
        app.close_sync()
    return [
        ["cpu (~20 ms each)", "--processes 1", fmt_rate(summary(rates[1])), ""],
        [
            "cpu (~20 ms each)",
            "--processes 2",
            fmt_rate(summary(rates[2])),
            fmt_ratio(paired(rates[2], rates[1])) + " of --processes 1",
        ],
    ]


async def _refill_cpu(
    app: pgtasks.App, task: pgtasks.SyncTask[[int], int], jobs: int, rounds: int
) -> None:
    await app.migrate()
    await _empty(app, "bench_cpu")
    await app.defer_many(task.s(rounds) for _ in range(jobs))
    await app.close()


# --- threads: sync no-ops against async no-ops at c=16 ------------------------------------------


def bench_threads(dsn: str, runs: int, n: int) -> list[list[str]]:
    async def main() -> dict[str, list[float]]:
        app = pgtasks.App(dsn)

        @app.task(queue="bench_noop_sync")
        def sync_noop(i: int) -> None:
            pass

        @app.task(queue="bench_noop_async")
        async def async_noop(i: int) -> None:
            pass

        cases: dict[str, tuple[str, pgtasks.Task[[int], None]]] = {
            "async def no-op": ("bench_noop_async", async_noop),
            "def no-op (threads)": ("bench_noop_sync", sync_noop),
        }
        rates: dict[str, list[float]] = {name: [] for name in cases}
        try:
            await app.migrate()
            for r in range(runs):
                order = list(cases) if r % 2 == 0 else list(reversed(cases))
                for name in order:
                    queue, task = cases[name]
                    await _empty(app, queue)
                    await app.defer_many(task.s(i) for i in range(n))
                    pool = await app.pool()
                    await pool.execute(f"VACUUM ANALYZE pgmq.q_{queue}")
                    began = time.perf_counter()
                    await app.worker(queues=[queue], concurrency=16, burst=True).run()
                    rates[name].append(n / (time.perf_counter() - began))
                    print(
                        f"threads round {r + 1}/{runs}: {name}: {rates[name][-1]:,.0f} jobs/s",
                        file=sys.stderr,
                    )
        finally:
            await app.close()
        return rates

    rates = asyncio.run(main())
    async_rates, sync_rates = rates["async def no-op"], rates["def no-op (threads)"]
    return [
        ["drain, c=16", "async def no-op", fmt_rate(summary(async_rates)), ""],
        [
            "drain, c=16",
            "def no-op (threads)",
            fmt_rate(summary(sync_rates)),
            fmt_ratio(paired(sync_rates, async_rates)) + " of async",
        ],
    ]


# --- enqueue: defer_sync against defer -----------------------------------------------------------


def bench_enqueue(dsn: str, runs: int, n: int) -> list[list[str]]:
    app = pgtasks.App(dsn, pool_min_size=1, pool_max_size=2)

    @app.task(queue="bench_enqueue")
    def job(user_id: int, email: str) -> None: ...

    async def async_defer() -> float:
        began = time.perf_counter()
        for i in range(n):
            await job.defer(i, f"user{i}@example.com")
        return time.perf_counter() - began

    async def prepare() -> None:
        await app.migrate()
        await _empty(app, "bench_enqueue")
        await app.close()

    def sync_defer() -> float:
        began = time.perf_counter()
        for i in range(n):
            job.defer_sync(i, f"user{i}@example.com")
        return time.perf_counter() - began

    cursor_defer: Callable[[], float] | None = None
    try:
        import psycopg

        def on_cursor() -> float:
            with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
                call = job.options(cursor=cur)
                call.defer_sync(0, "warm@example.com")
                began = time.perf_counter()
                for i in range(n):
                    call.defer_sync(i, f"user{i}@example.com")
                return time.perf_counter() - began

        cursor_defer = on_cursor
    except ImportError:
        print("psycopg is not installed: no cursor case", file=sys.stderr)

    rates: dict[str, list[float]] = {"defer": [], "defer_sync": [], "cursor": []}
    try:
        for r in range(runs):
            asyncio.run(prepare())
            job.defer_sync(0, "warm@example.com")  # the background loop and its pool
            cases: list[tuple[str, Callable[[], float]]] = [
                ("defer", lambda: asyncio.run(_with_close(app, async_defer))),
                ("defer_sync", sync_defer),
            ]
            if cursor_defer is not None:
                cases.append(("cursor", cursor_defer))
            for name, run in cases if r % 2 == 0 else list(reversed(cases)):
                took = run()
                rates[name].append(n / took)
                print(
                    f"enqueue round {r + 1}/{runs}: {name}: {n / took:,.0f} jobs/s",
                    file=sys.stderr,
                )
    finally:
        app.close_sync()
    rows = [
        ["serial enqueue", "await task.defer()", fmt_rate(summary(rates["defer"])), ""],
        [
            "serial enqueue",
            "task.defer_sync()",
            fmt_rate(summary(rates["defer_sync"])),
            fmt_ratio(paired(rates["defer_sync"], rates["defer"])) + " of defer()",
        ],
    ]
    if rates["cursor"]:
        rows.append(
            [
                "serial enqueue",
                "defer_sync() on a psycopg cursor",
                fmt_rate(summary(rates["cursor"])),
                fmt_ratio(paired(rates["cursor"], rates["defer"])) + " of defer()",
            ]
        )
    return rows


async def _with_close(app: pgtasks.App, work: Callable[[], object]) -> float:
    try:
        await app.pool()  # opened untimed
        took = await work()  # type: ignore[misc]
        return float(took)
    finally:
        await app.close()


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--n", type=int, default=3000, help="jobs per no-op drain and enqueue")
    parser.add_argument("--cpu-jobs", type=int, default=300, help="jobs per cpu drain")
    parser.add_argument("--cpu-concurrency", type=int, default=4, help="-c of each process")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"of {', '.join(SECTIONS)}")
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    dsn = asyncio.run(create_database(args.dsn, SCRATCH))
    rows: list[list[str]] = []
    try:
        header = f"{machine_description()}\n{asyncio.run(server_description(dsn))}"
        if "cpu" in sections:
            rows += bench_cpu(dsn, args.runs, args.cpu_jobs, args.cpu_concurrency)
        if "threads" in sections:
            rows += bench_threads(dsn, args.runs, args.n)
        if "enqueue" in sections:
            rows += bench_enqueue(dsn, args.runs, args.n)
    finally:
        asyncio.run(drop_database(args.dsn, SCRATCH))
    print(header)
    print()
    print(markdown_table(["benchmark", "case", "jobs/s, median (min-max)", "ratio"], rows))


if __name__ == "__main__":
    main()
