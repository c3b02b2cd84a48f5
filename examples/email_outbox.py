"""The email pattern: record "sent" in the transaction that acknowledges the job.

    python examples/email_outbox.py      # the embedded server, or set PGTASKS_DSN

A queue delivers at least once: a retry, a worker crash, an expired lease or a second
``defer`` of the same work all run the task again. The email must still go out once. Two
guards, each covering what the other cannot:

1. An idempotency key (``welcome:<user id>``) deduplicates the enqueue. While a job holding
   the key waits, runs or has succeeded (within ``App(key_retention=...)``), deferring the
   key again sends nothing and returns that job's ref with ``deduplicated=True``.
2. A ``sent_emails`` row deduplicates the effect. The task is ``transactional=True``: it
   claims the row through ``pgtasks.current_job().connection`` before sending, and pgtasks
   acknowledges the job in that same transaction. The row and the ack commit together or
   not at all, so any later run finds the row committed (the email went out: skip) or
   absent (nothing was acknowledged either: send). A copy running at the same moment
   waits on the row's primary key until the first commits, then skips.

One window is left: a crash between the mail server accepting the email and the COMMIT.
The next run sends again. To close it too, pass ``current_job().idempotency_key`` to an
email API that deduplicates on a key. This script creates the tables ``users`` and
``sent_emails`` in the database it uses.
"""

from __future__ import annotations

import asyncio
import logging

import pgtasks

app = pgtasks.App()

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email  text NOT NULL
);
CREATE TABLE IF NOT EXISTS sent_emails (
    user_id  bigint NOT NULL REFERENCES users (id),
    kind     text NOT NULL,
    sent_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, kind)
)
"""

hangs_up_once = {"alan@example.com"}  # the mail server drops the first try for these


async def smtp_send(to: str, subject: str) -> None:
    """Stands in for the mail server: the one effect that must not happen twice."""
    if to in hangs_up_once:
        hangs_up_once.discard(to)
        raise ConnectionError(f"the mail server hung up before accepting mail to {to}")
    print(f"  SMTP: sent {subject!r} to {to}")


@app.task(name="examples.welcome_email", queue="emails", transactional=True, retry_backoff=0.1)
async def send_welcome_email(user_id: int, email: str) -> None:
    job = pgtasks.current_job()
    assert job.connection is not None  # transactional: the transaction that acks this job
    claimed = await job.connection.fetchval(
        "INSERT INTO sent_emails (user_id, kind) VALUES ($1, 'welcome') "
        "ON CONFLICT DO NOTHING RETURNING user_id",
        user_id,
    )
    if claimed is None:
        print(f"  job {job.id}: the welcome email to {email} was already sent; skipping")
        return
    await smtp_send(email, "Welcome!")  # if this raises, the row rolls back with the job


async def run_worker_until_done(refs: list[pgtasks.JobRef]) -> None:
    """Run a worker until these jobs have succeeded or moved to the dead letters."""
    async with app.worker(concurrency=4):
        await asyncio.wait_for(app.wait_for(refs), timeout=30)


async def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="  %(levelname)s %(message)s")
    async with app:
        await app.migrate()
        pool = await app.pool()
        await pool.execute(SCHEMA)
        users: dict[str, int] = {}
        for email in ("ada@example.com", "grace@example.com", "alan@example.com"):
            users[email] = await pool.fetchval(
                "INSERT INTO users (email) VALUES ($1) RETURNING id", email
            )

        print("3 sign-ups, each deferring a welcome email keyed welcome:<user id>")
        refs = [
            await send_welcome_email.options(idempotency_key=f"welcome:{uid}").defer(uid, email)
            for email, uid in users.items()
        ]
        ada = users["ada@example.com"]
        again = await send_welcome_email.options(idempotency_key=f"welcome:{ada}").defer(
            ada, "ada@example.com"
        )
        print(f"ada double-clicks: deduplicated={again.deduplicated}, job {again.id} again")
        grace = users["grace@example.com"]
        print("a backfill script defers grace's email a second time, without a key")
        refs.append(await send_welcome_email.defer(grace, "grace@example.com"))

        print(f"running a worker until the {len(refs)} jobs are done:")
        await run_worker_until_done(refs)

        rows = await pool.fetch(
            "SELECT u.email, count(s.user_id) AS n FROM users u "
            "LEFT JOIN sent_emails s ON s.user_id = u.id AND s.kind = 'welcome' "
            "WHERE u.id = ANY($1::bigint[]) GROUP BY u.email ORDER BY u.email",
            list(users.values()),
        )
        for row in rows:
            print(f"sent_emails: {row['email']}: {row['n']} welcome email(s)")


if __name__ == "__main__":
    asyncio.run(main())
