"""Arguments written by SQL producers (a trigger, ``pgtasks.defer``, ``pgtasks.send``), as a
worker receives them: numbers exact where the task's hints need them, JSON of the wrong type
dead-lettered with a reason that names the argument, numbers beyond a double not mistaken
for malformed JSON."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg

import pgtasks
from tests.helpers import Events


async def run_until(app: pgtasks.App, finished: int) -> Events:
    """Run a worker until ``finished`` jobs have succeeded or been dead-lettered."""
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] + events.counts["dead"] >= finished)
    return events


async def dead_reasons(conn: asyncpg.Connection) -> list[str]:
    return [r[0] for r in await conn.fetch("SELECT reason FROM pgtasks.dead_letters ORDER BY id")]


async def test_a_triggers_numbers_reach_the_task_exactly(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    received: list[dict[str, Any]] = []

    @app.task(name="pay.record", queue="money")
    async def record(amount: Decimal, account: int, rate: float, note: Any) -> None:
        received.append({"amount": amount, "account": account, "rate": rate, "note": note})

    await conn.execute(
        """
        CREATE TABLE payments (amount numeric, account numeric);
        CREATE FUNCTION enqueue_payment() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pgtasks.defer('money', 'pay.record', jsonb_build_object(
                'amount', NEW.amount, 'account', NEW.account, 'rate', 0.1, 'note', 2.5));
            RETURN NEW;
        END $$;
        CREATE TRIGGER payments_enqueue AFTER INSERT ON payments
            FOR EACH ROW EXECUTE FUNCTION enqueue_payment();
        INSERT INTO payments VALUES (1234567890.123456789, 98765432109876543210);
        """
    )
    events = await run_until(app, 1)
    assert events.counts["succeeded"] == 1
    [got] = received
    assert got["amount"] == Decimal("1234567890.123456789")
    assert str(got["amount"]) == "1234567890.123456789"  # not Decimal('1234567890.1234567')
    assert got["account"] == 98765432109876543210
    assert type(got["account"]) is int  # not 9.876543210987654e+19
    assert (got["rate"], got["note"]) == (0.1, 2.5)  # a float hint, and none: floats
    assert type(got["rate"]) is float
    assert type(got["note"]) is float


async def test_json_of_the_wrong_type_is_dead_lettered_naming_the_argument(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    ran: list[tuple[int, int]] = []

    @app.task(name="calc.add", queue="calc")
    async def add(a: int, b: int) -> None:
        ran.append((a, b))

    for kwargs in (
        '{"a": "1", "b": 2}',
        '{"a": 1, "b": [2]}',
        '{"a": true, "b": 2}',
        '{"a": 1.5, "b": 2}',
        '{"a": 1.0, "b": 2}',
        '{"a": 1, "b": 2}',
    ):
        await conn.execute("SELECT pgtasks.defer('calc', 'calc.add', $1::jsonb)", kwargs)
    events = await run_until(app, 6)
    assert ran == [(1, 2)]
    assert events.counts["started"] == 1
    prefix = "arguments do not fit the signature of 'calc.add': "
    assert await dead_reasons(conn) == [
        prefix + "argument 'a' must be int, got '1' (str)",
        prefix + "argument 'b' must be int, got [2] (list)",
        prefix + "argument 'a' must be int, got True (bool)",
        prefix + "argument 'a' must be int, got 1.5 (float)",
        prefix + "argument 'a' must be int, got 1.0 (a number that is not an integer)",
    ]


async def test_a_number_beyond_a_double_is_delivered_or_refused_by_its_hint(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    received: list[Any] = []

    @app.task(name="big.exact", queue="big")
    async def exact(x: Decimal, n: int) -> None:
        received.append((x, n))

    @app.task(name="big.approx", queue="big")
    async def approx(x: float) -> None:
        received.append(x)

    for task in ("big.exact", "big.approx"):
        body = f'{{"v": 1, "task": "{task}", "kwargs": {{"x": 1e400, "n": 1e400}}}}'
        if task == "big.approx":
            body = body.replace(', "n": 1e400', "")
        await conn.execute("SELECT * FROM pgtasks.send('big', $1::jsonb)", body)
    events = await run_until(app, 2)
    assert received == [(Decimal(10**400), 10**400)]  # jsonb writes 1e400 as 401 digits
    assert events.counts["dead"] == 1
    [reason] = await dead_reasons(conn)
    assert "not JSON" not in reason
    assert reason.startswith(
        "arguments do not fit the signature of 'big.approx': argument 'x': a number is out of "
        "range: 10000000000000000000...0000000000 (401 characters) is beyond what a float"
    )
