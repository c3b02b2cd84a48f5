"""Workflows: a chain of 10 no-op steps end to end on one idle worker, against 10 sequential
``defer()`` + ``await result()`` round trips of the same task; and a chord of 1,000 members:
the time from the last member's acknowledgement to the start of its callback.

    python benchmarks/workflows.py [--dsn DSN] [--runs 3] [--chains 50] [--chords 3]

One process runs the worker (``app.worker()``, in the background, concurrency 10; 100 for
the chords) and the producer, on one scratch database (``bench_workflows``). A chain is
timed on ``perf_counter`` from the start of ``defer()`` to the return of ``result()``; the
round trips likewise, ten in a row. In a round, chains and round trips alternate one by
one, so drift lands on both. For a chord, the last member's acknowledgement is that
member's ``finished_at`` in ``pgtasks.workflow_steps`` (``now()`` of the acknowledgement's
transaction, which also sends the callback: its start, so the figure includes the rest of
that transaction), and the callback's start is the wall clock when its function is called
(the database runs on the same host, so on the same clock).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import sys
import time
from collections.abc import Sequence

from _harness import (
    Summary,
    add_common_arguments,
    fmt_ms,
    fmt_ratio,
    machine_description,
    markdown_table,
    percentile,
    scratch_database,
    server_description,
)

import pgtasks
from pgtasks import chain, chord

DATABASE = "bench_workflows"
STEPS = 10
MEMBERS = 1000


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_common_arguments(parser)
    parser.add_argument("--chains", type=int, default=50, help="chains per round (default 50)")
    parser.add_argument("--chords", type=int, default=3, help="chords per round (default 3)")
    return parser.parse_args(argv)


async def chains_and_trips(app: pgtasks.App, n: int) -> tuple[list[float], list[float]]:
    @app.task(queue="wf_chain")
    async def noop(x: int) -> int:
        return x + 1

    chained: list[float] = []
    trips: list[float] = []
    async with app.worker(queues=["wf_chain"], concurrency=10, poll_interval=5):
        for _ in range(3):  # warm-up: connections, statement caches, the listener
            ref = await chain(noop.s(0), *(noop.partial() for _ in range(STEPS - 1))).defer()
            assert await ref.result(timeout=30) == STEPS
        for _ in range(n):
            started = time.perf_counter()
            ref = await chain(noop.s(0), *(noop.partial() for _ in range(STEPS - 1))).defer()
            assert await ref.result(timeout=30) == STEPS
            chained.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)  # an idle worker between runs
            started = time.perf_counter()
            value = 0
            for _ in range(STEPS):
                value = await (await noop.defer(value)).result(timeout=30)
            assert value == STEPS
            trips.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)
    return chained, trips


async def chords_hand_off(app: pgtasks.App, n: int) -> tuple[list[float], list[float]]:
    """Per chord: seconds from the last member's ack to the callback's start, and from
    defer() to result()."""
    started_at: dict[int, dt.datetime] = {}

    @app.task(queue="wf_chord")
    async def member(i: int) -> int:
        return i

    @app.task(queue="wf_chord")
    async def callback(values: list[int], n: int) -> int:
        started_at[n] = dt.datetime.now(dt.timezone.utc)
        return len(values)

    hand_offs: list[float] = []
    totals: list[float] = []
    pool = await app.pool()
    async with app.worker(queues=["wf_chord"], concurrency=100, poll_interval=5):
        for k in range(n + 1):  # the first is a warm-up
            started = time.perf_counter()
            ref = await chord((member.s(i) for i in range(MEMBERS)), callback.partial(k)).defer()
            assert await ref.result(timeout=120) == MEMBERS
            total = time.perf_counter() - started
            last_ack = await pool.fetchval(
                "SELECT max(finished_at) FROM pgtasks.workflow_steps "
                "WHERE workflow_id = $1 AND step < $2",
                ref.id,
                MEMBERS,
            )
            if k:
                hand_offs.append((started_at[k] - last_ack).total_seconds())
                totals.append(total)
    return hand_offs, totals


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"machine:  {machine_description()}")
    print(f"server:   {await server_description(args.dsn)}")
    print(
        f"workload: per round {args.chains} chains of {STEPS} no-op steps and as many runs of "
        f"{STEPS} sequential defer + result (one idle worker, concurrency 10); {args.chords} "
        f"chords of {MEMBERS:,} members (concurrency 100); {args.runs} rounds\n"
    )
    chained: list[list[float]] = []
    trips: list[list[float]] = []
    hand_offs: list[float] = []
    totals: list[float] = []
    async with scratch_database(args.dsn, DATABASE) as dsn:
        for r in range(args.runs):
            app = pgtasks.App(dsn)
            try:
                await app.migrate()
                c, t = await chains_and_trips(app, args.chains)
                chained.append(c)
                trips.append(t)
                h, total = await chords_hand_off(app, args.chords)
                hand_offs.extend(h)
                totals.extend(total)
            finally:
                await app.close()
            print(
                f"round {r + 1}: chain p50 {percentile(c, 50) * 1e3:.1f} ms, round trips p50 "
                f"{percentile(t, 50) * 1e3:.1f} ms; chord hand-off "
                f"{', '.join(f'{x * 1e3:.1f}' for x in h)} ms",
                file=sys.stderr,
            )

    def over_rounds(runs: list[list[float]], q: float) -> Summary:
        return Summary.of([percentile(values, q) for values in runs])

    print(
        f"### A chain of {STEPS} no-op steps vs {STEPS} sequential round trips, defer to "
        "result (per-round percentile, median over rounds)\n"
    )
    print(
        markdown_table(
            ["", "p50 ms", "p95 ms", "max ms"],
            [
                [f"chain of {STEPS} steps"]
                + [fmt_ms(over_rounds(chained, q)) for q in (50, 95, 100)],
                [f"{STEPS} x defer + result()"]
                + [fmt_ms(over_rounds(trips, q)) for q in (50, 95, 100)],
            ],
        )
    )
    ratio = Summary.of(
        [percentile(c, 50) / percentile(t, 50) for c, t in zip(chained, trips, strict=True)]
    )
    print(f"\nchain p50 / round trips p50, per round: {fmt_ratio(ratio)}\n")
    print(f"### A chord of {MEMBERS:,} members ({len(hand_offs)} chords)\n")
    print(
        markdown_table(
            ["measure", "median ms (min-max)"],
            [
                ["last member's ack -> callback starts", fmt_ms(Summary.of(hand_offs))],
                ["defer() -> result(), whole chord", fmt_ms(Summary.of(totals))],
            ],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
