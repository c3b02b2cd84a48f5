"""Pruning finished workflows, against the real database and real workers: `prune` deletes the
workflows finished longer ago than its age, with their steps, a batch per statement, and
keeps the running ones and the recently finished; a handle on a pruned workflow says so;
and a step that ends after its workflow was pruned is acknowledged like any job."""

from __future__ import annotations

import datetime as dt

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks import Fail, JobNotFound, chain, group
from pgtasks.admin import maintenance

WEEK = dt.timedelta(days=7)


async def backdate(conn: asyncpg.Connection, ids: list[int], age: dt.timedelta) -> None:
    """Make these finished workflows look finished ``age`` ago."""
    done = await conn.execute(
        "UPDATE pgtasks.workflows SET finished_at = now() - $2::interval "
        "WHERE id = ANY($1::bigint[]) AND state <> 'running'",
        ids,
        age,
    )
    assert done == f"UPDATE {len(ids)}"  # each of them had finished


async def rows(conn: asyncpg.Connection, ids: list[int]) -> tuple[int, int]:
    """(workflows, steps) left of these ids."""
    workflows = await conn.fetchval(
        "SELECT count(*) FROM pgtasks.workflows WHERE id = ANY($1::bigint[])", ids
    )
    steps = await conn.fetchval(
        "SELECT count(*) FROM pgtasks.workflow_steps WHERE workflow_id = ANY($1::bigint[])", ids
    )
    return workflows, steps


async def test_prune_deletes_long_finished_workflows_and_keeps_the_rest(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="wfp")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(queue="wfp", max_retries=0)
    async def broken(x: int) -> int:
        raise Fail(f"no {x}")

    @app.task(queue="wfp_unserved")
    async def later(x: int) -> int:
        return x

    old_chain = await (add.s(1, 2) | add.partial(3)).defer()
    old_group = await group(add.s(1, 1), broken.s(2)).defer()  # fails
    recent = await (add.s(5, 5) | add.partial(1)).defer()
    running = await chain(add.s(1, 0), later.partial()).defer()  # its second step never runs
    async with app.worker(queues=["wfp"], poll_interval=30):
        assert await old_chain.result(timeout=15) == 6
        with pytest.raises(pgtasks.WorkflowFailed):
            await old_group.result(timeout=15)
        assert await recent.result(timeout=15) == 11
        for _ in range(200):  # the running chain's first step hands on to the unserved queue
            if (await running.status()).step == 1:
                break
            await anyio.sleep(0.05)
    assert (await running.status()).state == "running"
    ids = [old_chain.id, old_group.id, recent.id, running.id]
    await backdate(conn, [old_chain.id, old_group.id], WEEK + dt.timedelta(hours=1))
    await conn.execute(  # a running workflow started long ago is not finished
        "UPDATE pgtasks.workflows SET created_at = now() - interval '30 days' WHERE id = $1",
        running.id,
    )

    counts = await app.prune()

    assert counts["workflows"] == 2
    assert await rows(conn, [old_chain.id, old_group.id]) == (0, 0)  # their steps too
    assert await rows(conn, [recent.id, running.id]) == (2, 4)
    for gone in (old_chain, old_group):
        with pytest.raises(JobNotFound, match="pruned"):
            await gone.status()
    assert (await recent.status()).state == "succeeded"
    assert (await running.status()).state == "running"
    assert (await app.prune())["workflows"] == 0  # nothing left that old
    # with an age of zero, whatever has finished goes; the running one stays
    assert (await app.prune(workflows_older_than=dt.timedelta(0)))["workflows"] == 1
    assert await rows(conn, ids) == (1, 2)


