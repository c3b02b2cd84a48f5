"""Hooks around enqueueing and around running, against a real database and worker: they see
every defer and every run, can add headers the job sees, can wrap a run and see its
exception, run in registration order, and a hook that raises fails the defer (nothing sent)
or the job (a failed attempt, retried and dead-lettered by the task's policy)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

import pgtasks
from pgtasks import EnqueueCall, EnqueueNext, ExecuteNext, JobContext, JobRef
from tests.helpers import Events


async def test_hooks_see_every_defer_and_every_run(app: pgtasks.App) -> None:
    sizes: list[int] = []
    runs: list[tuple[int, str]] = []

    @app.task(queue="hooked")
    async def work(n: int) -> None: ...

    @app.hooks.around_enqueue
    async def count(call: EnqueueCall, next: EnqueueNext) -> list[JobRef[Any]]:
        sizes.append(len(call.signatures))
        refs = await next(call)
        assert [r.task for r in refs] == [s.task.name for s in call.signatures]
        return refs

    @app.hooks.around_execute
    async def record(job: JobContext, next: ExecuteNext) -> object:
        runs.append((job.id, job.task))
        return await next(job)

    refs = [await work.defer(1), await work.delay(2), await work.apply_async((3,))]
    refs += await app.defer_many(work.s(n) for n in range(4, 8))
    await app.worker(burst=True).run()
    assert sizes == [1, 1, 1, 4]
    assert sorted(runs) == sorted((r.id, work.name) for r in refs)


async def test_headers_an_enqueue_hook_adds_reach_the_job(app: pgtasks.App) -> None:
    seen: list[dict[str, object]] = []
    seen_by_hook: list[dict[str, object]] = []

    @app.task(queue="tagged")
    async def work(n: int) -> None:
        seen.append(dict(pgtasks.current_job().headers))

    @app.hooks.around_enqueue
    async def tag(call: EnqueueCall, next: EnqueueNext) -> list[JobRef[Any]]:
        return await next(call.with_headers({"tenant": "acme"}))

    @app.hooks.around_execute
    async def look(job: JobContext, next: ExecuteNext) -> object:
        seen_by_hook.append(dict(job.headers))
        return await next(job)

    await work.options(headers={"trace": "t-1"}, idempotency_key="k-1").defer(1)
    await app.defer_many([work.s(2)])
    await app.worker(burst=True).run()
    assert sorted(seen, key=len) == [
        {"tenant": "acme"},
        {"trace": "t-1", "tenant": "acme", "idempotency_key": "k-1"},
    ]
    assert sorted(seen_by_hook, key=len) == sorted(seen, key=len)


async def test_an_execute_hook_wraps_the_run_and_sees_its_exception(app: pgtasks.App) -> None:
    caught: list[tuple[int, str]] = []

    @app.task(queue="wrapped", max_retries=1, retry_backoff=0.01)
    async def boom() -> None:
        raise ValueError("boom")

    @app.hooks.around_execute
    async def watch(job: JobContext, next: ExecuteNext) -> object:
        try:
            return await next(job)
        except ValueError as exc:
            caught.append((job.attempt, str(exc)))
            raise

    await boom.defer()
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["dead"] == 1)
    assert caught == [(1, "boom"), (2, "boom")]
    assert [e.kind for e in events.seen if e.kind != "started"] == [
        "failed",
        "retried",
        "failed",
        "dead",
    ]


async def test_hooks_run_in_the_order_they_were_registered(app: pgtasks.App) -> None:
    order: list[str] = []

    @app.task(queue="ordered")
    async def work() -> None:
        order.append("task")

    for name in ("a", "b"):

        async def around_enqueue(
            call: EnqueueCall, next: EnqueueNext, name: str = name
        ) -> list[JobRef[Any]]:
            order.append(f"enqueue {name}>")
            refs = await next(call)
            order.append(f"enqueue <{name}")
            return refs

        async def around_execute(job: JobContext, next: ExecuteNext, name: str = name) -> object:
            order.append(f"run {name}>")
            result = await next(job)
            order.append(f"run <{name}")
            return result

        app.hooks.around_enqueue(around_enqueue)
        app.hooks.around_execute(around_execute)

    await work.defer()
    await app.worker(burst=True).run()
    assert order == [
        "enqueue a>",
        "enqueue b>",
        "enqueue <b",
        "enqueue <a",
        "run a>",
        "run b>",
        "task",
        "run <b",
        "run <a",
    ]


async def test_an_enqueue_hook_that_raises_sends_nothing(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="refused")
    async def work(n: int) -> None: ...

    @app.hooks.around_enqueue
    async def refuse(call: EnqueueCall, next: EnqueueNext) -> list[JobRef[Any]]:
        raise PermissionError("no sending today")

    await app.migrate()  # the queue exists, so that it can be seen empty
    with pytest.raises(PermissionError, match="no sending today"):
        await work.defer(1)
    with pytest.raises(PermissionError, match="no sending today"):
        await app.defer_many(work.s(n) for n in range(3))
    async with conn.transaction():
        with pytest.raises(PermissionError):
            await work.options(connection=conn).defer(2)
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_refused") == 0


async def test_an_execute_hook_that_raises_fails_the_job(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    ran: list[int] = []

    @app.task(queue="guarded", max_retries=1, retry_backoff=0.01)
    async def guarded() -> None:
        ran.append(1)

    @app.hooks.around_execute
    async def refuse(job: JobContext, next: ExecuteNext) -> object:
        raise PermissionError("not today")

    ref = await guarded.defer()
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["dead"] == 1)
    assert ran == []
    assert events.counts["failed"] == 2
    assert events.counts["retried"] == 1
    assert all(isinstance(e.error, PermissionError) for e in events.of("failed"))
    reason = await conn.fetchval(
        "SELECT reason FROM pgtasks.dead_letters WHERE msg_id = $1", ref.id
    )
    assert reason == "retries exhausted after 2 attempt(s): PermissionError: not today"
    errors = await conn.fetch(
        "SELECT attempt, error_type FROM pgtasks.attempt_errors WHERE msg_id = $1 ORDER BY 1",
        ref.id,
    )
    assert [tuple(r) for r in errors] == [(1, "PermissionError"), (2, "PermissionError")]


async def test_an_execute_hook_can_hand_the_task_another_context(app: pgtasks.App) -> None:
    seen: list[object] = []

    @app.task(queue="handed")
    async def work() -> None:
        seen.append(pgtasks.current_job().headers.get("shard"))

    @app.hooks.around_execute
    async def shard(job: JobContext, next: ExecuteNext) -> object:
        return await next(job._replace(headers={**job.headers, "shard": 7}))

    await work.defer()
    await app.worker(burst=True).run()
    assert seen == [7]


async def test_an_execute_hook_runs_inside_a_transactional_job(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    await conn.execute("CREATE TABLE audit (task text NOT NULL)")

    @app.task(queue="tx_hooked", transactional=True)
    async def work() -> None: ...

    @app.hooks.around_execute
    async def audit(job: JobContext, next: ExecuteNext) -> object:
        assert job.connection is not None
        assert job.connection.is_in_transaction()
        await job.connection.execute("INSERT INTO audit VALUES ($1)", job.task)
        return await next(job)

    await work.defer()
    await app.worker(burst=True).run()
    assert await conn.fetchval("SELECT count(*) FROM audit") == 1
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_tx_hooked") == 1
