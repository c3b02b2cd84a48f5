"""Host clocks hours off, in worker processes (issue 14's review): three CLI workers race for
a one-second schedule, one with its host time three hours ahead, one three hours behind.
The scheduler takes instants only from the database, so each tick is one job, none early,
none skipped."""

from __future__ import annotations

import datetime as dt
import itertools
from collections import Counter
from pathlib import Path

import anyio
import asyncpg
import pytest

from .test_periodic_cli import prepare, project, start, stop, wait_until  # noqa: F401


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_workers_with_host_clocks_three_hours_off_make_one_job_per_tick(
    project: tuple[Path, dict[str, str]],  # noqa: F811 (the fixture)
    conn: asyncpg.Connection,
) -> None:
    await prepare(conn)
    workers = [
        start(project, "worker", "--no-log-jobs", shift=shift)
        for shift in (3 * 3600.0, -3 * 3600.0, None)
    ]
    try:
        await wait_until(conn, "SELECT count(*) >= 2 FROM runs")
        begin: dt.datetime = await conn.fetchval("SELECT clock_timestamp()")
        await anyio.sleep(10.5)
        end: dt.datetime = await conn.fetchval("SELECT clock_timestamp()")
        await anyio.sleep(1.5)  # the last ticks' jobs finish
    finally:
        outputs = [stop(w) for w in workers]
    enqueued = await conn.fetch(
        "SELECT (headers ->> 'x-pgtasks-scheduled-at')::timestamptz AS tick, enqueued_at "
        "FROM pgmq.a_periodic_cli UNION ALL "
        "SELECT (headers ->> 'x-pgtasks-scheduled-at')::timestamptz, enqueued_at "
        "FROM pgmq.q_periodic_cli ORDER BY 1"
    )
    ticks = [r["tick"] for r in enqueued]
    assert len(ticks) == len(set(ticks)), Counter(ticks).most_common(3)
    assert all(r["enqueued_at"] >= r["tick"] for r in enqueued)  # never early
    during = [t for t in ticks if begin < t <= end]
    assert all(b - a == dt.timedelta(seconds=1) for a, b in itertools.pairwise(during)), outputs
    assert len(during) >= 9, (during, outputs)
    for out in outputs[:2]:
        assert "scheduler started" in out  # the shifted ones raced like the others
