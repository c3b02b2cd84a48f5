"""The payments pattern: the job's idempotency key is the payment provider's key.

    python examples/payments.py      # the embedded server, or set PGTASKS_DSN

A charge happens outside the database: no transaction can undo it. The dangerous case is a
provider that charged the card but whose answer never arrived (a timeout, a crash, a lost
lease), so the job runs again. Payment APIs deduplicate requests by an idempotency key.
The job is deferred with one (``charge:<order id>``), and the task passes that same key,
``current_job().idempotency_key``, to the provider. Every run of the job (the first, a
retry, a redelivery after a crash) asks for the same charge, and the provider returns the
charge it already made instead of making another.

The key also deduplicates the enqueue: a checkout submitted twice makes one job. The task
is transactional, so "order paid" commits with the acknowledgement. A declined card raises
``pgtasks.Fail``: no retries, straight to the dead letters, which the script then inspects
with ``app.dead_letters``. It creates the table ``orders`` in the database it uses.
"""

from __future__ import annotations

import asyncio
import logging

import pgtasks

app = pgtasks.App()

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    amount     integer NOT NULL,  -- cents
    card       text NOT NULL,     -- the provider's token for the customer's card
    charge_id  text               -- set when paid
)
"""


class CardDeclined(Exception):
    pass


class FakeProvider:
    """A payment API: at most one charge per idempotency key. It loses its first answer on
    the way back, after charging the card, as a timeout would."""

    def __init__(self) -> None:
        self.charges: dict[str, str] = {}  # idempotency key -> charge id
        self.lose_next_answer = True

    async def charge(self, idempotency_key: str, amount: int, card: str) -> str:
        if idempotency_key in self.charges:
            charge_id = self.charges[idempotency_key]
            print(f"  provider: {idempotency_key} seen before: {charge_id}, no new charge")
            return charge_id
        if card == "tok_chargeDeclined":
            raise CardDeclined("card declined: insufficient funds")
        charge_id = self.charges[idempotency_key] = f"ch_{len(self.charges) + 1}"
        print(f"  provider: charged {amount / 100:.2f} for {idempotency_key} as {charge_id}")
        if self.lose_next_answer:
            self.lose_next_answer = False
            raise TimeoutError("no answer from the payment provider")
        return charge_id


provider = FakeProvider()
ORDERS = [(1250, "tok_visa"), (990, "tok_mastercard"), (4200, "tok_chargeDeclined")]


@app.task(name="examples.charge_order", queue="payments", transactional=True, retry_backoff=0.1)
async def charge_order(order_id: int) -> None:
    job = pgtasks.current_job()
    assert job.connection is not None  # transactional: the transaction that acks this job
    if job.idempotency_key is None:
        raise pgtasks.Fail("charge_order must be deferred with an idempotency key")
    order = await job.connection.fetchrow(
        "SELECT amount, card, charge_id FROM orders WHERE id = $1 FOR UPDATE", order_id
    )
    if order is None or order["charge_id"] is not None:
        return  # no such order, or already paid
    try:
        charge_id = await provider.charge(job.idempotency_key, order["amount"], order["card"])
    except CardDeclined as exc:
        raise pgtasks.Fail(f"order {order_id}: {exc}") from exc
    await job.connection.execute(
        "UPDATE orders SET charge_id = $2 WHERE id = $1", order_id, charge_id
    )


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
        order_ids = [
            await pool.fetchval(
                "INSERT INTO orders (amount, card) VALUES ($1, $2) RETURNING id", *o
            )
            for o in ORDERS
        ]
        print(f"3 orders, one charge job each, keyed charge:<order id>: {order_ids}")
        refs = [
            await charge_order.options(idempotency_key=f"charge:{i}").defer(i) for i in order_ids
        ]
        twice = await charge_order.options(idempotency_key=f"charge:{order_ids[0]}").defer(
            order_ids[0]
        )
        print(f"checkout submitted twice: deduplicated={twice.deduplicated}, job {twice.id}")

        print("running a worker until the 3 jobs are done:")
        await run_worker_until_done(refs)

        for row in await pool.fetch(
            "SELECT id, charge_id FROM orders WHERE id = ANY($1::bigint[]) ORDER BY id", order_ids
        ):
            print(f"order {row['id']}: {row['charge_id'] or 'not paid'}")
        print(f"provider: {len(provider.charges)} charges for {len(order_ids)} orders")

        (dead,) = [
            d for d in await app.dead_letters.list(queue="payments") if d.msg_id == refs[2].id
        ]
        full = await app.dead_letters.get(dead.id)
        print(
            f"dead letter {full.id}: job {full.msg_id}, {full.attempts} attempt(s): {full.reason}"
        )
        print(f"  message {full.message}, headers {full.headers}")
        for attempt in full.history:
            print(f"  attempt {attempt.attempt}: {attempt.error_type}: {attempt.message}")
        print(f"  see it from a shell: python -m pgtasks dead show {full.id}")


if __name__ == "__main__":
    asyncio.run(main())
