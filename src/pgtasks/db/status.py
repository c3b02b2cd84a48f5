"""The SQL of a status snapshot: every queue's states and rates (``pgtasks.queue_status``,
see migration 0006 for the definitions), the workers and the dead letters, in one
statement, so that ``pgtasks status``, the metrics and the dashboard each cost one round
trip per refresh, however many queues there are.
"""

from __future__ import annotations

from typing import Any

import orjson

from .sql import Executor
from .workers import WORKERS_JSON

DEFAULT_CAP = 50_000
"""Rows a count walks before it estimates (or stops at a lower bound)."""

STATUS = f"""
SELECT (SELECT coalesce(json_agg(s), '[]') FROM pgtasks.queue_status($1::integer) AS s)::text,
       ({WORKERS_JSON})::text,
       extract(epoch FROM clock_timestamp())::float8
"""


async def status_snapshot(
    conn: Executor, *, cap: int = DEFAULT_CAP, everyone: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """Per queue (dicts with the columns of ``pgtasks.queue_status``), the workers (alive, or
    ``everyone`` until pruned), and the database's clock, as epoch seconds."""
    row = await conn.fetchrow(STATUS, cap, everyone)
    assert row is not None
    return orjson.loads(row[0]), orjson.loads(row[1]), row[2]
