"""What every SQL module of pgtasks shares (internal).

Each statement is a named constant (or, where it names a queue's table, a cached builder)
beside one small typed function taking a connection or the pool (`Executor`); no business
logic in the SQL layer, and no SQL outside it. JSON crosses the wire as text
(``$n::text::jsonb`` in, ``::text`` out): no codec is registered, so a caller's own
connection (transactional enqueue) behaves like ours. A queue's tables are named only
through `table`, which quotes a name pgtasks validated.
"""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..queues import check_queue_name

# Where a statement can run: a connection or the pool.
Executor: TypeAlias = "asyncpg.Connection | PoolConnectionProxy | asyncpg.Pool"

NOTIFY_CHANNEL = "pgtasks"
"""The channel of the wake-up notifications; the payload is the queue's name."""


def table(prefix: str, queue: str) -> str:
    """The quoted name of a queue's table in schema pgmq: ``q`` (queue) or ``a`` (archive)."""
    return '"' + prefix + "_" + check_queue_name(queue) + '"'
