"""Queue creation on enqueue as a setting (``App(create_queues=...)`` and the database's
``pgtasks.settings.create_queues``), and the warning for an idempotency key reused with
other arguments. Every way a job is sent is tried: the prepared INSERT of a pooled defer,
``pgtasks.send`` (a key, the caller's connection), ``defer_many`` (direct and keyed), and
SQL producers (``pgtasks.defer``, the five-argument ``pgtasks.send``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

import pgtasks
from pgtasks import QueueNotFound

Defer = Callable[[pgtasks.App, asyncpg.Connection], Awaitable[Any]]


async def queue_exists(conn: asyncpg.Connection, queue: str) -> bool:
    return bool(await conn.fetchval("SELECT count(*) FROM pgmq.meta WHERE queue_name = $1", queue))


async def job(n: int) -> None: ...


def tasks(app: pgtasks.App) -> pgtasks.Task[[int], None]:
    """The task, registered on ``app`` (again: the same function is the same task)."""
    return app.task(queue="typo_queue", name="t.job")(job)


WAYS: dict[str, Defer] = {
    "pooled": lambda app, conn: tasks(app).defer(1),
    "pooled, with a key": lambda app, conn: tasks(app).options(idempotency_key="k").defer(1),
    "caller's connection": lambda app, conn: tasks(app).options(connection=conn).defer(1),
    "defer_many": lambda app, conn: app.defer_many([tasks(app).s(1), tasks(app).s(2)]),
    "defer_many, with a key": lambda app, conn: app.defer_many(
        [tasks(app).options(idempotency_key="k").s(1)]
    ),
    "defer_many, caller's connection": lambda app, conn: app.defer_many(
        [tasks(app).s(1)], connection=conn
    ),
}


@pytest.fixture
async def strict_app(db_dsn: str) -> AsyncIterator[pgtasks.App]:
    app = pgtasks.App(db_dsn, create_queues=False)
    try:
        yield app
    finally:
        await app.close()


@pytest.mark.parametrize("way", list(WAYS))
async def test_with_creation_off_in_the_app_a_missing_queue_is_an_error(
    way: str, strict_app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    with pytest.raises(QueueNotFound) as info:
        await WAYS[way](strict_app, conn)
    message = str(info.value)
    assert "queue 'typo_queue' does not exist and queue creation on enqueue is off" in message
    assert "(App(create_queues=False))" in message
    assert "python -m pgtasks migrate" in message
    assert not await queue_exists(conn, "typo_queue")


@pytest.mark.parametrize("way", list(WAYS))
async def test_with_creation_off_in_the_database_a_missing_queue_is_an_error(
    way: str, app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    await conn.execute("UPDATE pgtasks.settings SET create_queues = false")
    with pytest.raises(QueueNotFound, match=r"\(pgtasks\.settings\.create_queues\)"):
        await WAYS[way](app, conn)
    assert not await queue_exists(conn, "typo_queue")


@pytest.mark.parametrize("way", list(WAYS))
async def test_by_default_a_missing_queue_is_created(
    way: str, app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    await WAYS[way](app, conn)
    assert await queue_exists(conn, "typo_queue")


@pytest.mark.parametrize("way", list(WAYS))
async def test_with_creation_off_an_existing_queue_takes_jobs(
    way: str, strict_app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    await conn.execute("UPDATE pgtasks.settings SET create_queues = false")
    tasks(strict_app)
    await strict_app.migrate()  # creates the tasks' queues whatever the setting
    assert await queue_exists(conn, "typo_queue")
    await WAYS[way](strict_app, conn)
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_typo_queue") >= 1


async def test_sql_producers_follow_the_database_setting(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pgtasks.defer('made_by_sql', 'x.y')")
    assert await queue_exists(conn, "made_by_sql")
    await conn.execute("UPDATE pgtasks.settings SET create_queues = false")
    with pytest.raises(asyncpg.PostgresError) as info:
        await conn.execute("SELECT pgtasks.defer('not_there', 'x.y')")
    assert info.value.sqlstate == "PGQ01"
    assert "queue 'not_there' does not exist and queue creation on enqueue is off" in str(
        info.value
    )
    with pytest.raises(asyncpg.PostgresError, match="queue creation on enqueue is off"):
        await conn.execute("SELECT * FROM pgtasks.send('not_there', '{}'::jsonb)")
    await conn.execute("SELECT pgtasks.defer('made_by_sql', 'x.y')")  # it exists
    await conn.execute("SELECT pgtasks.ensure_queue('not_there')")  # explicit creation
    await conn.execute("SELECT pgtasks.defer('not_there', 'x.y')")


async def test_the_setting_is_one_typed_row(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval("SELECT create_queues FROM pgtasks.settings") is True
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute("INSERT INTO pgtasks.settings DEFAULT VALUES")
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO pgtasks.settings (id) VALUES (false)")


# --- an idempotency key reused with other arguments -----------------------------------------


@pytest.fixture
def warnings_(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="pgtasks")
    return caplog


def key_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "idempotency key" in r.getMessage()]


@pytest.mark.parametrize("connection", [False, True])
async def test_a_key_reused_with_other_arguments_is_deduplicated_with_a_warning(
    connection: bool,
    app: pgtasks.App,
    conn: asyncpg.Connection,
    warnings_: pytest.LogCaptureFixture,
) -> None:
    @app.task(queue="keys", name="t.charge")
    async def charge(order: int, amount: int) -> None: ...

    on = conn if connection else None
    first = await charge.options(idempotency_key="order-1", connection=on).defer(1, 100)
    same = await charge.options(idempotency_key="order-1", connection=on).defer(1, 100)
    assert same.deduplicated
    assert same.id == first.id
    assert key_warnings(warnings_) == []  # the same arguments: the key doing its job

    other = await charge.options(idempotency_key="order-1", connection=on).defer(1, 250)
    assert other.deduplicated
    assert other.id == first.id
    (warning,) = key_warnings(warnings_)
    assert f"idempotency key 'order-1' is held by job {first.id} in queue 'keys'" in warning
    assert "'t.charge'" in warning
    assert "other arguments" in warning
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_keys") == 1


async def test_a_key_held_by_a_succeeded_job_compares_with_the_archive(
    app: pgtasks.App, conn: asyncpg.Connection, warnings_: pytest.LogCaptureFixture
) -> None:
    @app.task(queue="keys", name="t.charge")
    async def charge(order: int) -> None: ...

    first = await charge.options(idempotency_key="k2").defer(1)
    async with app.worker(burst=True, poll_interval=0.1) as worker:
        await app.wait_for([first])
        del worker
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_keys") == 1
    again = await charge.options(idempotency_key="k2").defer(2)
    assert again.deduplicated
    assert again.id == first.id
    assert len(key_warnings(warnings_)) == 1


async def test_defer_many_warns_for_a_key_reused_with_other_arguments(
    app: pgtasks.App, warnings_: pytest.LogCaptureFixture
) -> None:
    @app.task(queue="keys", name="t.charge")
    async def charge(order: int) -> None: ...

    held = await charge.options(idempotency_key="a").defer(1)
    refs = await app.defer_many(
        [
            charge.options(idempotency_key="a").s(1),  # same as the holder: quiet
            charge.options(idempotency_key="a").s(9),  # other arguments than the holder
            charge.options(idempotency_key="b").s(1),
            charge.options(idempotency_key="b").s(2),  # other than an earlier item
        ]
    )
    assert [r.deduplicated for r in refs] == [True, True, False, True]
    assert refs[0].id == refs[1].id == held.id
    assert refs[3].id == refs[2].id
    messages = key_warnings(warnings_)
    assert len(messages) == 2
    assert f"key 'a' is held by job {held.id}" in messages[0]
    assert f"key 'b' is held by job {refs[2].id}" in messages[1]


async def test_sql_producers_get_a_warning_for_a_key_reused_with_other_arguments(
    conn: asyncpg.Connection,
) -> None:
    notices: list[str] = []
    conn.add_log_listener(lambda _c, message: notices.append(str(message)))
    send = "SELECT * FROM pgtasks.send('keys', $1::jsonb, '{\"idempotency_key\": \"s\"}'::jsonb)"
    first = await conn.fetchrow(send, '{"v": 1, "task": "t", "kwargs": {"a": 1}}')
    again = await conn.fetchrow(send, '{"v": 1, "task": "t", "kwargs": {"a": 1}}')
    assert first is not None
    assert again is not None
    assert again["deduplicated"]
    assert notices == []
    other = await conn.fetchrow(send, '{"v": 1, "task": "t", "kwargs": {"a": 2}}')
    assert other is not None
    assert other["msg_id"] == first["msg_id"]
    assert len(notices) == 1
    assert f"idempotency key 's' is held by job {first['msg_id']} (queue keys)" in notices[0]
