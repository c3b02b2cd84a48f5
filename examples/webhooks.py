"""The webhooks pattern: record every attempt and its payload; retry, then dead-letter.

    python examples/webhooks.py      # the embedded server, or set PGTASKS_DSN

Webhooks are at-least-once by nature: a receiver may process a request and fail to answer,
and the sender must then send it again. Receivers deduplicate on a delivery id that stays
the same on every attempt (a ``Webhook-Id`` header), so a job that runs again (a retry, a
crash or a lost lease before the ack) does them no harm. The sender's part is to retry
sensibly and to keep an honest record:

- each attempt writes a ``webhook_attempts`` row (delivery id, job, attempt number from
  ``current_job().attempt``, URL, payload, status) through the pool, outside any job
  transaction, so it stays recorded whatever happens next;
- an error status raises, and pgtasks retries with exponential backoff and full jitter;
- a 429 with ``Retry-After`` raises ``pgtasks.Retry(delay=...)``: that delay instead of the
  backoff, still counted as an attempt;
- after ``max_retries`` retries the job moves to the dead letters, and
  ``app.dead_letters.retry(...)`` replays it once the receiver is back: a new job with
  fresh attempts and the same delivery id.

It creates the table ``webhook_attempts`` in the database it uses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import pgtasks

app = pgtasks.App()

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_attempts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id   text NOT NULL,
    job_id        bigint NOT NULL,
    attempt       integer NOT NULL,
    url           text NOT NULL,
    payload       jsonb NOT NULL,
    status        integer NOT NULL,
    attempted_at  timestamptz NOT NULL DEFAULT now()
)
"""

RECORD_ATTEMPT = """
INSERT INTO webhook_attempts (delivery_id, job_id, attempt, url, payload, status)
VALUES ($1, $2, $3, $4, $5::jsonb, $6)
"""

ALICE, BOB, CAROL = (f"https://{n}.example/hooks" for n in ("alice", "bob", "carol"))
# the customers' endpoints: each answers the statuses of its list in turn, then the last again
answers = {ALICE: [502, 502, 200], BOB: [429, 200], CAROL: [503]}


async def post(url: str, delivery_id: str, payload: dict[str, Any]) -> tuple[int, dict[str, str]]:
    """Stands in for an HTTP POST of the payload with a ``Webhook-Id: <delivery_id>`` header."""
    status = answers[url].pop(0) if len(answers[url]) > 1 else answers[url][0]
    return status, {"Retry-After": "1"} if status == 429 else {}


class ReceiverError(Exception):
    pass


@app.task(name="examples.deliver_webhook", queue="webhooks", max_retries=3, retry_backoff=0.2)
async def deliver_webhook(delivery_id: str, url: str, payload: dict[str, Any]) -> None:
    job = pgtasks.current_job()
    status, headers = await post(url, delivery_id, payload)
    attempt = (delivery_id, job.id, job.attempt, url, json.dumps(payload), status)
    await (await app.pool()).execute(RECORD_ATTEMPT, *attempt)  # commits now, whatever follows
    print(f"  {url} {delivery_id}: job {job.id} attempt {job.attempt}: {status}")
    if status == 429 and "Retry-After" in headers:
        raise pgtasks.Retry(delay=float(headers["Retry-After"]), reason=f"{url}: 429")
    if status >= 400:
        raise ReceiverError(f"{url} answered {status}")  # retried with backoff


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
        deliveries = {url: f"evt_{uuid.uuid4().hex[:8]}" for url in (ALICE, BOB, CAROL)}
        refs = [
            await deliver_webhook.defer(delivery_id, url, {"event": "invoice.paid", "id": 42})
            for url, delivery_id in deliveries.items()
        ]
        print("delivering invoice.paid to alice (502 twice), bob (429) and carol (down):")
        await run_worker_until_done(refs)

        (dead,) = [d for d in await app.dead_letters.list() if d.msg_id == refs[2].id]
        print(f"dead letter {dead.id}: {dead.attempts} attempts: {dead.reason}")
        answers[CAROL] = [200]
        print("carol's endpoint is back; replaying the dead letter:")
        await run_worker_until_done(list(await app.dead_letters.retry([dead.id])))

        rows = await pool.fetch(
            "SELECT url, array_agg(status ORDER BY id) AS statuses FROM webhook_attempts "
            "WHERE delivery_id = ANY($1::text[]) GROUP BY url ORDER BY url",
            list(deliveries.values()),
        )
        for row in rows:
            statuses = ", ".join(map(str, row["statuses"]))
            print(f"webhook_attempts: {row['url']}: {len(row['statuses'])} ({statuses})")


if __name__ == "__main__":
    asyncio.run(main())
