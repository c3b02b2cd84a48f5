"""``python -m pgtasks dead list|show|retry|purge`` and ``prune`` on a real database: the
round trip, unknown ids as errors, the one-line-per-letter table, ``--json``, and the
confirmation a purge of everything asks for."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import asyncpg
import pytest

import pgtasks
from pgtasks.admin.dead_letters import DeadLetter
from pgtasks.cli.output import dead_table


def cli(dsn: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("PGTASKS_APP", "DATABASE_URL")}
    environment["COLUMNS"] = "120"  # the width tables are cut to (a terminal's may be less)
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pgtasks", *args, "--dsn", dsn],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


async def insert_dead(
    conn: asyncpg.Connection,
    *,
    queue: str = "cli_dead",
    task: str | None = "t",
    message: str = "{}",
    reason: str = "old",
    age: str = "0s",
) -> int:
    dead_id: int = await conn.fetchval(
        "INSERT INTO pgtasks.dead_letters (queue, msg_id, task, message, read_ct, enqueued_at,"
        " failed_at, reason)"
        " VALUES ($1, 1, $2, $3::jsonb, 1, now(), now() - $4::text::interval, $5) RETURNING id",
        queue,
        task,
        message,
        age,
        reason,
    )
    return dead_id


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
    assert retried.stdout.splitlines() == [
        f"dead letter {dead_id} re-enqueued as job 2 in queue cli_dead",
        "pgtasks: 1 dead letter(s) retried",
    ]
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_cli_dead") == 1
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 0

    await insert_dead(conn, age="9d")
    purged = cli(db_dsn, "dead", "purge", "--older-than", "7d")
    assert purged.returncode == 0, purged.stderr
    assert "1 dead letter(s) deleted" in purged.stdout

    pruned = cli(db_dsn, "prune", "--errors-older-than", "0s")
    assert pruned.returncode == 0, pruned.stderr
    assert "error record(s)" in pruned.stdout

    bad_duration = cli(db_dsn, "dead", "purge", "--older-than", "soon")
    assert bad_duration.returncode == 2
    assert "is not a duration" in bad_duration.stderr


# --- ids that are not there ---------------------------------------------------------------


async def test_retrying_unknown_ids_is_an_error_and_retries_nothing(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    known = await insert_dead(conn)
    alone = cli(db_dsn, "dead", "retry", "12345")
    assert alone.returncode == 1
    assert alone.stdout == ""
    assert alone.stderr == "pgtasks: error: no dead letter with id 12345\n"

    mixed = cli(db_dsn, "dead", "retry", str(known), "12345", "12346")
    assert mixed.returncode == 1
    assert mixed.stderr == (
        "pgtasks: error: no dead letters with ids 12345, 12346; nothing was retried\n"
    )
    # all or nothing: the known one is still a dead letter, and nothing was enqueued
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 1
    assert await conn.fetchval("SELECT to_regclass('pgmq.q_cli_dead')") is None

    elsewhere = cli(db_dsn, "dead", "retry", str(known), "--queue", "other")
    assert elsewhere.returncode == 1
    assert elsewhere.stderr == (
        f"pgtasks: error: no dead letter with id {known} in queue 'other'\n"
    )

    shown = cli(db_dsn, "dead", "show", "12345", "--json")
    assert shown.returncode == 1
    assert shown.stdout == ""
    assert shown.stderr == "pgtasks: error: no dead letter with id 12345\n"


async def test_the_api_raises_job_not_found_for_unknown_ids(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    known = await insert_dead(conn)
    with pytest.raises(pgtasks.JobNotFound, match="no dead letter with id 777"):
        await app.dead_letters.retry([known, 777])
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 1
    [ref] = await app.dead_letters.retry([known])
    assert ref.queue == "cli_dead"


# --- dead list: one line per letter, whatever the reason --------------------------------


async def test_dead_list_is_one_line_per_letter(db_dsn: str, conn: asyncpg.Connection) -> None:
    long_reason = "failed: " + "x" * 5000
    multi = "retries exhausted after 3 attempt(s): ValueError: first line\nsecond\n\tthird"
    ids = [
        await insert_dead(conn, reason=long_reason),
        await insert_dead(conn, reason=multi, task="a.task.with.a.rather.long.name"),
        # a message that could not be decoded has no task of its own, but its body names one
        await insert_dead(
            conn,
            task=None,
            message='{"v": 1, "task": "billing.charge", "args": [], "kwargs": [1]}',
            reason="malformed message: \"kwargs\" of task 'billing.charge' is a JSON array",
        ),
        await insert_dead(conn, task=None, message="[1, 2]", reason="malformed message"),
    ]
    result = cli(db_dsn, "dead", "list", COLUMNS="160")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 + len(ids)  # the header, then one line per letter
    assert all(len(line) <= 160 for line in lines), lines
    header, *rows = lines
    reason_at = header.index("reason")
    assert header.split() == ["id", "queue", "task", "tries", "failed", "at", "(UTC)", "reason"]
    by_id = {int(row.split()[0]): row for row in rows}
    assert sorted(by_id) == sorted(ids)
    assert by_id[ids[0]][reason_at:].startswith("failed: xxx")
    assert by_id[ids[0]].endswith("...")
    assert by_id[ids[1]][reason_at:] == (
        "retries exhausted after 3 attempt(s): ValueError: first line..."
    )
    assert by_id[ids[2]].split()[2] == "billing.charge"
    assert by_id[ids[3]].split()[2] == "?"
    for row in rows:  # the columns line up
        assert row[reason_at - 2 : reason_at] == "  "

    only = cli(db_dsn, "dead", "list", "--task", "billing.charge", "--json")
    assert only.returncode == 0, only.stderr
    [letter] = json.loads(only.stdout)
    assert letter["id"] == ids[2]
    assert letter["task"] == "billing.charge"
    assert set(letter) == {
        "id", "queue", "msg_id", "task", "attempts", "enqueued_at", "failed_at", "reason"
    }  # fmt: skip


def test_dead_table_keeps_columns_for_any_width() -> None:
    import datetime as dt

    now = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    letters = [
        DeadLetter(7, "q", 1, "t" * 200, 3, now, now, "line one\nline two"),
        DeadLetter(12345, "queue_two", 2, None, 1, now, now, "\x00weird\x1b[31m text"),
    ]
    for width in (20, 80, 300):
        lines = dead_table(letters, width)
        assert len(lines) == 3
        starts = {line.index("2030-01-02 03:04:05") for line in lines[1:]}
        assert len(starts) == 1  # the time column starts at the same place on every line
        assert "\n" not in "".join(lines)
        assert all(c.isprintable() for line in lines for c in line)
    assert lines[1].endswith("line one...")
    assert " ? " in lines[2]


# --- --json --------------------------------------------------------------------------------


async def test_show_and_retry_as_json(db_dsn: str, conn: asyncpg.Connection) -> None:
    dead_id = await insert_dead(
        conn, message='{"v": 1, "task": "t", "args": [], "kwargs": {"n": 1}}', reason="boom"
    )
    shown = cli(db_dsn, "dead", "show", str(dead_id), "--json")
    assert shown.returncode == 0, shown.stderr
    letter = json.loads(shown.stdout)
    assert letter["id"] == dead_id
    assert letter["message"] == {"v": 1, "task": "t", "args": [], "kwargs": {"n": 1}}
    assert letter["history"] == []
    assert letter["reason"] == "boom"

    retried = cli(db_dsn, "dead", "retry", str(dead_id), "--json")
    assert retried.returncode == 0, retried.stderr
    [item] = json.loads(retried.stdout)["retried"]
    assert item == {
        "dead_letter": dead_id, "id": 1, "queue": "cli_dead", "task": "t", "deduplicated": False
    }  # fmt: skip

    pruned = cli(db_dsn, "prune", "--json")
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout) == {
        "keys": 0,
        "errors": 0,
        "results": 0,
        "cancel_requests": 0,
        "workers": 0,
        "workflows": 0,
        "archived": 0,
    }


# --- purge asks before deleting everything ------------------------------------------------


async def test_purge_of_everything_needs_yes_when_nobody_can_be_asked(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    await insert_dead(conn)
    refused = cli(db_dsn, "dead", "purge")  # stdin is /dev/null
    assert refused.returncode == 1
    assert refused.stderr == (
        "pgtasks: error: dead purge without --older-than deletes every dead letter: pass "
        "--yes to confirm (stdin is not a terminal, so there is no one to ask)\n"
    )
    of_queue = cli(db_dsn, "dead", "purge", "--queue", "cli_dead")
    assert of_queue.returncode == 1
    assert "deletes every dead letter of queue 'cli_dead'" in of_queue.stderr
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 1

    bounded = cli(db_dsn, "dead", "purge", "--older-than", "1d")  # no question for a bound
    assert bounded.returncode == 0, bounded.stderr
    assert bounded.stdout == "pgtasks: 0 dead letter(s) deleted\n"

    confirmed = cli(db_dsn, "dead", "purge", "--yes")
    assert confirmed.returncode == 0, confirmed.stderr
    assert confirmed.stdout == "pgtasks: 1 dead letter(s) deleted\n"
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 0


def purge_at_a_terminal(dsn: str, answer: str) -> tuple[int, str]:
    """``dead purge`` with a pseudo-terminal as stdin, answering its question."""
    controller, terminal = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("PGTASKS_APP", "DATABASE_URL")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgtasks", "dead", "purge", "--dsn", dsn],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    os.close(terminal)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        prompt = ""
        while not prompt.endswith("[y/N] ") and time.monotonic() < deadline:
            if select.select([proc.stderr], [], [], 0.1)[0]:
                prompt += os.read(proc.stderr.fileno(), 1024).decode()
        assert prompt == "delete every dead letter (2)? [y/N] ", prompt
        os.write(controller, f"{answer}\n".encode())
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out + err


async def test_purge_of_everything_asks_at_a_terminal(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    await insert_dead(conn)
    await insert_dead(conn)
    code, out = purge_at_a_terminal(db_dsn, "n")
    assert (code, out) == (1, "pgtasks: nothing deleted\n")
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 2
    code, out = purge_at_a_terminal(db_dsn, "y")
    assert (code, out) == (0, "pgtasks: 2 dead letter(s) deleted\n")
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 0
