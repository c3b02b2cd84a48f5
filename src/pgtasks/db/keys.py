"""The SQL of ``pgtasks.idempotency_keys`` that runs outside an enqueue or an ack (those
claim and release keys in their own statements): pruning expired keys, and looking one up.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from .sql import Executor

KEYS_PRUNE = """
WITH gone AS (
    DELETE FROM pgtasks.idempotency_keys WHERE expires_at < now() RETURNING 1
) SELECT count(*) FROM gone
"""


async def keys_prune(conn: Executor) -> int:
    """Delete idempotency keys whose retention after success has passed."""
    count: int = await conn.fetchval(KEYS_PRUNE)
    return count


KEY_GET = """
SELECT key, queue, msg_id, created_at, expires_at FROM pgtasks.idempotency_keys WHERE key = $1
"""


async def key_get(conn: Executor, key: str) -> asyncpg.Record | None:
    row: Any = await conn.fetchrow(KEY_GET, key)
    return row  # type: ignore[no-any-return]
