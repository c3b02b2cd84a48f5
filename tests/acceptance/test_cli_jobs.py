"""``python -m pgtasks job show|list`` and ``cancel`` on a real database, run as a user would."""

from __future__ import annotations

import json

import asyncpg

import pgtasks
from tests.acceptance.test_cli_dead import cli


async def test_job_show_list_and_cancel(db_dsn: str, conn: asyncpg.Connection) -> None:
    app = pgtasks.App(db_dsn)

    @app.task(queue="cli_jobs", max_retries=0)
    async def job(n: int) -> int:
        if n == 2:
            raise ValueError("two is\nbad")
        return n * 10

    try:
        done = await job.defer(1)
        failed = await job.defer(2)
        await app.worker(burst=True).run()
        later = await job.options(delay=3600).defer(3)
        waiting = await job.defer(4)
    finally:
        await app.close()

    shown = cli(db_dsn, "job", "show", "cli_jobs", str(done.id), "--json")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    summary = detail["summary"]
    assert (summary["state"], detail["result"], detail["body"]["kwargs"]) == (
        "succeeded",
        10,
        {"n": 1},
    )
    text = cli(db_dsn, "job", "show", "cli_jobs", str(failed.id))
    assert text.returncode == 0, text.stderr
    assert f"job {failed.id} in queue cli_jobs: failed" in text.stdout
    assert "attempt 1 on " in text.stdout
    assert "ValueError: two is...\n" in text.stdout  # one line, whatever the task said

    listed = cli(db_dsn, "job", "list", "--queue", "cli_jobs", "--json")
    states = {j["id"]: j["state"] for j in json.loads(listed.stdout)["jobs"]}
    assert states == {
        done.id: "succeeded",
        failed.id: "failed",
        later.id: "scheduled",
        waiting.id: "waiting",
    }
    only = cli(db_dsn, "job", "list", "--queue", "cli_jobs", "--state", "scheduled")
    assert only.returncode == 0, only.stderr
    assert [line.split()[0] for line in only.stdout.splitlines()[1:]] == [str(later.id)]

    cancelled = cli(db_dsn, "cancel", "cli_jobs", str(later.id), str(done.id), "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["cancel"] == [
        {"id": later.id, "outcome": "cancelled"},
        {"id": done.id, "outcome": "finished"},
    ]
    unknown = cli(db_dsn, "cancel", "cli_jobs", "999")
    assert unknown.returncode == 1
    assert "no such job" in unknown.stdout
    missing = cli(db_dsn, "job", "show", "cli_jobs", "999")
    assert missing.returncode == 1
    assert missing.stderr.startswith("pgtasks: error: no job 999 in queue 'cli_jobs'")
    assert (
        await conn.fetchval("SELECT state FROM pgtasks.job_results WHERE msg_id = $1", later.id)
        == "cancelled"
    )
