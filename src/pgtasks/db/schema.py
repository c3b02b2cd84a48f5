"""Installing pgmq and the pgtasks schema.

`migrate` runs in one transaction under a transaction-level advisory lock, so two processes
migrating at once serialize: the second waits, then finds nothing left to do; then, once
that has committed, step 6, a transaction per queue. Steps:

1. pgmq, unless ``pgmq.meta`` exists: ``CREATE EXTENSION pgmq`` when the server offers the
   extension, else the SQL-only script shipped in the ``pgmq`` wheel (the ``pgmq-sql`` extra),
   read from disk without importing that package (it pulls in psycopg);
2. the ``pgtasks`` schema: the ``migrations/NNNN_name.sql`` files not yet recorded in
   ``pgtasks.migrations``, in order;
3. the group roles ``pgtasks_producer`` and ``pgtasks_worker`` (NOLOGIN), when either is
   missing and the migrating role may create roles; without CREATEROLE this is skipped with a
   warning, and `migrate` works all the same. Roles are cluster-wide: another database's
   `migrate` may create them at the same moment, which is tolerated;
4. their privileges in this database (``pgtasks.grant_roles()``), when they exist and lack
   them;
5. the pgmq queue of every queue name given (the app's registered tasks), through
   ``pgtasks.ensure_queue``, so that every queue has the same owner (and pgtasks' storage
   settings, which ``ensure_queue`` sets on the tables it creates);
6. pgtasks' storage settings on the tables of every pgtasks queue that have none (every
   queue, when migration 0013 runs; later, a queue made with plain ``pgmq.create``, or one
   whose table was locked when they were last set; see migrations/0013_queue_storage.sql):
   never waits more than 2 s for a table, and each queue in a transaction of its own
   (``Step.alone``). ALTER TABLE's lock is held to the end of its transaction, and the
   server's lock table holds ``max_locks_per_transaction x max_connections`` locks for all
   sessions together (6,400 by default): one transaction for every queue held two per
   queue, failed past a few thousand queues, and short of that starved the workers of
   lock slots while it lasted.

Capabilities are probed (does ``pgmq.meta`` exist, is the extension available, may this role
create roles), never versions. `plan` returns the same steps as SQL text without running
them, for review. `check_installed` is the cheap test, for every command and the worker,
that `migrate` has run.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import asyncpg

from .._shared import Connection
from ..exceptions import MigrationError, SchemaMissing
from ..queues import QUEUE_NAME, check_queue_name
from .queues import QUEUE_STORAGE_PRESENT, queue_list, queues_storage_pending
from .sql import Executor

logger = logging.getLogger("pgtasks")

# pg_advisory_xact_lock key: the bytes of "pgtasks" as a number, unlikely to collide.
MIGRATION_LOCK = 0x7067_7461_736B_73

_BOOTSTRAP = """\
CREATE SCHEMA IF NOT EXISTS pgtasks;
CREATE TABLE IF NOT EXISTS pgtasks.migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);"""

# The group roles (see migrations/0002_roles_and_checks.sql for what each may do).
ROLES = ("pgtasks_producer", "pgtasks_worker")
ROLES_MIGRATION = 2  # the migration that defines pgtasks.grant_roles()
STORAGE_MIGRATION = 13  # the migration that defines pgtasks.queue_storage()

CREATE_ROLES = """\
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['pgtasks_producer', 'pgtasks_worker'] LOOP
        IF to_regrole(r) IS NULL THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database's migrate created it at the same moment
            END;
        END IF;
    END LOOP;
END $$;"""

MIGRATE_HINT = "run 'python -m pgtasks migrate --app ...'"

# --- the schema's state and the roles' --------------------------------------------------

SCHEMA_PRESENT = """
SELECT to_regclass('pgmq.meta') IS NOT NULL AND to_regclass('pgtasks.migrations') IS NOT NULL
"""
SCHEMA_VERSION = "SELECT coalesce(max(version), 0) FROM pgtasks.migrations"


async def schema_version(conn: Executor) -> int | None:
    """The newest pgtasks migration applied, or None when pgmq or the pgtasks schema is
    missing."""
    if not await conn.fetchval(SCHEMA_PRESENT):
        return None
    version: int = await conn.fetchval(SCHEMA_VERSION)
    return version


ROLES_STATE = """
SELECT count(*) = cardinality($1::text[]) AS exist,
       (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) AS can_create
