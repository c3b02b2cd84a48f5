"""The failure-pattern examples (email, payments, webhooks) run as scripts against a fresh
database, print what they promise, and leave exactly the effects they promise."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
import asyncpg

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def _run(example: str, dsn: str, cwd: Path) -> str:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PGTASKS_DSN", "DATABASE_URL", "PGTASKS_APP", "PGTASKS_DATA_DIR")
    }
    env["PGTASKS_DSN"] = dsn
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [sys.executable, str(EXAMPLES / example)], cwd=cwd, env=env, check=False
        )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, out + err
    return out


async def test_email_outbox_sends_each_email_once(
    db_dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    out = await _run("email_outbox.py", db_dsn, tmp_path)
    assert "ada double-clicks: deduplicated=True" in out
    for email in ("ada@example.com", "grace@example.com", "alan@example.com"):
        assert out.count(f"SMTP: sent 'Welcome!' to {email}") == 1, out
        assert f"sent_emails: {email}: 1 welcome email(s)" in out
    # grace's second job (deferred without a key) found the row and skipped
    assert out.count("grace@example.com was already sent; skipping") == 1, out

    rows = await conn.fetch(
        "SELECT u.email, count(s.user_id) AS n FROM users u "
        "LEFT JOIN sent_emails s ON s.user_id = u.id GROUP BY u.email"
    )
    assert {r["email"]: r["n"] for r in rows} == {
        "ada@example.com": 1,
        "grace@example.com": 1,
        "alan@example.com": 1,
    }
    # alan's first attempt failed after claiming the row: it rolled back, and was retried
    errors = await conn.fetch("SELECT attempt, error_type FROM pgtasks.attempt_errors")
    assert [(r["attempt"], r["error_type"]) for r in errors] == [(1, "ConnectionError")]
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_emails") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_emails") == 4
    keys = await conn.fetch("SELECT key, expires_at FROM pgtasks.idempotency_keys")
    assert len(keys) == 3
    assert all(k["key"].startswith("welcome:") and k["expires_at"] for k in keys)


async def test_payments_charge_each_order_once_and_dead_letter_the_declined_card(
    db_dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    out = await _run("payments.py", db_dsn, tmp_path)
    assert "checkout submitted twice: deduplicated=True" in out
    assert out.count("provider: charged") == 2, out
    assert out.count("seen before") == 1, out  # the retry after the lost answer
    assert "provider: 2 charges for 3 orders" in out
    assert "card declined: insufficient funds" in out

    orders = await conn.fetch("SELECT id, card, charge_id FROM orders ORDER BY id")
    paid = [r["charge_id"] for r in orders if r["card"] != "tok_chargeDeclined"]
    assert sorted(paid) == ["ch_1", "ch_2"]
    declined = [r for r in orders if r["card"] == "tok_chargeDeclined"]
    assert [r["charge_id"] for r in declined] == [None]

    (dead,) = await conn.fetch(
        "SELECT task, read_ct, reason, headers::text AS headers, error::text AS error "
        "FROM pgtasks.dead_letters"
    )
    assert dead["task"] == "examples.charge_order"
    assert dead["read_ct"] == 1  # Fail: no retries
    assert dead["reason"] == f"failed: order {declined[0]['id']}: card declined: insufficient funds"
    assert json.loads(dead["headers"]) == {"idempotency_key": f"charge:{declined[0]['id']}"}
    assert json.loads(dead["error"])["type"] == "Fail"

    errors = await conn.fetch("SELECT error_type FROM pgtasks.attempt_errors ORDER BY id")
    assert sorted(r["error_type"] for r in errors) == ["Fail", "TimeoutError"]
    keys = await conn.fetch("SELECT key, expires_at FROM pgtasks.idempotency_keys ORDER BY key")
    # the paid orders' keys keep deduplicating; the dead letter released its key
    assert [k["key"] for k in keys] == sorted(
        f"charge:{r['id']}" for r in orders if r["charge_id"] is not None
    )
    assert all(k["expires_at"] is not None for k in keys)


async def test_webhooks_record_every_attempt_and_replay_the_dead_letter(
    db_dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    out = await _run("webhooks.py", db_dsn, tmp_path)
    assert "4 attempts: retries exhausted after 4 attempt(s): ReceiverError" in out
    assert "webhook_attempts: https://carol.example/hooks: 5 (503, 503, 503, 503, 200)" in out

    rows = await conn.fetch(
        "SELECT url, delivery_id, job_id, attempt, status, payload::text AS payload "
        "FROM webhook_attempts ORDER BY id"
    )
    assert len(rows) == 3 + 2 + 5
    assert all(json.loads(r["payload"]) == {"event": "invoice.paid", "id": 42} for r in rows)

    def of(name: str) -> list[asyncpg.Record]:
        return [r for r in rows if r["url"] == f"https://{name}.example/hooks"]

    assert [r["status"] for r in of("alice")] == [502, 502, 200]
    assert [r["attempt"] for r in of("alice")] == [1, 2, 3]
    assert [r["status"] for r in of("bob")] == [429, 200]
    carol = of("carol")
    assert [r["status"] for r in carol] == [503, 503, 503, 503, 200]
    assert [r["attempt"] for r in carol] == [1, 2, 3, 4, 1]  # the replay is a new job
    assert len({r["job_id"] for r in carol}) == 2
    assert len({r["delivery_id"] for r in carol}) == 1  # same delivery id after the replay

    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 0
    errors = await conn.fetch(
        "SELECT error_type, count(*) AS n FROM pgtasks.attempt_errors GROUP BY 1 ORDER BY 1"
    )
    assert {r["error_type"]: r["n"] for r in errors} == {"ReceiverError": 6, "Retry": 1}
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_webhooks") == 0
