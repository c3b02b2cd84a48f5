"""Waiting for results without a look-up that cannot find anything: a job this app sent
after its waiters were listening is looked up once, when its end is heard; a job that
ended before anyone waited for it, and a listening connection that was killed, are still
found at once. The safety poll is pushed out of reach, so that none of these can pass by it.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks.client import waiters
from pgtasks.db.results import JobInfo, job_info_direct


@pytest.fixture(autouse=True)
def no_safety_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waiters, "SAFETY_POLL", 60.0)


def _count_lookups(app: pgtasks.App, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    looked: list[list[int]] = []
    info = app._jobs.info

    async def counted(queue: str, ids: Sequence[int]) -> list[JobInfo]:
        looked.append(list(ids))
        return await info(queue, ids)

    monkeypatch.setattr(app._jobs, "info", counted)
    return looked


async def test_a_new_job_is_looked_up_once_when_it_ends(
    app: pgtasks.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    @app.task(queue="once")
    async def echo(n: int) -> int:
        return n

    async with app.worker(queues=["once"], poll_interval=30):
        with anyio.fail_after(10):
            assert await (await echo.defer(1)).result() == 1  # the waiters listen from here
            looked = _count_lookups(app, monkeypatch)
            for n in (2, 3):
                ref = await echo.defer(n)
                assert await ref.result() == n
                assert looked[-1] == [ref.id]
    assert len(looked) == 2  # not also when the waits began


async def test_a_job_that_ended_before_its_waiter_came_is_found_at_once(
    app: pgtasks.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    @app.task(queue="early")
    async def echo(n: int) -> int:
        return n

    async with app.worker(queues=["early"], poll_interval=30):
        with anyio.fail_after(10):
            assert await (await echo.defer(1)).result() == 1
            ref = await echo.defer(2)
            while (await ref.status()).state != "succeeded":
                await anyio.sleep(0.01)
            await anyio.sleep(0.1)  # its end was heard while nobody waited for it
            looked = _count_lookups(app, monkeypatch)
            assert await ref.result() == 2
    assert looked == [[ref.id]]


async def test_a_waiter_whose_listening_connection_is_killed_gets_its_result(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="killed")
    async def echo(n: int) -> int:
        return n

    async with app.worker(queues=["killed"], poll_interval=30):
        with anyio.fail_after(10):
            assert await (await echo.defer(1)).result() == 1
    with anyio.fail_after(10):
        ref = await echo.defer(2)
        async with anyio.create_task_group() as tg:

            async def wait() -> None:
                assert await ref.result() == 2

            tg.start_soon(wait)
            await anyio.sleep(0.05)  # waiting, without a look-up: its end would be heard
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'pgtasks-results'"
            )
            assert killed == 1
            # the job ends while the waiters reconnect, or after: found either way
            await app.worker(queues=["killed"], burst=True).run()


async def test_the_prepared_lookup_is_planned_once_per_connection(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="planned")
    async def job() -> int:
        return 1

    ref = await job.defer()
    for _ in range(8):
        (info,) = await job_info_direct(conn, "planned", [ref.id])
        assert info.state == "waiting"
    plans = await conn.fetchrow(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
        "WHERE statement LIKE '%jsonb_array_elements_text%' "
        "AND statement NOT LIKE '%pg_prepared_statements%'"  # (this query is prepared too)
    )
    # planned for the values five times, then once for all (planning is most of its cost)
    assert plans is not None
    assert (plans["custom_plans"], plans["generic_plans"]) == (5, 3)


async def test_a_notification_looks_up_its_own_queue_only(
    app: pgtasks.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs of one queue ending do not look up the jobs awaited in another: before, every
    wake-up of the waiters looked up every queue waited for (review of issue 18)."""

    @app.task(queue="quiet_q")
    async def never() -> None: ...

    @app.task(queue="busy_q")
    async def echo(n: int) -> int:
        return n

    looked: list[str] = []
    info = app._jobs.info

    async def counted(queue: str, ids: Sequence[int]) -> list[JobInfo]:
        looked.append(queue)
        return await info(queue, ids)

    monkeypatch.setattr(app._jobs, "info", counted)
    async with app.worker(queues=["busy_q"], poll_interval=30), anyio.create_task_group() as tg:
        waiting = await never.defer()  # nobody runs it
        tg.start_soon(waiting.result)
        with anyio.fail_after(10):
            for n in range(5):
                assert await (await echo.defer(n)).result() == n
        tg.cancel_scope.cancel()
    assert looked.count("quiet_q") <= 1, looked  # its first look-up, at most
