"""Least privilege, end to end, never as a superuser: a database owned and migrated by a role
without CREATEROLE, producers under a LOGIN role granted ``pgtasks_producer``, the worker CLI
and the operator commands under one granted ``pgtasks_worker``.

Roles are cluster-wide and the test server is shared by concurrent runs: the group roles may
exist already (they are created here if not, tolerating a race), and this test's own LOGIN
roles have unique names and are dropped at the end.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks.db import schema

from ..conftest import with_database

TASKS = """
import pgtasks

app = pgtasks.App()


@app.task(queue="lp_existing", max_retries=1)
async def job(kind: str) -> None:
    if kind == "retry" and pgtasks.current_job().attempt == 1:
        raise pgtasks.Retry(delay=0)
    if kind == "fail":
        raise pgtasks.Fail("refused")
"""


def as_role(dsn: str, role: str) -> str:
    """The same DSN, logging in as another role (the test server trusts its clients)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))


@dataclass(frozen=True)
class Cluster:
    owner: str
    producer: str
    worker: str
    dsn: str  # the database, as the superuser the tests run as
    project: Path

    def cli(self, role: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PGTASKS_APP", "DATABASE_URL")}
        env["PYTHONPATH"] = str(self.project)
        return subprocess.run(
            [sys.executable, "-m", "pgtasks", *args, "--dsn", as_role(self.dsn, role)],
            cwd=self.project,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            stdin=subprocess.DEVNULL,
        )


async def _run(server_dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def cluster(server_dsn: str, tmp_path: Path) -> Iterator[Cluster]:
    suffix = uuid.uuid4().hex[:10]
    owner, producer, worker = (f"pgtasks_t_{kind}_{suffix}" for kind in ("own", "prod", "work"))
    database = f"pgtasks_t_lp_{suffix}"
    (tmp_path / "lptasks.py").write_text(textwrap.dedent(TASKS))
    asyncio.run(
        _run(
            server_dsn,
            schema.CREATE_ROLES,  # the group roles, unless an earlier run left them
            f'CREATE ROLE "{owner}" LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB',
            f'CREATE ROLE "{producer}" LOGIN IN ROLE pgtasks_producer',
            f'CREATE ROLE "{worker}" LOGIN IN ROLE pgtasks_worker',
            f'CREATE DATABASE "{database}" OWNER "{owner}"',
        )
    )
    try:
        yield Cluster(owner, producer, worker, with_database(server_dsn, database), tmp_path)
    finally:
        asyncio.run(
            _run(
                server_dsn,
                f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)',
                f'DROP ROLE IF EXISTS "{owner}", "{producer}", "{worker}"',
            )
        )


async def _job_stub(kind: str) -> None:
    raise AssertionError("only deferred from the test, run by the worker subprocess")


async def test_producer_and_worker_roles_end_to_end(cluster: Cluster) -> None:
    # the owner migrates: no CREATEROLE, no superuser, and the group roles already exist
    migrated = cluster.cli(cluster.owner, "migrate", "-A", "lptasks:app")
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stderr == ""

    # a producer: with and without a key, a batch, SQL, to an existing queue and to new ones
    app = pgtasks.App(as_role(cluster.dsn, cluster.producer))
    job = app.task(queue="lp_existing", name="lptasks.job")(_job_stub)
    try:
        ok = await job.defer("ok")
        keyed = await job.options(idempotency_key="lp-1").defer("retry")
        again = await job.options(idempotency_key="lp-1").defer("retry")
        batch = await app.defer_many([job.s("ok"), job.options(queue="lp_new").s("fail")])
        new = await job.options(queue="lp_new2").defer("ok")
        pool = await app.pool()
        sql_id = await pool.fetchval(
            "SELECT pgtasks.defer('lp_sql', 'lptasks.job', '{\"kind\": \"ok\"}')"
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await pool.fetch("SELECT * FROM pgtasks.dead_letters")  # an operator's table
        # a workflow, and its step's job cancelled on its own: the workflow ends with it
        flow = await pgtasks.chain(job.si("ok"), job.si("ok")).defer()
        first = (await flow.status()).steps[0]
        assert first.job_id is not None
        assert await app.job(first.queue, first.job_id).cancel() == "cancelled"
        assert (await flow.status()).state == "cancelled"
    finally:
        await app.close()
    assert again == keyed._replace(deduplicated=True)
    assert [ref.queue for ref in batch] == ["lp_existing", "lp_new"]
    assert (ok.queue, new.queue, sql_id) == ("lp_existing", "lp_new2", 1)

    su = await asyncpg.connect(cluster.dsn)
    try:
        # queues created on demand by the producer belong to the owner, like the others
        owners = await su.fetch(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'pgmq'"
        )
        assert [r[0] for r in owners] == [cluster.owner]
        # and have pgtasks' storage settings, set as that owner when they were created
        untuned = await su.fetch(
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'pgmq' AND c.relkind = 'r' AND c.relname ~ '^[qa]_lp_' "
            "AND c.reloptions IS NULL"
        )
        assert untuned == []

        # a worker under the worker role: a success, a retry, a dead letter, in every queue
        queues = "lp_existing,lp_new,lp_new2,lp_sql"
        ran = cluster.cli(cluster.worker, "worker", "-A", "lptasks:app", "-q", queues, "--burst")
        assert ran.returncode == 0, ran.stderr
        assert "worker stopped: 5 succeeded, 2 failed attempts, 1 retried, 1 dead-lettered" in (
            ran.stderr
        )
        # the worker role writes its heartbeat, and its clean stop
        assert "heartbeat failed" not in ran.stderr
        assert (
            await su.fetchval("SELECT count(*) FROM pgtasks.workers WHERE stopped_at IS NOT NULL")
            == 1
        )
        archived = await su.fetchval(
            "SELECT (SELECT count(*) FROM pgmq.a_lp_existing) + (SELECT count(*) FROM "
            "pgmq.a_lp_new2) + (SELECT count(*) FROM pgmq.a_lp_sql)"
        )
        assert archived == 5
        dead_id = await su.fetchval("SELECT id FROM pgtasks.dead_letters WHERE queue = 'lp_new'")
        assert dead_id is not None

        # what the jobs became, as each role sees it: the worker's reads the tables with a
        # prepared statement, the producer's (no grant on pgtasks' tables) through
        # pgtasks.job_info; both get the same answers
        for role, direct in ((cluster.worker, True), (cluster.producer, False)):
            reader = pgtasks.App(as_role(cluster.dsn, role))
            reader.task(queue="lp_existing", name="lptasks.job")(_job_stub)
            try:
                assert await reader.job(ok.queue, ok.id).result(timeout=10) is None
                assert (await reader.job(new.queue, new.id).status()).state == "succeeded"
                with pytest.raises(pgtasks.JobFailed, match="refused"):
                    await reader.job(batch[1].queue, batch[1].id).result(timeout=10)
                assert (await reader.job(keyed.queue, keyed.id).status()).attempts == 2
                assert reader._jobs._direct is direct
            finally:
                await reader.close()

        # operators use the worker role: status, dead list, retry, prune
        for args in (
            ["status"],
            ["dead", "list"],
            ["dead", "show", str(dead_id)],
            ["workflow", "show", str(flow.id)],
        ):
            result = cluster.cli(cluster.worker, *args)
            assert result.returncode == 0, (args, result.stderr)
        retried = cluster.cli(cluster.worker, "dead", "retry", str(dead_id), "--json")
        assert retried.returncode == 0, retried.stderr
        assert json.loads(retried.stdout)["retried"][0]["queue"] == "lp_new"
        assert await su.fetchval("SELECT count(*) FROM pgmq.q_lp_new") == 1
        pruned = cluster.cli(cluster.worker, "prune", "--archive-older-than", "0s", "--json")
        assert pruned.returncode == 0, pruned.stderr
        assert json.loads(pruned.stdout)["archived"] == 5

        # the worker role runs schedulers and the schedules commands
        scheduling = pgtasks.App(as_role(cluster.dsn, cluster.worker))
        tick = scheduling.task(queue="lp_existing", name="lptasks.job")(_job_stub)
        scheduling.schedule(tick.s("ok"), every=dt.timedelta(seconds=1), name="lp-every")
        try:
            with anyio.move_on_after(2.5):
                await scheduling.scheduler().run()
        finally:
            await scheduling.close()
        ticked = await su.fetchval(
            "SELECT count(*) FROM pgmq.q_lp_existing WHERE headers ->> 'x-pgtasks-schedule' = "
            "'lp-every'"
        )
        assert ticked >= 1
        for args in (["schedules", "--json"], ["schedules", "pause", "lp-every"]):
            result = cluster.cli(cluster.worker, *args)
            assert result.returncode == 0, (args, result.stderr)
        triggered = cluster.cli(cluster.worker, "schedules", "trigger", "lp-every", "--json")
        assert triggered.returncode == 0, triggered.stderr
    finally:
        await su.close()

    # a producer is no operator: one line that names the privilege, no traceback
    refused = cluster.cli(cluster.producer, "dead", "purge", "--yes")
    assert refused.returncode == 1
    assert refused.stderr == (
        "pgtasks: error: dead purge failed: permission denied (permission denied for table "
        "dead_letters); grant this role the privileges pgtasks needs (see docs/migrations.md, "
        "'Roles and privileges')\n"
    )


async def test_queue_creation_setting_and_key_comparison_under_the_roles(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    migrated = cluster.cli(cluster.owner, "migrate", "-A", "lptasks:app")
    assert migrated.returncode == 0, migrated.stderr
    owner = await asyncpg.connect(as_role(cluster.dsn, cluster.owner))
    try:
        await owner.execute("UPDATE pgtasks.settings SET create_queues = false")
    finally:
        await owner.close()

    app = pgtasks.App(as_role(cluster.dsn, cluster.producer))
    job = app.task(queue="lp_existing", name="lptasks.job")(_job_stub)
    try:
        pool = await app.pool()
        # the producer reads the setting, and may not change it
        assert await pool.fetchval("SELECT create_queues FROM pgtasks.settings") is False
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await pool.execute("UPDATE pgtasks.settings SET create_queues = true")
        # a missing queue is refused, an existing one takes jobs
        with pytest.raises(pgtasks.QueueNotFound, match=r"pgtasks\.settings\.create_queues"):
            await job.options(queue="lp_typo").defer("ok")
        held = await job.options(idempotency_key="lp-k").defer("ok")
        # a key reused with other arguments: compared through the owner's function
        again = await job.options(idempotency_key="lp-k").defer("fail")
    finally:
        await app.close()
    assert again == held._replace(deduplicated=True)
    assert any("idempotency key 'lp-k' is held by job" in r.getMessage() for r in caplog.records)
