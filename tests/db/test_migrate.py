"""Installing pgmq, the pgtasks schema, the group roles' privileges and the queues: from
nothing, again (a no-op), from two places at once, as reviewed SQL, from 0001 to now, and
failing cleanly; `check_installed`, and what migration 0002 changed (ensure_queue runs as its
owner, pgtasks.defer refuses what a worker could only dead-letter)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks import MigrationError, QueueNameError, SchemaMissing
from pgtasks.db import schema

GRANT_STEP = "grant pgtasks_producer and pgtasks_worker their privileges"
ROLES_STEP = "create the roles pgtasks_producer and pgtasks_worker"


@pytest.fixture
async def empty_conn(empty_db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(empty_db_dsn)
    try:
        yield connection
    finally:
        await connection.close()


def app_with_queues(dsn: str, *queues: str) -> pgtasks.App:
    app = pgtasks.App(dsn)
    for queue in queues:

        async def job() -> None: ...

        app.task(name=f"tests.migrate.{queue}", queue=queue)(job)
    return app


async def snapshot(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """What migrate creates, down to object ids and function bodies: any re-creation or
    change shows up as a difference."""
    queries = {
        "relations": """
            SELECT n.nspname, c.relname, c.relkind, c.oid::bigint
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname IN ('pgmq', 'pgtasks') ORDER BY 1, 2""",
        "functions": """
            SELECT n.nspname, p.proname, p.oid::bigint, md5(p.prosrc)
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname IN ('pgmq', 'pgtasks') ORDER BY 1, 2, 3""",
        "extensions": "SELECT extname, extversion FROM pg_extension ORDER BY 1",
        "migrations": "SELECT version, name, applied_at FROM pgtasks.migrations ORDER BY 1",
        "queues": "SELECT queue_name, created_at FROM pgmq.meta ORDER BY 1",
    }
    return {k: [tuple(r) for r in await conn.fetch(q)] for k, q in queries.items()}


async def is_installed(conn: asyncpg.Connection) -> tuple[bool, bool]:
    """Whether pgmq and the pgtasks schema exist."""
    row = await conn.fetchrow(
        "SELECT to_regclass('pgmq.meta') IS NOT NULL, "
        "EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgtasks')"
    )
    assert row is not None
    return row[0], row[1]


async def queue_names(conn: asyncpg.Connection) -> list[str]:
    return [r[0] for r in await conn.fetch("SELECT queue_name FROM pgmq.meta ORDER BY 1")]


# --- from nothing -------------------------------------------------------------------------


async def test_migrate_installs_pgmq_the_schema_and_the_queues(
    empty_db_dsn: str, empty_conn: asyncpg.Connection
) -> None:
    assert await is_installed(empty_conn) == (False, False)
    app = app_with_queues(empty_db_dsn, "beta", "alpha")
    try:
        steps = await app.migrate()
    finally:
        await app.close()

    descriptions = [s.description for s in steps if s.description != ROLES_STEP]
    assert descriptions[0].startswith("install pgmq")
    assert descriptions[1] == "create the pgtasks schema"
    assert descriptions[2:-3] == [
        f"pgtasks migration {m.version:04d} {m.name}" for m in schema.migrations()
    ]
    assert descriptions[-3:] == [GRANT_STEP, "create queue alpha", "create queue beta"]

    assert await is_installed(empty_conn) == (True, True)
    assert await queue_names(empty_conn) == ["alpha", "beta"]
    applied = await empty_conn.fetch("SELECT version, name FROM pgtasks.migrations ORDER BY 1")
    assert [(r[0], r[1]) for r in applied] == [(m.version, m.name) for m in schema.migrations()]
    for table in ("pgtasks.idempotency_keys", "pgtasks.dead_letters", "pgmq.q_alpha"):
        assert await empty_conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table), table
    # the enqueue function works on the fresh install
    row = await empty_conn.fetchrow("SELECT * FROM pgtasks.send('alpha', '{\"v\": 1}'::jsonb)")
    assert row is not None
    assert tuple(row) == (1, False, "alpha")


async def test_second_migrate_does_nothing(
    empty_db_dsn: str, empty_conn: asyncpg.Connection
) -> None:
    app = app_with_queues(empty_db_dsn, "alpha")
    try:
        assert await app.migrate() != []
        before = await snapshot(empty_conn)
        assert await app.migration_plan() == []
        assert await app.migrate() == []
        after = await snapshot(empty_conn)
    finally:
        await app.close()
    assert after == before
    assert len(before["migrations"]) == len(schema.migrations())


async def test_migrate_adds_only_the_new_queues(
    empty_db_dsn: str, empty_conn: asyncpg.Connection
) -> None:
    app = app_with_queues(empty_db_dsn, "alpha")
    try:
        await app.migrate()
        created_at = await empty_conn.fetchval(
            "SELECT created_at FROM pgmq.meta WHERE queue_name = 'alpha'"
        )

        @app.task(queue="gamma")
        async def later() -> None: ...

        steps = await app.migrate()
    finally:
        await app.close()
    assert [s.description for s in steps] == ["create queue gamma"]
    assert await queue_names(empty_conn) == ["alpha", "gamma"]
    assert (
        await empty_conn.fetchval("SELECT created_at FROM pgmq.meta WHERE queue_name = 'alpha'")
        == created_at
    )


async def test_migrate_on_an_already_migrated_database_only_creates_queues(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    before = await snapshot(conn)
    app = app_with_queues(db_dsn, "late")
    try:
        steps = await app.migrate()
    finally:
        await app.close()
    assert [s.description for s in steps] == ["create queue late"]
    after = await snapshot(conn)
    assert after["migrations"] == before["migrations"]
    assert after["queues"][-1][0] == "late"


# --- at the same time ---------------------------------------------------------------------


async def test_two_concurrent_migrations_both_succeed(
    empty_db_dsn: str, empty_conn: asyncpg.Connection
) -> None:
    apps = [app_with_queues(empty_db_dsn, "alpha", "beta") for _ in range(2)]
    try:
        results = await asyncio.wait_for(asyncio.gather(*(a.migrate() for a in apps)), 60)
    finally:
        for a in apps:
            await a.close()
    # the second waited on the advisory lock, then found nothing left to do
    done, nothing = sorted(results, key=len, reverse=True)
    assert nothing == []
    assert [s.description for s in done][-3:] == [
        GRANT_STEP,
        "create queue alpha",
        "create queue beta",
    ]
    assert await queue_names(empty_conn) == ["alpha", "beta"]
    assert await empty_conn.fetchval("SELECT count(*) FROM pgtasks.migrations") == len(
        schema.migrations()
    )


async def test_concurrent_migrations_with_different_queues_get_all_of_them(
    empty_db_dsn: str, empty_conn: asyncpg.Connection
) -> None:
    apps = [app_with_queues(empty_db_dsn, f"q{i}", "shared") for i in range(4)]
    try:
        await asyncio.wait_for(asyncio.gather(*(a.migrate() for a in apps)), 60)
    finally:
        for a in apps:
            await a.close()
    assert await queue_names(empty_conn) == ["q0", "q1", "q2", "q3", "shared"]


def cli_env() -> dict[str, str]:
    drop = ("PGTASKS_DSN", "DATABASE_URL", "PGTASKS_APP")
    return {k: v for k, v in os.environ.items() if k not in drop}


async def test_two_migrate_processes_at_once_both_succeed(
    empty_db_dsn: str, empty_conn: asyncpg.Connection
) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "pgtasks", "migrate", "--dsn", empty_db_dsn),
            env=cli_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    with anyio.fail_after(60):
        results = await asyncio.gather(*(p.communicate() for p in procs))
    outputs = []
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()
        assert err == b""
        outputs.append(out.decode().strip())
    applied, up_to_date = sorted(outputs)
    assert applied.startswith("pgtasks: ")
    assert applied.endswith(" step(s) applied")
    assert up_to_date == "pgtasks: up to date"
    assert await is_installed(empty_conn) == (True, True)
    assert await empty_conn.fetchval("SELECT count(*) FROM pgtasks.migrations") == len(
        schema.migrations()
    )


# --- plan and render ----------------------------------------------------------------------


async def test_plan_changes_nothing_and_render_is_a_runnable_script(
    empty_conn: asyncpg.Connection,
) -> None:
    steps = await schema.plan(empty_conn, ["alpha"])
    assert await is_installed(empty_conn) == (False, False)
    assert steps[-1] == schema.Step("create queue alpha", "SELECT pgtasks.ensure_queue('alpha');")

    script = schema.render(steps)
    assert script.startswith(f"BEGIN;\nSELECT pg_advisory_xact_lock({schema.MIGRATION_LOCK});")
    assert script.endswith("COMMIT;\n")
    for step in steps:
        assert f"-- {step.description}\n" in script

    await empty_conn.execute(script)  # what a DBA would do with `pgtasks migrate --sql`
    assert await is_installed(empty_conn) == (True, True)
    assert await queue_names(empty_conn) == ["alpha"]
    assert await schema.plan(empty_conn, ["alpha"]) == []
    assert await schema.migrate(empty_conn, ["alpha"]) == []


def test_render_of_nothing_says_up_to_date() -> None:
    assert schema.render([]) == "-- pgtasks: nothing to do, the database is up to date\n"


def test_migrations_are_numbered_in_order_from_one() -> None:
    # numbered 1, 2, 3, ... with no gap: a branch renumbers its migration when it lands
    versions = [m.version for m in schema.migrations()]
    assert versions == list(range(1, len(versions) + 1))
    assert all(m.sql.strip() for m in schema.migrations())


# --- failures -----------------------------------------------------------------------------


async def test_missing_pgmq_gives_a_clear_migration_error(
    empty_conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    if await empty_conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq')"
    ):
        pytest.skip("this server offers the pgmq extension, so pgmq is never missing")
    monkeypatch.setattr(schema, "pgmq_sql_path", lambda: None)
    with pytest.raises(MigrationError) as info:
        await schema.migrate(empty_conn, ["alpha"])
    message = str(info.value)
    assert "pgmq is not installed in this database" in message
    assert "pip install 'pgtasks[pgmq-sql]'" in message
    assert await is_installed(empty_conn) == (False, False)


async def test_a_failing_step_rolls_back_everything(empty_conn: asyncpg.Connection) -> None:
    await empty_conn.execute(
        "CREATE SCHEMA pgtasks; CREATE TABLE pgtasks.idempotency_keys (squatter int)"
    )
    with pytest.raises(MigrationError) as info:
        await schema.migrate(empty_conn, ["alpha"])
    assert "migration failed and was rolled back" in str(info.value)
    assert "idempotency_keys" in str(info.value)
    # pgmq, installed by an earlier step of the same migration, is gone again
    assert await is_installed(empty_conn) == (False, True)
    assert await empty_conn.fetchval("SELECT to_regclass('pgtasks.migrations')") is None


async def test_a_bad_queue_name_is_refused_before_anything_runs(
    empty_conn: asyncpg.Connection,
) -> None:
    with pytest.raises(QueueNameError):
        await schema.migrate(empty_conn, ["fine", "Not-Fine"])
    assert await is_installed(empty_conn) == (False, False)


# --- check_installed ------------------------------------------------------------------------


async def test_check_installed(empty_conn: asyncpg.Connection) -> None:
    with pytest.raises(SchemaMissing) as info:
        await schema.check_installed(empty_conn)
    assert str(info.value) == (
        "the database has no pgtasks schema; run 'python -m pgtasks migrate --app ...'"
    )
    await empty_conn.execute(schema.pgmq_sql_path().read_text())  # type: ignore[union-attr]
    with pytest.raises(SchemaMissing, match="no pgtasks schema"):
        await schema.check_installed(empty_conn)  # pgmq alone is not enough

    await schema.migrate(empty_conn)
    await schema.check_installed(empty_conn)

    *_, previous, latest = (m.version for m in schema.migrations())
    await empty_conn.execute("DELETE FROM pgtasks.migrations WHERE version = $1", latest)
    with pytest.raises(SchemaMissing) as info:
        await schema.check_installed(empty_conn)
    assert str(info.value) == (
        f"the database's pgtasks schema is out of date (migration {previous}, this pgtasks "
        f"needs {latest}); run 'python -m pgtasks migrate --app ...'"
    )


# --- from 0001 to now -----------------------------------------------------------------------


async def test_a_database_migrated_with_0001_gets_the_rest(
    empty_conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = schema.migrations()[:1]
    monkeypatch.setattr(schema, "migrations", lambda: first)
    await schema.migrate(empty_conn, ["old"])  # what 0.1.0 before 0002 did
    monkeypatch.undo()
    assert await empty_conn.fetchval("SELECT pgtasks.defer('old', '', '{}')") == 1  # accepted

    steps = await schema.migrate(empty_conn, ["old"])
    names = [s.description for s in steps if s.description != ROLES_STEP]
    later = [f"pgtasks migration {m.version:04d} {m.name}" for m in schema.migrations()[1:]]
    # the storage settings of the queue that exists: after the migrations commit (0013)
    assert names == [*later, GRANT_STEP, "set the storage settings of queue old"]
    await schema.check_installed(empty_conn)
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await empty_conn.execute("SELECT pgtasks.defer('old', '', '{}')")
    for role, privilege in (("pgtasks_producer", "INSERT"), ("pgtasks_worker", "DELETE")):
        assert await empty_conn.fetchval(
            "SELECT has_table_privilege($1::text, 'pgmq.q_old', $2::text)", role, privilege
        )
    assert await schema.plan(empty_conn, ["old"]) == []


# --- what 0002 changed ----------------------------------------------------------------------


async def test_ensure_queue_runs_as_its_owner_with_a_fixed_search_path(
    conn: asyncpg.Connection,
) -> None:
    row = await conn.fetchrow(
        "SELECT prosecdef, proconfig, has_function_privilege('public', p.oid, 'EXECUTE') "
        "FROM pg_proc p WHERE p.oid = 'pgtasks.ensure_queue(text)'::regprocedure"
    )
    assert row is not None
    assert row[0] is True
    assert row[1] == ["search_path=pg_catalog, pg_temp"]
    assert row[2] is False  # SECURITY DEFINER: not for PUBLIC, only the granted roles


@pytest.mark.parametrize(
    ("task", "kwargs", "message"),
    [
        ("''", "'{}'", "pgtasks.defer: the task name is empty"),
        ("NULL", "'{}'", "pgtasks.defer: the task name is empty"),
        ("'  '", "'{}'", "pgtasks.defer: the task name is empty"),
        (
            "'t.x'",
            "'[1, 2]'",
            "pgtasks.defer: kwargs of task 't.x' must be a JSON object of named arguments, "
            "not a JSON array",
        ),
        ("'t.x'", "'\"a\"'", "not a JSON string"),
        ("'t.x'", "'null'", "not a JSON null"),
    ],
)
async def test_sql_defer_refuses_what_a_worker_could_only_dead_letter(
    conn: asyncpg.Connection, task: str, kwargs: str, message: str
) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError) as info:
        await conn.fetchval(f"SELECT pgtasks.defer('sqlq', {task}, {kwargs}::jsonb)")
    assert message in str(info.value)
    assert await conn.fetchval("SELECT to_regclass('pgmq.q_sqlq')") is None  # nothing sent


async def test_sql_defer_still_enqueues_a_good_call(conn: asyncpg.Connection) -> None:
    first = await conn.fetchval("SELECT pgtasks.defer('sqlq', 't.x', '{\"n\": 1}')")
    second = await conn.fetchval("SELECT pgtasks.defer('sqlq', 't.x', NULL, 60)")
    bodies = await conn.fetch(
        "SELECT message::text, vt > clock_timestamp() AS later FROM pgmq.q_sqlq ORDER BY msg_id"
    )
    assert (first, second) == (1, 2)
    assert [(r[0], r[1]) for r in bodies] == [
        ('{"v": 1, "args": [], "task": "t.x", "kwargs": {"n": 1}}', False),
        ('{"v": 1, "args": [], "task": "t.x", "kwargs": {}}', True),
    ]
