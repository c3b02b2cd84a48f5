"""Workflows on a real worker: chains pass results on, groups gather theirs, a chord's
callback runs once with every member's result, failures and cancellations stop a workflow,
and a workflow can start inside a caller's transaction or from inside a task."""

from __future__ import annotations

import datetime as dt
from typing import Any

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks import chain, chord, group
from tests.helpers import Events


async def test_a_chain_passes_each_result_on(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    @app.task(queue="wf")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(queue="wf")
    async def when(days: int) -> dt.date:
        return dt.date(2026, 1, 1) + dt.timedelta(days=days)

    @app.task(queue="wf")
    async def weekday(day: dt.date) -> str:
        return day.strftime("%A")

    ref = await (add.s(1, 2) | add.partial(10) | when.partial() | weekday.partial()).defer()
    assert ref.kind == "chain"
    async with app.worker(poll_interval=30):
        assert await ref.result(timeout=15) == "Wednesday"  # 2026-01-14
        assert await ref.results(timeout=5) == [3, 13, dt.date(2026, 1, 14), "Wednesday"]
    status = await ref.status()
    assert (status.state, status.kind, status.step) == ("succeeded", "chain", None)
    assert [s.state for s in status.steps] == ["succeeded"] * 4
    assert all(s.job_id is not None for s in status.steps)


async def test_an_immutable_step_takes_no_result(app: pgtasks.App) -> None:
    seen: list[tuple[Any, ...]] = []

    @app.task(queue="wf_si")
    async def step(*values: int) -> int:
        seen.append(values)
        return len(values)

    ref = await chain(step.s(1), step.si(7, 8), step.partial()).defer()
    async with app.worker(poll_interval=30):
        assert await ref.result(timeout=15) == 1
    assert seen == [(1,), (7, 8), (2,)]


async def test_a_group_and_a_chord(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    calls: list[list[int]] = []

    @app.task(queue="wf_chord")
    async def square(n: int) -> int:
        await anyio.sleep(0.01 * (5 - n % 5))  # members end out of order
        return n * n

    @app.task(queue="wf_chord")
    async def total(values: list[int]) -> int:
        calls.append(values)
        return sum(values)

    g = await group(square.s(i) for i in range(10)).defer()
    c = await chord((square.s(i) for i in range(20)), total.partial()).defer()
    c2 = await (group(square.s(i) for i in range(3)) | total.partial()).defer()
    async with app.worker(concurrency=8, poll_interval=30):
        assert await g.result(timeout=20) == [i * i for i in range(10)]
        assert await c.result(timeout=20) == sum(i * i for i in range(20))
        assert await c2.result(timeout=20) == 5
        await anyio.sleep(0.3)
    assert sorted(calls) == sorted([[i * i for i in range(20)], [0, 1, 4]])  # once each


async def test_a_failed_step_stops_the_chain_and_calls_on_error(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    reported: list[tuple[dict[str, Any], dict[str, Any]]] = []
    ran: list[str] = []

    @app.task(queue="wf_fail", max_retries=0)
    async def step(name: str) -> str:
        ran.append(name)
        if name == "b":
            raise ValueError("b broke")
        return name

    @app.task(queue="wf_fail")
    async def alarm(failed: dict[str, Any], error: dict[str, Any]) -> None:
        reported.append((failed, error))

    ref = await chain(step.si("a"), step.si("b"), step.si("c"), on_error=alarm).defer()
    async with app.worker(poll_interval=0.2) as worker:
        events = Events(worker)
        with pytest.raises(pgtasks.WorkflowFailed) as failed:
            await ref.result(timeout=15)
        await events.until(lambda: len(reported) == 1)
    assert failed.value.step == 1
    assert failed.value.error_type == "ValueError"
    assert "b broke" in str(failed.value.error_message)
    assert ran == ["a", "b"]  # c never sent
    status = await ref.status()
    assert (status.state, status.step, status.failed_step) == ("failed", 1, 1)
    assert [s.state for s in status.steps] == ["succeeded", "failed", "pending"]
    info, error = reported[0]
    assert (info["workflow"], info["step"], info["task"]) == (ref.id, 1, step.name)
    assert info["id"] == status.steps[1].job_id
    assert error["type"] == "ValueError"
    assert error["outcome"] == "failed"


async def test_cancel_a_workflow(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    ran: list[str] = []
    gate = anyio.Event()

    @app.task(queue="wf_cancel")
    async def step(name: str) -> None:
        ran.append(name)
        if name == "long":
            await gate.wait()

    chained = await chain(step.si("long"), step.si("never")).defer()
    members = await group(step.si("later"), step.si("later")).defer()  # no worker yet
    assert await members.cancel() == 2
    async with app.worker(queues=["wf_cancel"], poll_interval=0.2) as worker:
        events = Events(worker)
        await events.until(lambda: ran == ["long"])
        assert await chained.cancel() == 1  # the running step is asked to stop
        with pytest.raises(pgtasks.JobCancelled):
            await chained.result(timeout=10)
        await events.until(lambda: events.counts["cancelled"] == 1)
        assert await chained.cancel() == 0  # over
    assert ran == ["long"]
    assert (await members.status()).state == "cancelled"
    assert [s.state for s in (await chained.status()).steps] == ["cancelled", "pending"]


async def test_a_workflow_deferred_in_a_transaction_and_from_a_task(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    @app.task(queue="wf_tx")
    async def double(n: int) -> int:
        return 2 * n

    @app.task(queue="wf_tx")
    async def collect(values: list[int]) -> int:
        return sum(values)

    @app.task(queue="wf_tx")
    async def fan_out(n: int) -> int:
        ref = await chord((double.s(i) for i in range(n)), collect.partial()).defer()
        return ref.id

    other = await asyncpg.connect(db_dsn)
    try:
        async with other.transaction():
            kept = await chain(double.s(1), double.partial()).defer(connection=other)
        tx = other.transaction()
        await tx.start()
        gone = await chain(double.s(1), double.partial()).defer(connection=other)
        await tx.rollback()
    finally:
        await other.close()
    parent = await fan_out.defer(4)
    async with app.worker(poll_interval=0.2):
        assert await kept.result(timeout=15) == 4
        child_id = await parent.result(timeout=15)
        child = app.workflow(child_id, "chord")
        assert await child.result(timeout=15) == 12
    with pytest.raises(pgtasks.JobNotFound):
        await gone.status()  # rolled back with the caller's transaction


async def test_workflow_steps_are_checked_when_built(app: pgtasks.App) -> None:
    @app.task(queue="wf_check")
    async def needs(a: int, b: int) -> int:
        return a + b

    with pytest.raises(TypeError, match="one argument short"):
        chain(needs.partial(1), needs.partial(1))  # the first step receives nothing
    with pytest.raises(TypeError):
        needs.s()  # type: ignore[call-arg]  # two short: not a step either
    with pytest.raises(TypeError, match="missing a required argument: 'b'"):
        needs.s(1)  # type: ignore[call-arg]  # Celery's habit: partial() is the way
    with pytest.raises(TypeError, match="one argument short"):
        await app.defer_many([needs.partial(1)])
    when = dt.datetime.now(dt.timezone.utc)
    with pytest.raises(ValueError, match="eta"):
        await chain(needs.s(1, 2), needs.options(eta=when).partial(1)).defer()
