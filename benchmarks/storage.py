"""Storage settings of queue tables: do they do what migration 0013 says?

    python benchmarks/storage.py [--dsn DSN] [--n N] [--autovacuum]

1. **HOT updates**: ``N`` no-op jobs drained by a pgtasks worker (concurrency 16, burst)
   from a queue table with fillfactor 100 and from one with fillfactor 70; the table's
   ``n_tup_upd`` / ``n_tup_hot_upd`` / ``n_tup_del`` from ``pg_stat_user_tables`` and its
   size afterwards. A claim updates ``vt``, which is indexed, so no update can be HOT
   whatever the fillfactor: a fillfactor below 100 would only leave pages emptier.
2. **autovacuum** (``--autovacuum``): two queue tables with a backlog of 200,000 jobs,
   ``VACUUM ANALYZE``d, then 5,000 jobs each claimed and acked (10,000 dead row versions):
   one table with PostgreSQL's defaults, one with pgtasks' settings. Reports each table's
   dead rows against autovacuum's trigger for it (threshold + scale factor x rows, from
   its settings or the server's), and when the server runs autovacuum, waits up to 150 s
   (autovacuum_naptime is 1 minute by default) for autovacuum to visit each.

Runs in a scratch database, dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import asyncpg

import pgtasks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import default_dsn, scratch_database

STATS = """
SELECT n_tup_upd, n_tup_hot_upd, n_tup_del, pg_relation_size(relid)
FROM pg_stat_user_tables WHERE schemaname = 'pgmq' AND relname = $1
"""


async def hot_updates(dsn: str, n: int) -> None:
    print("| fillfactor | jobs | updates | HOT updates | deletes | table size after |")
    print("|---|---|---|---|---|---|")
    for fillfactor in (100, 70):
        queue = f"ff{fillfactor}"
        app = pgtasks.App(dsn, pool_max_size=4)

        @app.task(name=f"noop_{queue}", queue=queue, keep_result=False)
        async def noop() -> None:
            pass

        async with app:
            pool = await app.pool()
            await pool.execute("SELECT pgtasks.ensure_queue($1)", queue)
            await pool.execute(f"ALTER TABLE pgmq.q_{queue} SET (fillfactor = {fillfactor})")
            for start in range(0, n, 1000):
                await app.defer_many(noop.s() for _ in range(min(1000, n - start)))
            await app.worker(concurrency=16, burst=True, listen=False).run()
            await pool.execute("SELECT pg_stat_force_next_flush()")
            await asyncio.sleep(1.5)  # other backends' (the worker's) stats flush within 1 s
            row = await pool.fetchrow(STATS, f"q_{queue}")
            assert row is not None
            upd, hot, dele, size = row
        print(f"| {fillfactor} | {n:,} | {upd:,} | {hot:,} | {dele:,} | {size / 1024:,.0f} KiB |")


CLAIM = """
UPDATE pgmq.{t} AS m SET vt = clock_timestamp() + interval '30 seconds',
    read_ct = m.read_ct + 1, last_read_at = clock_timestamp()
WHERE m.msg_id IN (SELECT msg_id FROM pgmq.{t} ORDER BY vt LIMIT 100 FOR UPDATE SKIP LOCKED)
RETURNING m.msg_id
"""
ACK = "DELETE FROM pgmq.{t} WHERE msg_id = ANY($1::bigint[])"

# autovacuum's trigger for a table: threshold + scale_factor * reltuples, each from the
# table's reloptions, else the server's setting
DUE = """
SELECT s.n_dead_tup, c.reltuples::bigint,
       coalesce((SELECT split_part(o, '=', 2)::float8 FROM unnest(c.reloptions) AS o
                 WHERE o LIKE 'autovacuum_vacuum_threshold=%'),
                current_setting('autovacuum_vacuum_threshold')::float8)
     + coalesce((SELECT split_part(o, '=', 2)::float8 FROM unnest(c.reloptions) AS o
                 WHERE o LIKE 'autovacuum_vacuum_scale_factor=%'),
                current_setting('autovacuum_vacuum_scale_factor')::float8) * c.reltuples,
       s.autovacuum_count
FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid
WHERE s.schemaname = 'pgmq' AND s.relname = $1
"""


async def autovacuum(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        tables = {"defaults": "q_plain", "pgtasks": "q_tuned"}
        await conn.execute("SELECT pgmq.create('plain')")  # no settings
        await conn.execute("SELECT pgtasks.ensure_queue('tuned')")  # pgtasks' settings
        for t in tables.values():
            for _ in range(20):
                await conn.execute(
                    f"INSERT INTO pgmq.{t} (vt, message) "
                    "SELECT now(), '{}'::jsonb FROM generate_series(1, 10000)"
                )
            await conn.execute(f"VACUUM ANALYZE pgmq.{t}")
        for t in tables.values():
            for _ in range(50):  # claim then ack, 100 at a time like a worker
                ids = [r[0] for r in await conn.fetch(CLAIM.format(t=t))]
                await conn.execute(ACK.format(t=t), ids)
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await asyncio.sleep(1.5)
        print("\n| table | backlog | dead rows | autovacuum's trigger | due |")
        print("|---|---|---|---|---|")
        for name, t in tables.items():
            row = await conn.fetchrow(DUE, t)
            assert row is not None
            dead, live, trigger, _ = row
            due = "yes" if dead > trigger else "no"
            print(f"| {name} ({t}) | {live:,} | {dead:,} | {trigger:,.0f} | {due} |")
        if await conn.fetchval("SHOW autovacuum") != "on":
            print("\n(autovacuum is off on this server: not waiting for it)")
            return
        started = time.monotonic()
        seen: dict[str, float] = {}
        while time.monotonic() - started < 150 and len(seen) < len(tables):
            await asyncio.sleep(2)
            for name, t in tables.items():
                row = await conn.fetchrow(DUE, t)
                if row is not None and row[3] and name not in seen:
                    seen[name] = time.monotonic() - started
        for name, t in tables.items():
            when = f"after {seen[name]:.0f} s" if name in seen else "not within 150 s"
            print(f"{name:9} ({t}): autovacuum {when}")
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=default_dsn())
    parser.add_argument("--n", type=int, default=20_000, help="jobs drained (default 20,000)")
    parser.add_argument("--autovacuum", action="store_true", help="also run part 2 (~2.5 min)")
    args = parser.parse_args()
    async with scratch_database(args.dsn, "pgtasks_bench_storage") as dsn:
        app = pgtasks.App(dsn)
        async with app:
            await app.migrate()
        await hot_updates(dsn, args.n)
        if args.autovacuum:
            await autovacuum(dsn)


if __name__ == "__main__":
    asyncio.run(main())
