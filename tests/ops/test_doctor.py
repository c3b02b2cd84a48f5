"""``pgtasks doctor`` against a real database: a session really holding a snapshot open is
named with its pid and how to end it, a queue table whose dead rows vacuum cannot remove is
named with its counts, a big archive gets the advice to prune it, a queue table without
storage settings the advice to migrate, a hostile application name
stays on one line, and a healthy database gets no advice and exit status 0."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import asyncpg
import pytest

import pgtasks
from pgtasks.admin import doctor as admin_doctor


def doctor_cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgtasks", "--dsn", dsn, "doctor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def flush_stats(conn: asyncpg.Connection) -> None:
    """Make this session's table statistics visible to others now, not within a second."""
    await conn.execute("SELECT pg_stat_force_next_flush()")


async def test_a_healthy_database_has_no_advice(app: pgtasks.App, db_dsn: str) -> None:
    report = await admin_doctor.doctor(app.database)
    assert report.advice == []
    assert {"pgtasks.job_results", "pgtasks.dead_letters"} <= {t.table for t in report.tables}
    result = doctor_cli(db_dsn)
    assert result.returncode == 0, result.stderr
    assert "advice: none, all is well" in result.stdout


async def test_a_held_snapshot_and_the_dead_rows_it_keeps_are_named(
    app: pgtasks.App, conn: asyncpg.Connection, db_dsn: str
) -> None:
    hostile = "nightly report\nDROP TABLE x; \x1b[31m"
    holder = await asyncpg.connect(db_dsn, server_settings={"application_name": hostile})
    try:
        await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await holder.fetchval("SELECT count(*) FROM pgtasks.settings")  # takes the snapshot
        holder_pid = holder.get_server_pid()

        await conn.execute("SELECT pgmq.create('bloat')")
        await conn.execute("SELECT pgmq.send_batch('bloat', array_fill('{}'::jsonb, ARRAY[12000]))")
        await conn.execute("DELETE FROM pgmq.q_bloat")  # dead rows the held snapshot keeps
        await conn.execute("VACUUM pgmq.q_bloat")  # and vacuum cannot remove them
        await flush_stats(conn)
        await asyncio.sleep(1.2)

        report = await admin_doctor.doctor(app.database, horizon_seconds=1.0)
        [session] = [h for h in report.holders if h.pid == holder_pid]
        assert session.kind == "session"
        assert session.seconds is not None
        assert session.seconds >= 1.0
        assert "\n" not in session.detail
        assert "\x1b" not in session.detail
        [queue] = [t for t in report.tables if t.table == "pgmq.q_bloat"]
        assert (queue.kind, queue.queue, queue.live) == ("queue", "bloat", 0)
        assert queue.dead >= 12000
        assert any(f"pg_terminate_backend({holder_pid})" in a for a in report.advice)
        assert any(a.startswith("queue 'bloat': ") for a in report.advice)

        result = doctor_cli(db_dsn, "--horizon-age", "1s")
        assert result.returncode == 2, result.stderr
        assert f"pid {holder_pid}" in result.stdout
        assert "\x1b" not in result.stdout
        advice = result.stdout.split("advice:\n", 1)[1].splitlines()
        [line] = [line for line in advice if line.startswith("- queue 'bloat': ")]
        assert f"{queue.dead:,} dead rows against 0 live in pgmq.q_bloat" in line

        as_json = json.loads(doctor_cli(db_dsn, "--horizon-age", "1s", "--json").stdout)
        assert holder_pid in [h["pid"] for h in as_json["holders"]]
        assert len(as_json["advice"]) == len(report.advice)

        # the same snapshot, held for less than the threshold, is listed but not advised on
        relaxed = await admin_doctor.doctor(app.database, horizon_seconds=3600)
        assert holder_pid in [h.pid for h in relaxed.holders]
        assert not any("pg_terminate_backend" in a for a in relaxed.advice)
    finally:
        await holder.close()


async def test_a_big_archive_is_advised_to_be_pruned(
    app: pgtasks.App, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await conn.execute("SELECT pgtasks.ensure_queue('kept')")
    await conn.execute("SELECT pgmq.send_batch('kept', array_fill('{}'::jsonb, ARRAY[50]))")
    await conn.execute("SELECT pgmq.archive('kept', array_agg(msg_id)) FROM pgmq.q_kept")
    await flush_stats(conn)
    report = await admin_doctor.doctor(app.database)
    assert not any("archive" in a for a in report.advice)

    monkeypatch.setattr(admin_doctor, "ARCHIVE_ROWS", 40)
    report = await admin_doctor.doctor(app.database)
    [archive] = [t for t in report.tables if t.table == "pgmq.a_kept"]
    assert (archive.kind, archive.queue, archive.live) == ("archive", "kept", 50)
    [advice] = report.advice
    assert advice.startswith("the archive of queue 'kept' holds 50 messages")
    assert "--archive-older-than" in advice


async def test_a_queue_table_without_storage_settings_is_advised_to_migrate(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    await conn.execute("SELECT pgmq.create('untuned')")  # not through pgtasks
    report = await admin_doctor.doctor(app.database)
    [table] = [t for t in report.tables if t.table == "pgmq.q_untuned"]
    assert table.options == []
    [advice] = report.advice
    assert advice.startswith("pgmq.q_untuned (queue 'untuned') has no storage settings")
    assert "pgtasks migrate" in advice

    await app.migrate()
    report = await admin_doctor.doctor(app.database)
    [table] = [t for t in report.tables if t.table == "pgmq.q_untuned"]
    assert "autovacuum_vacuum_scale_factor=0.01" in table.options
    assert report.advice == []
