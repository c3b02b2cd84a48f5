"""Enqueueing from synchronous code: ``defer_sync`` on the app's background loop from many
threads, and on the caller's own DB-API cursor (psycopg 3, psycopg 2, a SQLAlchemy
connection) inside the caller's transaction: the job commits or rolls back with the
caller's rows."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg
import psycopg2
import pytest
import sqlalchemy

import pgtasks
from pgtasks import JobRef


@pytest.fixture
def sync_app(db_dsn: str) -> Iterator[pgtasks.App]:
    app = pgtasks.App(db_dsn)
    try:
        yield app
    finally:
        app.close_sync()


def _rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description is not None else []


def _register(app: pgtasks.App) -> pgtasks.SyncTask[..., None]:
    @app.task(queue="sync_enqueue", name="signup.welcome")
    def welcome(user_id: int, lang: str = "en") -> None: ...

    return welcome


def test_defer_sync_from_many_threads(sync_app: pgtasks.App, db_dsn: str) -> None:
    welcome = _register(sync_app)
    refs: list[JobRef[None]] = []
    lock = threading.Lock()

    def produce(base: int) -> None:
        for i in range(25):
            ref = welcome.defer_sync(base + i, lang="fr")
            with lock:
                refs.append(ref)

    threads = [threading.Thread(target=produce, args=(t * 100,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(refs) == 200
    assert len({r.id for r in refs}) == 200
    assert {r.queue for r in refs} == {"sync_enqueue"}
    stored = _rows(
        db_dsn,
        "SELECT (message->'kwargs'->>'user_id')::int, message->'kwargs'->>'lang' "
        "FROM pgmq.q_sync_enqueue",
    )
    assert sorted(n for n, _ in stored) == sorted(t * 100 + i for t in range(8) for i in range(25))
    assert {lang for _, lang in stored} == {"fr"}
    # keys deduplicate as with defer()
    first = welcome.options(idempotency_key="k1").defer_sync(1)
    again = welcome.options(idempotency_key="k1").defer_sync(2)
    assert not first.deduplicated
    assert again.deduplicated
    assert again.id == first.id
    # many at once, and the loop starts again after close_sync()
    sync_app.close_sync()
    batch = sync_app.defer_many_sync([welcome.s(i) for i in range(5)])
    assert [r.id for r in batch] == sorted(r.id for r in batch)


async def test_defer_sync_on_a_running_loop_is_refused(app: pgtasks.App) -> None:
    welcome = _register(app)
    with pytest.raises(RuntimeError, match=r"running event loop.*await task.defer"):
        welcome.defer_sync(1)
    with pytest.raises(TypeError, match=r"options\(cursor=...\) is for defer_sync\(\)"):
        await welcome.options(cursor=_FakeCursor()).defer(1)


class _FakeCursor:
    def execute(self, sql: str, params: Any) -> None: ...

    def fetchall(self) -> list[Any]:
        return []


# --- on the caller's cursor -------------------------------------------------------------------


def _psycopg3(dsn: str) -> AbstractContextManager[Any]:
    @contextmanager
    def transaction() -> Iterator[Any]:
        with psycopg.connect(dsn) as conn, conn.cursor() as cur:
            yield cur  # psycopg's connection block commits, or rolls back on an exception

    return transaction()


def _psycopg2(dsn: str) -> AbstractContextManager[Any]:
    @contextmanager
    def transaction() -> Iterator[Any]:
        conn = psycopg2.connect(dsn)
        try:
            with conn, conn.cursor() as cur:  # commits, or rolls back on an exception
                yield cur
        finally:
            conn.close()

    return transaction()


def _sqlalchemy(dsn: str) -> AbstractContextManager[Any]:
    @contextmanager
    def transaction() -> Iterator[Any]:
        engine = sqlalchemy.create_engine(dsn.replace("postgresql://", "postgresql+psycopg://"))
        try:
            with engine.begin() as conn:  # commits, or rolls back on an exception
                yield conn
        finally:
            engine.dispose()

    return transaction()


DRIVERS: dict[str, Callable[[str], AbstractContextManager[Any]]] = {
    "psycopg3": _psycopg3,
    "psycopg2": _psycopg2,
    "sqlalchemy": _sqlalchemy,
}


def _execute(cur: Any, sql: str, params: tuple[Any, ...]) -> None:
    if hasattr(cur, "exec_driver_sql"):
        cur.exec_driver_sql(sql, params)
    else:
        cur.execute(sql, params)


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_a_job_on_the_callers_cursor_commits_and_rolls_back_with_its_rows(
    sync_app: pgtasks.App, db_dsn: str, driver: str
) -> None:
    welcome = _register(sync_app)
    _rows(db_dsn, "CREATE TABLE users (id integer PRIMARY KEY)")
    with DRIVERS[driver](db_dsn) as cur:
        _execute(cur, "INSERT INTO users VALUES (%s)", (1,))
        ref = welcome.options(cursor=cur).defer_sync(1, lang="de")
        # not visible outside the transaction yet: not even the queue it created
        assert _rows(db_dsn, "SELECT to_regclass('pgmq.q_sync_enqueue') IS NULL") == [(True,)]
    assert ref.queue == "sync_enqueue"
    assert _rows(db_dsn, "SELECT msg_id, message->'kwargs'->>'lang' FROM pgmq.q_sync_enqueue") == [
        (ref.id, "de")
    ]

    class Boom(Exception):
        pass

    def fail_after_deferring() -> None:
        with DRIVERS[driver](db_dsn) as cur:
            _execute(cur, "INSERT INTO users VALUES (%s)", (2,))
            welcome.options(cursor=cur, idempotency_key="rolled-back").defer_sync(2)
            raise Boom

    with pytest.raises(Boom):
        fail_after_deferring()
    assert _rows(db_dsn, "SELECT id FROM users") == [(1,)]
    assert _rows(db_dsn, "SELECT count(*) FROM pgmq.q_sync_enqueue") == [(1,)]
    assert _rows(db_dsn, "SELECT count(*) FROM pgtasks.idempotency_keys") == [(0,)]


def test_a_batch_on_a_cursor_keeps_order_queues_delays_keys_and_headers(
    sync_app: pgtasks.App, db_dsn: str
) -> None:
    welcome = _register(sync_app)

    @sync_app.task(queue="sync_other")
    def other(n: int) -> None: ...

    sigs = [
        welcome.s(1),
        other.s(2),
        welcome.options(delay=3600).s(3),
        welcome.options(idempotency_key="dup").s(4),
        welcome.options(headers={"trace": "t-5"}).s(5),
        welcome.options(idempotency_key="dup").s(6),
    ]
    with _psycopg3(db_dsn) as cur:
        refs = sync_app.defer_many_sync(sigs, cursor=cur)
    assert [r.queue for r in refs] == ["sync_enqueue", "sync_other"] + ["sync_enqueue"] * 4
    assert [r.deduplicated for r in refs] == [False] * 5 + [True]
    assert refs[5].id == refs[3].id
    stored = dict(
        _rows(
            db_dsn,
            "SELECT msg_id, jsonb_build_array(message->'kwargs'->'user_id', "
            "vt > now() + interval '59 minutes', headers) FROM pgmq.q_sync_enqueue",
        )
    )
    assert stored[refs[0].id] == [1, False, None]
    assert stored[refs[2].id] == [3, True, None]
    assert stored[refs[3].id][2] == {"idempotency_key": "dup"}
    assert stored[refs[4].id][2] == {"trace": "t-5"}
    assert _rows(db_dsn, "SELECT message->'kwargs'->'n' FROM pgmq.q_sync_other") == [(2,)]


def test_enqueue_hooks_run_around_a_send_on_a_cursor(sync_app: pgtasks.App, db_dsn: str) -> None:
    """The hooks run on the background loop, see the caller's context variables, and the
    send comes back to the caller's thread (its cursor's own)."""
    welcome = _register(sync_app)
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    sending_threads: list[str] = []

    @sync_app.hooks.around_enqueue
    async def tag(call: pgtasks.EnqueueCall, next: pgtasks.EnqueueNext) -> list[JobRef[Any]]:
        return await next(call.with_headers({"request_id": request_id.get()}))

    class Spy:
        def __init__(self, cur: Any) -> None:
            self._cur = cur

        def execute(self, sql: str, params: Any) -> None:
            sending_threads.append(threading.current_thread().name)
            self._cur.execute(sql, params)

        def fetchall(self) -> Any:
            return self._cur.fetchall()

    request_id.set("req-42")
    with _psycopg3(db_dsn) as cur:
        ref = welcome.options(cursor=Spy(cur)).defer_sync(7)
        refs = sync_app.defer_many_sync([welcome.s(8), welcome.s(9)], cursor=Spy(cur))
    ref_without = welcome.defer_sync(10)  # the background loop's own path: the same hook
    assert sending_threads == [threading.current_thread().name] * 2
    headers = dict(_rows(db_dsn, "SELECT msg_id, headers->>'request_id' FROM pgmq.q_sync_enqueue"))
    assert {headers[r.id] for r in [ref, *refs, ref_without]} == {"req-42"}


def test_a_database_without_the_schema_says_so(empty_db_dsn: str) -> None:
    app = pgtasks.App(empty_db_dsn)
    welcome = _register(app)
    with (
        pytest.raises(pgtasks.SchemaMissing, match="python -m pgtasks migrate"),
        _psycopg3(empty_db_dsn) as cur,
    ):
        welcome.options(cursor=cur).defer_sync(1)


async def test_a_sync_task_can_defer_sync_while_the_worker_runs(app: pgtasks.App) -> None:
    """A plain def task (in a worker thread, no loop there) defers the next job with
    defer_sync: it goes through the app's background loop, whose pool is not the worker's."""
    seen: list[int] = []

    @app.task(queue="sync_chain")
    def step(n: int) -> None:
        seen.append(n)
        if n < 3:
            step.defer_sync(n + 1)

    await step.defer(1)
    try:
        async with app.worker(poll_interval=0.05):
            for _ in range(200):
                if len(seen) == 3:
                    break
                await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(app.close_sync)
    assert seen == [1, 2, 3]
