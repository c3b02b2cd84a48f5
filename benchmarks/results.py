"""Job results: the round trip from ``defer()`` to ``await ref.result()`` with an idle worker,
and what keeping results costs a drain (a task that returns an int, against the same task
annotated ``-> None``).

    python benchmarks/results.py [--dsn DSN] [--runs 3] [--n 20000] [--trips 300]

Both run in one process: the worker (``app.worker()``, in the background) and the producer,
on one scratch database (``bench_results``). The round trip is timed on ``perf_counter``
from the start of ``defer()`` to the return of ``result()``: it includes the defer's commit,
the worker's wake-up, claim, run and ack, the notification and the look-up. The drains are
paired by round (the two cases alternate, first one then the other), on ``N`` pre-enqueued
jobs at concurrency 100, as in ``drain.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence

import asyncpg
from _harness import (
    Summary,
    add_common_arguments,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    machine_description,
    markdown_table,
    percentile,
    scratch_database,
    server_description,
)

import pgtasks

DATABASE = "bench_results"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_common_arguments(parser)
    parser.add_argument("--n", type=int, default=20_000, help="jobs per drain (default 20000)")
    parser.add_argument(
        "--trips", type=int, default=300, help="round trips per round (default 300)"
    )
    return parser.parse_args(argv)


async def round_trips(app: pgtasks.App, trips: int) -> list[float]:
    @app.task(queue="trip")
    async def echo(n: int) -> int:
        return n

    latencies = []
    async with app.worker(queues=["trip"], concurrency=10, poll_interval=5):
        for i in range(20):  # warm-up: connections, statement caches, the listener
            await (await echo.defer(i)).result(timeout=10)
        for i in range(trips):
            started = time.perf_counter()
            ref = await echo.defer(i)
            assert await ref.result(timeout=10) == i
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)  # an idle worker between trips
    return latencies


async def drain(dsn: str, queue: str, keeps: bool, n: int) -> float:
    app = pgtasks.App(dsn)
    if keeps:

        @app.task(queue=queue, name=f"bench.{queue}")
        async def job(i: int) -> int:
            return i

    else:

        @app.task(queue=queue, name=f"bench.{queue}")
        async def job(i: int) -> None:
            return None

    try:
        await app.migrate()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"TRUNCATE pgmq.q_{queue}, pgmq.a_{queue}")
            await conn.execute("TRUNCATE pgtasks.job_results")
            for start in range(0, n, 5000):
                await app.defer_many(job.s(i) for i in range(start, min(n, start + 5000)))
            await conn.execute(f"VACUUM ANALYZE pgmq.q_{queue}")
        finally:
            await conn.close()
        started = time.perf_counter()
        await app.worker(queues=[queue], concurrency=100, burst=True).run()
        return n / (time.perf_counter() - started)
    finally:
        await app.close()


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"machine:  {machine_description()}")
    print(f"server:   {await server_description(args.dsn)}")
    print(
        f"workload: {args.trips} round trips per round (idle worker, concurrency 10); drains "
        f"of N={args.n:,} jobs at concurrency 100, keeping results or not; {args.runs} rounds\n"
    )
    trips: list[list[float]] = []
    keep_rates: list[float] = []
    none_rates: list[float] = []
    async with scratch_database(args.dsn, DATABASE) as dsn:
        for r in range(args.runs):
            app = pgtasks.App(dsn)
            try:
                await app.migrate()
                trips.append(await round_trips(app, args.trips))
            finally:
                await app.close()
            order = [(True, keep_rates), (False, none_rates)]
            for keeps, rates in order if r % 2 == 0 else order[::-1]:
                rates.append(await drain(dsn, "kept" if keeps else "none", keeps, args.n))
            print(
                f"round {r + 1}: p50 {percentile(trips[-1], 50) * 1e3:.2f} ms; drain "
                f"{keep_rates[-1]:,.0f} (results) / {none_rates[-1]:,.0f} (none) jobs/s",
                file=sys.stderr,
            )

    def over_rounds(q: float) -> Summary:
        return Summary.of([percentile(t, q) for t in trips])

    print("### defer() -> await result(), idle worker (per-round percentile, median over rounds)\n")
    print(
        markdown_table(
            ["p50 ms", "p95 ms", "p99 ms", "max ms"],
            [[fmt_ms(over_rounds(q)) for q in (50, 95, 99, 100)]],
        )
    )
    print("\n### Drain at concurrency 100 (jobs/s)\n")
    ratio = Summary.of([k / n for k, n in zip(keep_rates, none_rates, strict=True)])
    print(
        markdown_table(
            ["task", "jobs/s, median (min-max)"],
            [
                ["returns an int (result kept)", fmt_rate(Summary.of(keep_rates))],
                ["annotated -> None (nothing kept)", fmt_rate(Summary.of(none_rates))],
            ],
        )
    )
    p50 = over_rounds(50).median * 1e3
    print("\n### Targets\n")
    print(
        markdown_table(
            ["measure", "median (min-max)", "target", ""],
            [
                ["round trip p50", fmt_ms(over_rounds(50)), "<= 5 ms", _met(p50 <= 5)],
                [
                    "drain keeping results / without",
                    fmt_ratio(ratio),
                    ">= 0.8",
                    _met(ratio.median >= 0.8),
                ],
            ],
        )
    )
    return 0


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
