"""The SQL of ``pgtasks doctor``: the statistics of pgmq's and pgtasks' tables, and what
holds back the xmin horizon (the oldest row version vacuum must keep) of this database.

All of it reads the server's statistics views, which any role may read; a role that is not
a superuser (or ``pg_read_all_stats``) sees other roles' sessions without their query text.
"""

from __future__ import annotations

import asyncpg

from .sql import Executor

TABLES = """
SELECT s.schemaname::text AS schema, s.relname::text AS name,
       s.n_live_tup AS live, s.n_dead_tup AS dead,
       pg_total_relation_size(s.relid) AS bytes,
       greatest(s.last_vacuum, s.last_autovacuum) AS vacuumed_at,
       c.reloptions AS options
FROM pg_stat_user_tables s
JOIN pg_class c ON c.oid = s.relid
WHERE s.schemaname IN ('pgmq', 'pgtasks')
ORDER BY s.schemaname, s.relname
"""


async def table_stats(conn: Executor) -> list[asyncpg.Record]:
    """One row per table of the ``pgmq`` and ``pgtasks`` schemas."""
    return await conn.fetch(TABLES)


# Sessions of this database (or of none: a WAL sender) whose snapshot holds the horizon:
# vacuum of a user table only waits for those (PostgreSQL 14 and later).
HOLDERS = """
SELECT a.pid, a.usename::text AS username, a.application_name AS application,
       a.state, a.backend_type, age(a.backend_xmin)::bigint AS xid_age,
       extract(epoch FROM now() - coalesce(a.xact_start, a.backend_start))::float8 AS seconds,
       left(a.query, 300) AS query
FROM pg_stat_activity a
WHERE a.backend_xmin IS NOT NULL
  AND a.pid <> pg_backend_pid()
  AND (a.datname = current_database() OR a.datname IS NULL)
ORDER BY age(a.backend_xmin) DESC, a.pid
LIMIT 10
"""

PREPARED = """
SELECT gid, owner::text AS owner, age(transaction)::bigint AS xid_age,
       extract(epoch FROM now() - prepared)::float8 AS seconds
FROM pg_prepared_xacts
WHERE database = current_database()
ORDER BY age(transaction) DESC
"""

SLOTS = """
SELECT slot_name::text AS name, active,
       greatest(age(xmin), age(catalog_xmin))::bigint AS xid_age
FROM pg_replication_slots
WHERE xmin IS NOT NULL OR catalog_xmin IS NOT NULL
ORDER BY 3 DESC
"""


async def horizon_holders(
    conn: Executor,
) -> tuple[list[asyncpg.Record], list[asyncpg.Record], list[asyncpg.Record]]:
    """Sessions, prepared transactions and replication slots that hold the xmin horizon,
    oldest first."""
    return await conn.fetch(HOLDERS), await conn.fetch(PREPARED), await conn.fetch(SLOTS)