async def test_prune_deletes_a_batch_per_statement_until_none_is_left(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="wfp_batch")
    async def one(x: int) -> int:
        return x

    refs = [await chain(one.s(i), one.si(i)).defer() for i in range(5)]
    async with app.worker(queues=["wfp_batch"], poll_interval=30):
        for ref in refs:
            await ref.result(timeout=15)
    ids = [r.id for r in refs]
    await backdate(conn, ids, 2 * WEEK)
    statements: list[str] = []
    conn.add_query_logger(lambda record: statements.append(record.query))

    deleted = await maintenance.prune_workflows(conn, WEEK, batch=2)

    assert deleted == 5
    await anyio.sleep(0.05)  # asyncpg calls query loggers soon after, not at once
    assert sum("DELETE FROM pgtasks.workflows" in q for q in statements) == 3  # 2 + 2 + 1
    assert await rows(conn, ids) == (0, 0)


async def test_a_step_that_ends_after_its_workflow_was_pruned_is_acked(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    # a group whose one member fails for good while another has not run yet: the group is
    # over, and pruned, before that member ends; its end must not fail its acknowledgement
    @app.task(queue="wfp_fail", max_retries=0)
    async def broken() -> int:
        raise Fail("for good")

    @app.task(queue="wfp_slow")
    async def slow(x: int) -> int:
        return x * 2

    ref = await group(broken.s(), slow.s(21)).defer()
    async with app.worker(queues=["wfp_fail"], poll_interval=30):
        with pytest.raises(pgtasks.WorkflowFailed):
            await ref.result(timeout=15)
    status = await ref.status()
    member = status.steps[1]
    assert (member.state, member.queue) == ("sent", "wfp_slow")
    assert member.job_id is not None
    await backdate(conn, [ref.id], 2 * WEEK)
    assert (await app.prune())["workflows"] == 1

    job = app.job("wfp_slow", member.job_id)
    async with app.worker(queues=["wfp_slow"], poll_interval=30):
        assert await job.result(timeout=15) == 42
    assert (await job.status()).state == "succeeded"
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 1  # broken's
    assert await rows(conn, [ref.id]) == (0, 0)  # and nothing came back


async def test_the_scheduled_prune_takes_the_workflows_age(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    # docs/periodic.md: schedule_prune's options are those of App.prune; a deployment that
    # keeps its workflows 30 days must be able to say so to the built-in schedule, which
    # otherwise deletes them after the default 7
    @app.task(queue="wfp_sched")
    async def one(x: int) -> int:
        return x

    refs = [await chain(one.s(i), one.si(i)).defer() for i in range(3)]
    async with app.worker(queues=["wfp_sched"], poll_interval=30):
        for ref in refs:
            await ref.result(timeout=15)
    await backdate(conn, [refs[0].id], 40 * dt.timedelta(days=1))
    await backdate(conn, [refs[1].id], 10 * dt.timedelta(days=1))  # kept at 30 days
    app.schedule_prune(
        every=dt.timedelta(seconds=1),
        workflows_older_than=dt.timedelta(days=30),
        workers_older_than=dt.timedelta(days=2),
    )
    await app.migrate()
    async with app.worker(queues=["default"], poll_interval=0.2):
        for _ in range(200):
            if await rows(conn, [refs[0].id]) == (0, 0):
                break
            await anyio.sleep(0.05)
    assert await rows(conn, [refs[0].id]) == (0, 0)
    assert await rows(conn, [refs[1].id, refs[2].id]) == (2, 4)


async def test_workflow_show_of_a_pruned_workflow_says_it_may_have_been_pruned(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    from pgtasks.admin.workflows import get_workflow

    @app.task(queue="wfp_show")
    async def one(x: int) -> int:
        return x

    ref = await chain(one.s(1), one.si(2)).defer()
    async with app.worker(queues=["wfp_show"], poll_interval=30):
        await ref.result(timeout=15)
    await backdate(conn, [ref.id], 2 * WEEK)
    assert (await app.prune())["workflows"] == 1
    with pytest.raises(JobNotFound, match="pruned"):  # as the handle says
        await get_workflow(app.database, ref.id)