FROM pg_roles WHERE rolname = ANY($1::text[])
"""
# what grant_roles() gives, in one probe per side
ROLES_GRANTED = """
SELECT has_table_privilege($1::text, 'pgtasks.idempotency_keys', 'INSERT')
   AND has_function_privilege($1::text, 'pgtasks.ensure_queue(text)', 'EXECUTE')
   AND has_table_privilege($2::text, 'pgtasks.dead_letters', 'DELETE')
"""


class RolesState(NamedTuple):
    exist: bool
    can_create: bool
    granted: bool


async def roles_state(conn: Connection, roles: Sequence[str], *, granted_probe: bool) -> RolesState:
    """Whether the group roles (producer first, worker last) exist, whether the current role
    may create roles, and (only with ``granted_probe``, which needs the schema) whether they
    hold their privileges in this database."""
    row = await conn.fetchrow(ROLES_STATE, list(roles))
    assert row is not None
    granted = False
    if row["exist"] and granted_probe:
        granted = bool(await conn.fetchval(ROLES_GRANTED, roles[0], roles[-1]))
    return RolesState(bool(row["exist"]), bool(row["can_create"]), granted)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class Step:
    """One thing `migrate` would do: a description and the SQL it runs. ``alone``: in a
    transaction of its own, after the migration's has committed."""

    description: str
    sql: str
    alone: bool = False


def migrations() -> list[Migration]:
    """The migrations shipped in the package, in order."""
    found = []
    for entry in importlib.resources.files("pgtasks.db.migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def pgmq_sql_path() -> Path | None:
    """pgmq's SQL-only install script from the ``pgmq`` distribution, if installed."""
    try:
        dist = importlib.metadata.distribution("pgmq")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("pgmq/sql/pgmq.sql")))
    return path if path.is_file() else None


async def _pgmq_step(conn: Connection) -> Step | None:
    if await conn.fetchval("SELECT to_regclass('pgmq.meta') IS NOT NULL"):
        return None
    if await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq')"
    ):
        return Step("install pgmq (extension)", "CREATE EXTENSION IF NOT EXISTS pgmq;")
    path = pgmq_sql_path()
    if path is None:
        raise MigrationError(
            "pgmq is not installed in this database, the server does not offer the pgmq "
            "extension, and pgmq's SQL-only script is missing: install the extension on the "
            "server, or `pip install 'pgtasks[pgmq-sql]'` to install pgmq from SQL"
        )
    return Step(f"install pgmq (SQL-only script {path.name})", path.read_text(encoding="utf-8"))


async def _role_steps(conn: Connection, *, pending: bool, applied: bool) -> list[Step]:
    """Create the group roles if they are missing and this role may; grant them their
    privileges if they lack them. ``pending``/``applied``: the migration that defines the
    grants is about to run / has run (neither: nothing to grant with)."""
    if not (pending or applied):
        return []
    state = await roles_state(conn, ROLES, granted_probe=applied)
    steps = []
    if not state.exist:
        if not state.can_create:
            if pending:  # said once, with the migration that introduces the roles
                logger.warning(
                    "migrate: the roles %s do not exist and this role may not create them "
                    "(it lacks CREATEROLE); producers and workers then need the grants "
                    "listed in docs/migrations.md. To use the roles, have an administrator "
                    "create them (CREATE ROLE pgtasks_producer NOLOGIN; CREATE ROLE "
                    "pgtasks_worker NOLOGIN) and run migrate again",
                    " and ".join(ROLES),
                )
            return []
        steps.append(Step(f"create the roles {' and '.join(ROLES)}", CREATE_ROLES))
    if pending or not state.granted:
        steps.append(
            Step(f"grant {' and '.join(ROLES)} their privileges", "SELECT pgtasks.grant_roles();")
        )
    return steps


