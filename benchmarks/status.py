"""How long one ``pgtasks status`` refresh takes on a large queue, against what pgmq offers.

A scratch database gets one queue with ``--waiting`` visible jobs (default 1,000,000), 20
running (claimed, under a lease), 200 retrying (an attempt failed, backoff ahead), 10,000
scheduled (deferred an hour ahead), and ``--archived`` jobs (default 1,000,000) archived at a
steady rate over the last hour. Then, each timed ``--runs`` times (median, min-max, in ms),
once right after loading (the visibility map not yet set: index-only scans visit the heap)
and once after ``VACUUM ANALYZE``:

* ``pgtasks.queue_status()``: what ``pgtasks status`` runs (one statement), cap 50,000;
* the same with no cap (every count exact);
* ``pgmq.metrics_all()``, which pgtasks' status used before (a full scan per queue);
* one plain ``count(*)`` of the visible jobs.

    python benchmarks/status.py [--dsn DSN] [--waiting 1000000] [--archived 1000000] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    add_common_arguments,
    machine_description,
    markdown_table,
    scratch_database,
    server_description,
)

from pgtasks.db import schema

QUERIES = {
    "pgtasks.queue_status() (cap 50,000): what status runs": (
        "SELECT * FROM pgtasks.queue_status()"
    ),
    "pgtasks.queue_status(no cap): every count exact": (
        "SELECT * FROM pgtasks.queue_status(2000000000)"
    ),
    "pgmq.metrics_all()": "SELECT * FROM pgmq.metrics_all()",
    "count(*) of the visible jobs": (
        "SELECT count(*) FROM pgmq.q_big WHERE vt <= clock_timestamp()"
    ),
}


async def load(conn: asyncpg.Connection, waiting: int, archived: int) -> None:
    await schema.migrate(conn, ["big"])
    body = '{"v": 1, "task": "bench.task", "args": [42], "kwargs": {"email": "a@example.com"}}'
    await conn.execute(
        "INSERT INTO pgmq.q_big (vt, enqueued_at, message) "
        "SELECT now() - interval '10 minutes', now() - interval '10 minutes', $1::jsonb "
        "FROM generate_series(1, $2::integer)",
        body,
        waiting,
    )
    await conn.execute(  # running: claimed, leased for 30 s
        "INSERT INTO pgmq.q_big (vt, read_ct, message) "
        "SELECT now() + interval '30 seconds', 1, $1::jsonb FROM generate_series(1, 20)",
        body,
    )
    retrying = await conn.fetch(
        "INSERT INTO pgmq.q_big (vt, read_ct, message) "
        "SELECT now() + interval '5 minutes', 1, $1::jsonb FROM generate_series(1, 200) "
        "RETURNING msg_id",
        body,
    )
    await conn.execute(
        "INSERT INTO pgtasks.attempt_errors (queue, msg_id, task, attempt, error_type, message,"
        " worker) SELECT 'big', id, 'bench.task', 1, 'ValueError', 'boom', 'bench:1' "
        "FROM unnest($1::bigint[]) AS id",
        [r[0] for r in retrying],
    )
    await conn.execute(
        "INSERT INTO pgmq.q_big (vt, message) "
        "SELECT now() + interval '1 hour', $1::jsonb FROM generate_series(1, 10000)",
        body,
    )
    await conn.execute(
        "INSERT INTO pgmq.a_big (msg_id, read_ct, enqueued_at, archived_at, vt, message) "
        "SELECT -i, 1, now() - interval '2 hours', "
        "       now() - make_interval(secs => 3600.0 * i / $2::integer), now(), $1::jsonb "
        "FROM generate_series(1, $2::integer) AS i",
        body,
        archived,
    )


async def timed(conn: asyncpg.Connection, sql: str, runs: int) -> tuple[float, float, float]:
    await conn.fetch(sql)  # warm: plans and buffers
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await conn.fetch(sql)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), min(times), max(times)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--waiting", type=int, default=1_000_000)
    parser.add_argument("--archived", type=int, default=1_000_000)
    args = parser.parse_args()
    async with scratch_database(args.dsn, "bench_status") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            started = time.perf_counter()
            await load(conn, args.waiting, args.archived)
            print(f"loaded in {time.perf_counter() - started:.0f}s", file=sys.stderr)
            rows = []
            for phase in ("after loading", "after VACUUM ANALYZE"):
                if phase != "after loading":
                    await conn.execute("VACUUM ANALYZE pgmq.q_big")
                    await conn.execute("VACUUM ANALYZE pgmq.a_big")
                for name, sql in QUERIES.items():
                    median, low, high = await timed(conn, sql, args.runs)
                    rows.append([phase, name, f"{median:.1f} ({low:.1f}-{high:.1f})"])
            status = await conn.fetchrow("SELECT * FROM pgtasks.queue_status()")
            exact = await conn.fetchrow("SELECT * FROM pgtasks.queue_status(2000000000)")
            server = await server_description(dsn)
        finally:
            await conn.close()
    print(f"{machine_description()}; {server}")
    print(
        f"one queue: {args.waiting:,} waiting, 20 running, 200 retrying, 10,000 scheduled, "
        f"{args.archived:,} archived in the last hour\n"
    )
    print(markdown_table(["when", "query", "ms, median (min-max)"], rows))
    print()
    fields = ["waiting", "scheduled", "running", "retrying", "done_1m", "done_1h"]
    assert status is not None
    assert exact is not None
    print(
        markdown_table(
            ["", *fields],
            [
                ["status (cap 50,000)", *(f"{status[f]:,}" for f in fields)],
                ["exact", *(f"{exact[f]:,}" for f in fields)],
            ],
        )
    )
    print(f"\nestimated: {list(status['estimated'])}, at least: {list(status['at_least'])}")


if __name__ == "__main__":
    asyncio.run(main())
