"""Workflows attacked where their parts meet: a step whose result cannot be encoded, a chord
member that dies, a running chord cancelled, a step's job cancelled on its own, a workflow
deferred in a transaction that rolls back. Each ends its workflow in a state that says what
happened, and no callback runs that should not."""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks import chain, chord, group
from tests.helpers import Events


async def test_an_unencodable_result_fails_the_workflow_where_it_is_needed(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    ran: list[str] = []

    @app.task(queue="wf_odd")
    async def value(n: int) -> object:
        return object() if n < 0 else n

    @app.task(queue="wf_odd")
    async def total(values: list[object]) -> int:
        ran.append("total")
        return len(values)

    @app.task(queue="wf_odd")
    async def after(label: str) -> str:
        ran.append(label)
        return label

    chorded = await chord([value.s(1), value.s(-1), value.s(2)], total.partial()).defer()
    grouped = await group(value.s(1), value.s(-1)).defer()
    last = await chain(after.s("first"), value.si(-1)).defer()
    skipped = await chain(value.s(-1), after.si("immutable"), value.si(3)).defer()
    async with app.worker(queues=["wf_odd"], poll_interval=0.2):
        for ref, step in ((chorded, 1), (grouped, 1), (last, 1)):
            with pytest.raises(pgtasks.WorkflowFailed) as failed:
                await ref.result(timeout=15)
            assert failed.value.step == step
            assert failed.value.error_type == "ResultNotStored"
            assert "could not be encoded" in str(failed.value)
            assert failed.value.error["outcome"] == "succeeded"  # the job itself did
        assert await skipped.result(timeout=15) == 3  # nothing needed that result
    assert sorted(ran) == ["first", "immutable"]  # the chord's callback never ran
    status = await chorded.status()
    assert (status.state, status.failed_step) == ("failed", 1)
    assert status.steps[-1].state == "pending"


async def test_a_dead_lettered_chord_member_fails_the_chord_once(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    ran: list[int] = []
    reported: list[dict[str, Any]] = []

    @app.task(queue="wf_dead", max_retries=0)
    async def member(n: int) -> int:
        ran.append(n)
        if ran.count(2) == 1 and n == 2:  # fails the first time only
            raise ValueError("member 2 broke")
        return n

    @app.task(queue="wf_dead")
    async def total(values: list[int]) -> int:
        ran.append(-1)
        return sum(values)

    @app.task(queue="wf_dead")
    async def alarm(failed: dict[str, Any], error: dict[str, Any]) -> None:
        reported.append(failed)

    ref = await chord((member.s(i) for i in range(5)), total.partial(), on_error=alarm).defer()
    async with app.worker(queues=["wf_dead"], poll_interval=0.2) as worker:
        events = Events(worker)
        with pytest.raises(pgtasks.WorkflowFailed) as failed:
            await ref.result(timeout=15)
        await events.until(lambda: events.counts["succeeded"] == 5)  # 4 members, the alarm
        assert failed.value.step == 2
        # the dead member retried by hand runs, and changes nothing for its workflow
        (letter,) = await app.dead_letters.list()
        await app.dead_letters.retry([letter.id])
        await events.until(lambda: events.counts["succeeded"] == 6)
        await anyio.sleep(0.3)
    assert sorted(ran) == [0, 1, 2, 2, 3, 4]  # the callback (-1) never ran
    assert [r["step"] for r in reported] == [2]  # the error callback ran once
    status = await ref.status()
    assert (status.state, status.failed_step) == ("failed", 2)
    assert [s.state for s in status.steps] == ["succeeded"] * 2 + ["failed"] + ["succeeded"] * 2 + [
        "pending"
    ]


async def test_cancel_a_running_chord(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    started: list[int] = []
    gate = anyio.Event()

    @app.task(queue="wf_stop")
    async def member(n: int) -> int:
        started.append(n)
        await gate.wait()
        return n

    @app.task(queue="wf_stop")
    async def total(values: list[int]) -> int:
        started.append(-1)
        return sum(values)

    ref = await chord((member.s(i) for i in range(6)), total.partial()).defer()
    async with app.worker(queues=["wf_stop"], concurrency=2, poll_interval=0.2) as worker:
        events = Events(worker)
        await events.until(lambda: len(started) == 2)
        assert await ref.cancel() == 6  # 2 asked to stop, 4 removed
        with pytest.raises(pgtasks.JobCancelled):
            await ref.result(timeout=10)
        await events.until(lambda: events.counts["cancelled"] == 2)
        gate.set()
        await anyio.sleep(0.3)
    assert len(started) == 2  # no member started after the cancel, and no callback
    status = await ref.status()
    assert status.state == "cancelled"
    assert [s.state for s in status.steps] == ["cancelled"] * 6 + ["pending"]  # none left sent
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_wf_stop") == 0


async def test_a_steps_job_cancelled_before_it_ran_cancels_its_workflow(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="wf_one")
    async def step(n: int) -> int:
        return n

    ref = await chain(step.s(1), step.partial()).defer()
    first = (await ref.status()).steps[0]
    assert first.job_id is not None
    assert await app.job(first.queue, first.job_id).cancel() == "cancelled"
    with pytest.raises(pgtasks.JobCancelled):
        await ref.result(timeout=5)  # over: it does not wait forever
    status = await ref.status()
    assert (status.state, status.failed_step) == ("cancelled", 0)
    assert status.error == {"reason": "cancelled before it ran", "outcome": "cancelled"}
    assert [s.state for s in status.steps] == ["cancelled", "pending"]


async def test_a_workflow_deferred_in_a_rolled_back_transaction_is_not_there(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    ran: list[int] = []

    @app.task(queue="wf_gone")
    async def step(n: int) -> int:
        ran.append(n)
        return n

    other = await asyncpg.connect(db_dsn)
    try:
        tx = other.transaction()
        await tx.start()
        ref = await chord((step.s(i) for i in range(3)), step.partial()).defer(connection=other)
        await tx.rollback()
    finally:
        await other.close()
    with pytest.raises(pgtasks.JobNotFound):
        await ref.result(timeout=5)  # says so at once, and does not wait forever
    with pytest.raises(pgtasks.JobNotFound):
        await ref.status()
    assert await ref.cancel() == 0
    await app.worker(queues=["wf_gone"], burst=True).run()
    assert ran == []
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.workflow_steps") == 0


async def test_a_chord_whose_results_outgrow_a_message_fails_at_its_callback(
    db_dsn: str,
) -> None:
    app = pgtasks.App(db_dsn, max_message_size=400)
    ran: list[int] = []

    @app.task(queue="wf_big")
    async def member(n: int) -> str:
        return "x" * 150

    @app.task(queue="wf_big")
    async def total(values: list[str]) -> int:
        ran.append(len(values))
        return len(values)

    try:
        ref = await chord((member.s(i) for i in range(4)), total.partial()).defer()
        async with app.worker(queues=["wf_big"], poll_interval=0.2):
            with pytest.raises(pgtasks.WorkflowFailed) as failed:
                await ref.result(timeout=15)
        status = await ref.status()
    finally:
        await app.close()
    assert failed.value.step == 4  # the callback: its message, not a member, is too large
    assert "max_message_size" in str(failed.value.error)
    assert ran == []
    assert [s.state for s in status.steps] == ["succeeded"] * 4 + ["failed"]


async def test_a_cancel_that_meets_a_members_ack_waits_instead_of_deadlocking(
    app: pgtasks.App, db_dsn: str
) -> None:
    @app.task(queue="wf_race")
    async def member(n: int) -> int:
        return n

    ref = await group(member.s(0), member.s(1)).defer()
    first = (await ref.status()).steps[0]
    acker = await asyncpg.connect(db_dsn)
    cancelled: list[int] = []
    try:
        # what a worker's acknowledgement does, in its order: the member's row, then the
        # workflow's; the cancel used to take the workflow's first, then wait for the
        # member's, and one of the two failed with a deadlock
        tx = acker.transaction()
        await tx.start()
        await acker.execute("DELETE FROM pgmq.q_wf_race WHERE msg_id = $1", first.job_id)

        async def cancel() -> None:
            cancelled.append(await ref.cancel())

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel)
            await anyio.sleep(0.3)  # the cancel waits for the member's row
            await acker.execute(
                "SELECT pgtasks.workflow_step_ended($1, 0, 'succeeded', '0', NULL)", ref.id
            )
            await tx.commit()
    finally:
        await acker.close()
    assert cancelled == [1]  # the member still waiting
    status = await ref.status()
    assert status.state == "cancelled"
    assert [s.state for s in status.steps] == ["succeeded", "cancelled"]


async def test_a_result_the_next_step_refuses_fails_the_workflow_at_that_step(
    app: pgtasks.App,
) -> None:
    ran: list[int] = []

    @app.task(queue="wf_type")
    async def word(n: int) -> str:
        return f"n{n}"

    @app.task(queue="wf_type")
    async def double(n: int) -> int:
        ran.append(n)
        return 2 * n

    # nothing checks a result against the next step's hints before it runs (to a type
    # checker, what partial() receives is Any); the worker does, when it binds the step
    ref = await chain(word.s(1), double.partial(), double.partial()).defer()
    async with app.worker(queues=["wf_type"], poll_interval=0.2):
        with pytest.raises(pgtasks.WorkflowFailed) as failed:
            await ref.result(timeout=15)
    assert failed.value.step == 1
    assert "'n'" in str(failed.value.error)  # names the argument it refused
    assert ran == []
    assert [s.state for s in (await ref.status()).steps] == ["succeeded", "failed", "pending"]