async def plan(conn: Connection, queues: Iterable[str] = ()) -> list[Step]:
    """What `migrate` would run on this database now, without changing anything."""
    steps: list[Step] = []
    pgmq = await _pgmq_step(conn)
    if pgmq:
        steps.append(pgmq)
    applied: set[int] = set()
    if await conn.fetchval("SELECT to_regclass('pgtasks.migrations') IS NOT NULL"):
        applied = {r[0] for r in await conn.fetch("SELECT version FROM pgtasks.migrations")}
    pending = [m for m in migrations() if m.version not in applied]
    if pending and not applied:
        steps.append(Step("create the pgtasks schema", _BOOTSTRAP))
    for m in pending:
        record = (
            "INSERT INTO pgtasks.migrations (version, name) "
            f"VALUES ({m.version}, '{m.name}');"  # both come from our own file names
        )
        steps.append(Step(f"pgtasks migration {m.version:04d} {m.name}", f"{m.sql}\n{record}"))
    steps += await _role_steps(
        conn,
        pending=any(m.version == ROLES_MIGRATION for m in pending),
        applied=ROLES_MIGRATION in applied,
    )
    existing: set[str] = set()
    if pgmq is None:
        existing = set(await queue_list(conn))
    for queue in sorted(set(queues) - existing):
        check_queue_name(queue)
        # as the owner of ensure_queue, like a queue created on demand
        steps.append(Step(f"create queue {queue}", f"SELECT pgtasks.ensure_queue('{queue}');"))
    steps += await _storage_steps(
        conn, existing, any(m.version == STORAGE_MIGRATION for m in pending)
    )
    return steps


async def _storage_steps(conn: Connection, existing: set[str], pending: bool) -> list[Step]:
    """Storage settings for the existing queues whose tables have none, each queue alone:
    with the migration that defines them ``pending``, every pgtasks queue (none has them
    yet; a table an operator tuned is skipped when the step runs)."""
    if not existing:
        return []
    if pending:
        todo = [(q, f"queue {q}") for q in sorted(existing) if QUEUE_NAME.fullmatch(q)]
    elif await conn.fetchval(QUEUE_STORAGE_PRESENT):
        todo = [(q, ", ".join(tables)) for q, tables in await queues_storage_pending(conn)]
    else:
        return []
    return [
        Step(
            f"set the storage settings of {what}",
            f"SELECT pgtasks.queue_storage('{queue}');",  # a validated name
            alone=True,
        )
        for queue, what in todo
    ]


async def check_installed(conn: Executor) -> None:
    """Raise `SchemaMissing` unless pgmq and every pgtasks migration of this version are
    installed: one or two cheap queries, for a command or a worker about to start."""
    version = await schema_version(conn)
    if version is None:
        raise SchemaMissing(f"the database has no pgtasks schema; {MIGRATE_HINT}")
    latest = migrations()[-1].version
    if version < latest:
        raise SchemaMissing(
            f"the database's pgtasks schema is out of date (migration {version}, this "
            f"pgtasks needs {latest}); {MIGRATE_HINT}"
        )


async def migrate(conn: Connection, queues: Iterable[str] = ()) -> list[Step]:
    """Install pgmq, apply pending migrations and create queues; returns what it ran."""
    queues = list(queues)
    for queue in queues:
        check_queue_name(queue)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            steps = await plan(conn, queues)
            for step in steps:
                if not step.alone:
                    await conn.execute(step.sql)
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"migration failed and was rolled back: {exc}") from exc
    for step in steps:
        if step.alone:
            try:
                await conn.execute(step.sql)  # a transaction of its own
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"the migration committed, but this step failed: {step.description}: {exc}"
                ) from exc
    return steps


def render(steps: list[Step]) -> str:
    """The steps as one SQL script (``pgtasks migrate --sql``)."""
    if not steps:
        return "-- pgtasks: nothing to do, the database is up to date\n"
    parts = ["BEGIN;", f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK});"]
    for step in steps:
        if not step.alone:
            parts.append(f"\n-- {step.description}\n{step.sql.strip()}")
    parts.append("\nCOMMIT;\n")
    for step in steps:  # each in a transaction of its own
        if step.alone:
            parts.append(f"-- {step.description}\n{step.sql.strip()}\n")
    return "\n".join(parts)
