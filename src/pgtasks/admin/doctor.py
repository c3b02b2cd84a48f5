"""``pgtasks doctor``: the health of the tables a queue lives in, what holds back vacuum, and
advice.

A queue table is small and churns: every job is one insert, one or more updates (claims,
leases) and one delete. Its dead row versions are cleaned by (auto)vacuum, which can only
remove those older than the oldest snapshot still open in the database, the *xmin horizon*.
One long transaction (an idle-in-transaction session, a long report, a forgotten prepared
transaction, a replication slot nobody reads) holds that horizon back for every table at
once: the queue tables bloat and each claim reads through more dead rows. So the report
lists the tables' live and dead rows and sizes, the holders of the horizon with how long
they have held it, and advice that names the table, the session and the command to run.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from ..db import health
from ..db.database import Database

DEAD_ROWS = 10_000
"""A queue table is bloated past this many dead rows, when they also outnumber its live rows."""
ARCHIVE_ROWS = 1_000_000
"""An archive past this many messages is worth pruning."""
ARCHIVE_BYTES = 1 << 30
"""An archive past this size (1 GiB) is worth pruning."""
HORIZON_SECONDS = 60.0
"""A snapshot held longer than this is reported (``doctor --horizon-age``)."""


@dataclass(frozen=True)
class TableHealth:
    """One table: ``kind`` is ``queue`` or ``archive`` (then ``queue`` names it) or
    ``pgtasks`` / ``pgmq`` for the schemas' own tables."""

    table: str
    kind: str
    queue: str | None
    live: int
    dead: int
    bytes: int
    vacuumed_at: dt.datetime | None
    options: list[str]


@dataclass(frozen=True)
class Holder:
    """Something that holds the xmin horizon: a session (``kind="session"``, with its pid),
    a prepared transaction (``gid`` as ``name``) or a replication slot (its name).
    ``seconds`` is how long it has held it (None for a slot); ``xid_age`` how many
    transactions behind it is."""

    kind: str
    name: str
    pid: int | None
    xid_age: int
    seconds: float | None
    detail: str


@dataclass(frozen=True)
class Report:
    tables: list[TableHealth]
    holders: list[Holder]
    advice: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "tables": [
                {**asdict(t), "vacuumed_at": t.vacuumed_at and t.vacuumed_at.isoformat()}
                for t in self.tables
            ],
            "holders": [asdict(h) for h in self.holders],
            "advice": self.advice,
        }


async def doctor(database: Database, *, horizon_seconds: float = HORIZON_SECONDS) -> Report:
    """The tables, the holders of the horizon and the advice (empty when all is well)."""
    pool = await database.pool()
    async with pool.acquire() as conn:
        tables = [_table(r) for r in await health.table_stats(conn)]
        sessions, prepared, slots = await health.horizon_holders(conn)
    holders = [
        Holder(
            "session",
            f"pid {r['pid']}",
            r["pid"],
            r["xid_age"],
            r["seconds"],
            _session_detail(r),
        )
        for r in sessions
    ]
    holders += [
        Holder("prepared transaction", r["gid"], None, r["xid_age"], r["seconds"], r["owner"])
        for r in prepared
    ]
    holders += [
        Holder(
            "replication slot",
            r["name"],
            None,
            r["xid_age"],
            None,
            "active" if r["active"] else "inactive",
        )
        for r in slots
    ]
    return Report(tables, holders, advise(tables, holders, horizon_seconds))


def _table(row: Any) -> TableHealth:
    schema, name = row["schema"], row["name"]
    kind, queue = schema, None
    if schema == "pgmq" and name[:2] in ("q_", "a_"):
        kind, queue = ("queue" if name[0] == "q" else "archive"), name[2:]
    return TableHealth(
        f"{schema}.{name}",
        kind,
        queue,
        row["live"],
        row["dead"],
        row["bytes"],
        row["vacuumed_at"],
        list(row["options"] or []),
    )


def _session_detail(row: Any) -> str:
    parts = [f"user {row['username']}" if row["username"] else row["backend_type"]]
    if row["application"]:
        parts.append(f"application {_printable(row['application'])!r}")
    if row["state"]:
        parts.append(row["state"])
    if row["query"]:
        parts.append(f"last query: {_printable(row['query'])}")
    return ", ".join(parts)


def _printable(text: str) -> str:
    """Another session's text as one line: whitespace runs as one space, no control
    characters."""
    return "".join(c for c in " ".join(text.split()) if c.isprintable())


def advise(tables: list[TableHealth], holders: list[Holder], horizon_seconds: float) -> list[str]:
    """What to do about what the report shows, most urgent first."""
    advice = []
    for h in holders:
        if h.kind == "session" and (h.seconds or 0) >= horizon_seconds:
            advice.append(
                f"{h.name} ({h.detail}) has held the xmin horizon for {h.seconds or 0:,.0f} s: "
                "vacuum keeps every dead row of every queue table until it ends. End it "
                f"(SELECT pg_terminate_backend({h.pid})) and bound such sessions with "
                "idle_in_transaction_session_timeout or statement_timeout."
            )
        elif h.kind == "prepared transaction" and (h.seconds or 0) >= horizon_seconds:
            advice.append(
                f"prepared transaction {h.name!r} (owner {h.detail}) has held the xmin horizon "
                f"for {h.seconds or 0:,.0f} s: COMMIT PREPARED or ROLLBACK PREPARED it."
            )
        elif h.kind == "replication slot" and h.detail == "inactive":
            advice.append(
                f"replication slot {h.name!r} is inactive and holds the xmin horizon "
                f"{h.xid_age:,} transactions back: drop it if nothing reads it "
                f"(SELECT pg_drop_replication_slot('{h.name}'))."
            )
    for t in tables:
        if t.kind == "queue" and t.dead > DEAD_ROWS and t.dead > t.live:
            vacuumed = t.vacuumed_at.isoformat(timespec="seconds") if t.vacuumed_at else "never"
            advice.append(
                f"queue {t.queue!r}: {t.dead:,} dead rows against {t.live:,} live in {t.table} "
                f"(last vacuumed: {vacuumed}). If a holder of the horizon is listed, end it; "
                f"else vacuum it (VACUUM {t.table}) and lower its "
                "autovacuum_vacuum_scale_factor so autovacuum keeps up."
            )
        if t.kind == "archive" and (t.live > ARCHIVE_ROWS or t.bytes > ARCHIVE_BYTES):
            advice.append(
                f"the archive of queue {t.queue!r} holds {t.live:,} messages "
                f"({t.bytes / 2**20:,.0f} MiB): is a worker with an archive_retention "
                "serving it (App(archive_retention=...), 7 days by default)? Else prune it "
                "(python -m pgtasks prune --archive-older-than 7d), or use "
                "on_success='delete' for tasks whose archive nobody reads."
            )
        if t.kind == "queue" and not t.options:
            advice.append(
                f"{t.table} (queue {t.queue!r}) has no storage settings, so autovacuum waits "
                "for 20% of it to be dead: python -m pgtasks migrate sets pgtasks' "
                "(docs: Operations, Vacuum and bloat)."
            )
    return advice
