"""Enqueueing on someone else's synchronous connection: pgtasks.send / send_batch through a
DB-API cursor (psycopg 2 or 3, Django's ``connection.cursor()``, pg8000) or a SQLAlchemy
``Connection``, in that connection's current transaction.

The statements are the ones `send.py` runs on asyncpg, with ``%s`` placeholders (the
``format`` paramstyle every PostgreSQL driver for Python accepts) and explicit casts on
every parameter, so neither the driver's adaptation nor pgmq's overloads can pick another
type. Bodies and headers go as text, cast to jsonb by the server, as on asyncpg: nothing
depends on the driver's JSON adapters. Nothing here commits: the job exists if and only if
the caller's transaction commits.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from ..exceptions import SchemaMissing

CURSOR_SEND = """
SELECT msg_id, deduplicated, queue, args_differ
FROM pgtasks.send(
    %s::text, %s::text::jsonb, %s::text::jsonb, %s::float8, %s::timestamptz, %s::boolean)
"""

# Bodies as one JSON array, headers as another (a JSON null for none), split here in order:
# two text parameters whatever the driver, instead of arrays each driver adapts its own way.
CURSOR_SEND_BATCH = """
SELECT s.msg_id, s.deduplicated, s.queue, s.args_differ
FROM pgtasks.send_batch(
    %s::text,
    ARRAY(SELECT b.body FROM jsonb_array_elements(%s::text::jsonb) WITH ORDINALITY AS b(body, i)
          ORDER BY b.i),
    (SELECT array_agg(nullif(h.h, 'null'::jsonb) ORDER BY h.i)
     FROM jsonb_array_elements(%s::text::jsonb) WITH ORDINALITY AS h(h, i)),
    %s::float8, %s::timestamptz, %s::boolean) AS s
"""

_MISSING = {"42883", "3F000", "42P01"}  # undefined function, schema, table


def _rows(cursor: Any, sql: str, params: tuple[Any, ...]) -> list[Any]:
    """Run ``sql`` on a DB-API cursor or a SQLAlchemy Connection; every row."""
    try:
        if hasattr(cursor, "exec_driver_sql"):  # SQLAlchemy: the driver's own paramstyle
            return list(cursor.exec_driver_sql(sql, params).fetchall())
        cursor.execute(sql, params)
        return list(cursor.fetchall())
    except Exception as exc:
        if _sqlstate(exc) in _MISSING:
            raise SchemaMissing(
                "enqueueing on your cursor failed: the pgtasks schema is not installed in "
                f"this database ({type(exc).__name__}: {str(exc).strip()}); run "
                "`python -m pgtasks migrate` (or app.migrate()) against it first"
            ) from exc
        raise


def _sqlstate(exc: BaseException | None) -> str | None:
    """The SQLSTATE of a driver's error (psycopg 3: ``sqlstate``, psycopg 2: ``pgcode``),
    also when Django or SQLAlchemy wrapped it."""
    seen = 0
    while exc is not None and seen < 5:
        for name in ("sqlstate", "pgcode"):
            code = getattr(exc, name, None)
            if isinstance(code, str):
                return code
        exc = getattr(exc, "orig", None) or exc.__cause__
        seen += 1
    return None


def cursor_send(
    cursor: Any,
    queue: str,
    body: str,
    headers: str | None,
    delay: float,
    eta: dt.datetime | None,
    create: bool,
) -> tuple[int, bool, str, bool]:
    """(msg_id, deduplicated, queue, args_differ) of one job sent on ``cursor``, as
    `send.message_send`; ``create``: the app's word on creating a missing queue."""
    (row,) = _rows(cursor, CURSOR_SEND, (queue, body, headers, delay, eta, create))
    return int(row[0]), bool(row[1]), str(row[2]), bool(row[3])


def cursor_send_batch(
    cursor: Any,
    queue: str,
    bodies: str,
    headers: str | None,
    delay: float,
    eta: dt.datetime | None,
    create: bool,
) -> list[tuple[int, bool, str, bool]]:
    """One (msg_id, deduplicated, queue, args_differ) per job, in input order: ``bodies``
    is a JSON array of envelopes, ``headers`` a JSON array of header objects (or nulls), or
    None."""
    rows = _rows(cursor, CURSOR_SEND_BATCH, (queue, bodies, headers, delay, eta, create))
    return [(int(r[0]), bool(r[1]), str(r[2]), bool(r[3])) for r in rows]
