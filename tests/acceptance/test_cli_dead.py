"""``python -m pgtasks dead list|show|retry|purge`` and ``prune`` on a real database."""

from __future__ import annotations

import os
import subprocess
import sys

import asyncpg

import pgtasks


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PGTASKS_APP", "DATABASE_URL")}
    return subprocess.run(
        [sys.executable, "-m", "pgtasks", *args, "--dsn", dsn],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_dead_letter_cli_round_trip(db_dsn: str, conn: asyncpg.Connection) -> None:
    app = pgtasks.App(db_dsn)

    @app.task(queue="cli_dead", name="billing.charge", max_retries=0)
    async def charge(order: int) -> None:
        raise pgtasks.Fail(f"card declined for order {order}")

    try:
        await charge.defer(order=5)
        await app.worker(burst=True).run()
    finally:
        await app.close()
    dead_id = await conn.fetchval("SELECT id FROM pgtasks.dead_letters")

    listed = cli(db_dsn, "dead", "list", "--queue", "cli_dead")
    assert listed.returncode == 0, listed.stderr
    assert "billing.charge" in listed.stdout
    assert "failed: card declined for order 5" in listed.stdout

    shown = cli(db_dsn, "dead", "show", str(dead_id))
    assert shown.returncode == 0, shown.stderr
    assert '"kwargs":{"order":5}' in shown.stdout
    assert "attempt 1 on " in shown.stdout
    assert "Fail: card declined for order 5" in shown.stdout

    missing = cli(db_dsn, "dead", "show", "999999")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "pgtasks: error: no dead letter with id 999999"

    bad = cli(db_dsn, "dead", "retry")
    assert bad.returncode == 1
    assert "give dead letter ids, or --all" in bad.stderr

    retried = cli(db_dsn, "dead", "retry", str(dead_id))
    assert retried.returncode == 0, retried.stderr
    assert "1 dead letter(s) retried" in retried.stdout
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_cli_dead") == 1
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 0

    await conn.execute(
        "INSERT INTO pgtasks.dead_letters (queue, msg_id, task, message, read_ct, enqueued_at,"
        " failed_at, reason) VALUES ('cli_dead', 1, 't', '{}', 1, now(), now() - interval '9d',"
        " 'old')"
    )
    purged = cli(db_dsn, "dead", "purge", "--older-than", "7d")
    assert purged.returncode == 0, purged.stderr
    assert "1 dead letter(s) deleted" in purged.stdout

    pruned = cli(db_dsn, "prune", "--errors-older-than", "0s")
    assert pruned.returncode == 0, pruned.stderr
    assert "error record(s)" in pruned.stdout

    bad_duration = cli(db_dsn, "dead", "purge", "--older-than", "soon")
    assert bad_duration.returncode == 2
    assert "is not a duration" in bad_duration.stderr
