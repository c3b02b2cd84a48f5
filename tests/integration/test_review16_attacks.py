"""Attacks on plain ``def`` tasks and ``defer_sync`` (the review of issue 16): what a task
can raise or return from its thread, more jobs than threads under short leases, and
enqueueing from sync code with odd cursors, odd arguments and concurrent ``close_sync``."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

import pgtasks
from tests.helpers import Events

# --- what a thread can raise or return --------------------------------------------------------


@pytest.mark.parametrize(
    "exc", [SystemExit, KeyboardInterrupt, GeneratorExit, StopIteration, StopAsyncIteration]
)
async def test_a_thread_raising_a_base_exception_is_a_failed_attempt(
    app: pgtasks.App, exc: type[BaseException]
) -> None:
    """Whatever the thread raises, ``SystemExit`` and ``StopIteration`` included (asyncio
    refuses to put the latter into a future), is a failed attempt named after it, and the
    worker goes on to the next job."""

    @app.task(queue="rev_raise", max_retries=0)
    def boom() -> None:
        raise exc("from the thread")

    @app.task(queue="rev_raise")
    def fine() -> str:
        return "ok"

    bad = await boom.defer()
    good = await fine.defer()
    async with app.worker(poll_interval=0.1):
        with pytest.raises(pgtasks.JobFailed) as failed:
            await bad.result(timeout=10)
        assert await good.result(timeout=10) == "ok"
    if exc is StopIteration:  # as in a coroutine (PEP 479)
        assert failed.value.error_type == "RuntimeError"
        assert "StopIteration" in (failed.value.reason or "")
    else:
        assert failed.value.error_type == exc.__name__


async def test_a_def_that_returns_a_coroutine_fails_instead_of_succeeding_unrun(
    app: pgtasks.App,
) -> None:
    """A plain ``def`` wrapper around an ``async def`` (a decorator that lost the coroutine
    marker) hands back a coroutine: the body never ran, so the job must not succeed."""
    ran: list[int] = []

    async def body(n: int) -> int:
        ran.append(n)
        return n

    @app.task(queue="rev_coro", max_retries=0)
    def wrapped(n: int) -> Any:
        return body(n)

    ref = await wrapped.defer(1)
    async with app.worker(poll_interval=0.1):
        with pytest.raises(pgtasks.JobFailed) as failed:
            await ref.result(timeout=10)
    assert failed.value.error_type == "TypeError"
    assert "returned an awaitable (coroutine)" in (failed.value.reason or ""), failed.value.reason
    assert ran == []


# --- more jobs than threads, under short leases -----------------------------------------------


async def test_jobs_waiting_for_a_thread_keep_their_leases_and_run_once(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    """One thread, six claimed jobs of 0.8 s each, a 1 s lease: the last one waits ~4 s for
    the thread, several leases over. Its lease is kept meanwhile, so no other worker (here a
    second one on the same queue) claims it: each job runs exactly once, none is lost."""
    runs: list[int] = []
    lock = threading.Lock()

    @app.task(queue="rev_wait", lease=1)
    def slow(n: int) -> None:
        with lock:
            runs.append(n)
        time.sleep(0.8)

    await app.defer_many(slow.s(n) for n in range(6))
    first = app.worker(concurrency=6, threads=1, poll_interval=0.1)
    async with first:
        events = Events(first)
        await events.until(lambda: events.counts["started"] >= 1)
        async with app.worker(concurrency=6, threads=1, poll_interval=0.1) as second:
            other = Events(second)
            await events.until(lambda: events.counts["succeeded"] == 6, timeout=30)
        assert other.counts["started"] == 0, "a job waiting for a thread was claimed again"
    assert sorted(runs) == list(range(6))
    assert events.counts["lost"] == 0
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_rev_wait") == 0


# --- defer_sync: odd cursors, odd arguments ---------------------------------------------------


@pytest.fixture
def sync_app(db_dsn: str) -> Iterator[pgtasks.App]:
    app = pgtasks.App(db_dsn)
    try:
        yield app
    finally:
        app.close_sync()


def _register(app: pgtasks.App) -> pgtasks.SyncTask[..., None]:
    @app.task(queue="rev_enqueue", name="rev.welcome")
    def welcome(user_id: int) -> None: ...

    return welcome


def _count(dsn: str, sql: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


def _queued(dsn: str) -> int:
    """Jobs in the test's queue (0 when the queue was never created)."""
    if _count(dsn, "SELECT count(*) FROM pg_tables WHERE tablename = 'q_rev_enqueue'") == 0:
        return 0
    return _count(dsn, "SELECT count(*) FROM pgmq.q_rev_enqueue")


def test_a_psycopg3_connection_as_cursor_is_refused_before_anything_is_sent(
    sync_app: pgtasks.App, db_dsn: str
) -> None:
    """A psycopg 3 ``Connection`` has ``execute`` but no ``fetchall``: taken for a cursor,
    it would send the job and then fail reading the answer (a caller that catches the
    error and commits gets a job it was told failed). Refused up front, with a hint."""
    welcome = _register(sync_app)
    with psycopg.connect(db_dsn) as conn:
        with pytest.raises(TypeError, match=r"cursor must .*conn\.cursor\(\)"):
            welcome.options(cursor=conn).defer_sync(1)
        conn.commit()
    assert _queued(db_dsn) == 0


async def test_an_asyncpg_connection_as_cursor_says_to_use_connection(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    welcome = _register(app)
    with pytest.raises(TypeError, match=r"asyncpg connection use connection="):
        welcome.options(cursor=conn)


def test_connection_with_defer_sync_is_refused(sync_app: pgtasks.App, db_dsn: str) -> None:
    """``connection=`` (an asyncpg connection of some event loop) cannot be used from the
    background loop; ``defer_sync`` says to use ``cursor=`` instead of misusing it."""
    welcome = _register(sync_app)

    async def connection() -> asyncpg.Connection:
        return await asyncpg.connect(db_dsn)

    loop = asyncio.new_event_loop()
    try:
        conn = loop.run_until_complete(connection())
        try:
            with pytest.raises(TypeError, match=r"connection=\.\.\.\) is for defer\(\).*cursor="):
                welcome.options(connection=conn).defer_sync(1)
            with pytest.raises(TypeError, match=r"connection=\.\.\.\) is for defer\(\).*cursor="):
                sync_app.defer_many_sync([welcome.options(connection=conn).s(1)])
        finally:
            loop.run_until_complete(conn.close())
    finally:
        loop.close()
    assert _queued(db_dsn) == 0


def test_a_closed_cursor_a_bad_queue_and_bad_arguments_send_nothing(
    sync_app: pgtasks.App, db_dsn: str
) -> None:
    welcome = _register(sync_app)
    with psycopg.connect(db_dsn) as conn:
        cur = conn.cursor()
        cur.close()
        with pytest.raises(psycopg.InterfaceError, match="closed"):
            welcome.options(cursor=cur).defer_sync(1)
    with psycopg.connect(db_dsn) as conn, conn.cursor() as cur:
        with pytest.raises(ValueError, match="queue name"):
            welcome.options(cursor=cur, queue="Robert'); DROP TABLE x;--").defer_sync(1)
        with pytest.raises(TypeError, match="user_id"):
            welcome.options(cursor=cur).defer_sync("not a number")
        with pytest.raises(TypeError):
            welcome.options(cursor=cur).defer_sync(1, 2)
        conn.commit()
    with pytest.raises(TypeError, match="user_id"):
        welcome.defer_sync("not a number")
    assert _queued(db_dsn) == 0


def test_close_sync_while_other_threads_defer_never_hangs_them(
    sync_app: pgtasks.App, db_dsn: str
) -> None:
    """Eight threads defer in a loop while the main thread closes the client again and
    again: every call either sends its job or raises, none blocks forever, and every job
    a call returned a ref for is in the queue."""
    welcome = _register(sync_app)
    welcome.defer_sync(0)  # the queue exists
    stop = threading.Event()
    sent: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def produce() -> None:
        while not stop.is_set():
            try:
                ref = welcome.defer_sync(1)
            except Exception as exc:
                with lock:
                    errors.append(exc)
            else:
                with lock:
                    sent.append(ref.id)

    threads = [threading.Thread(target=produce, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    for _ in range(10):
        time.sleep(0.05)
        sync_app.close_sync()
    stop.set()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "a defer_sync() call never returned"
    assert sent
    assert _queued(db_dsn) == len(sent) + 1


async def test_a_sync_task_can_defer_on_its_own_cursor(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    """Inside a worker thread, a task defers the next job on a psycopg cursor of its own
    transaction, which rolls back on the first attempt (no job) and commits on the second."""

    @app.task(queue="rev_chain", max_retries=1, retry_backoff=0.05, retry_jitter=False)
    def first() -> None:
        attempt = pgtasks.current_job().attempt
        with psycopg.connect(db_dsn) as c, c.cursor() as cur:
            second.options(cursor=cur).defer_sync(attempt)
            if attempt == 1:
                raise RuntimeError("roll back the job deferred above")

    @app.task(queue="rev_chain")
    def second(n: int) -> int:
        return n

    ref = await first.defer()
    async with app.worker(poll_interval=0.05) as worker:
        events = Events(worker)
        await ref.result(timeout=15)
        await events.until(lambda: events.counts["succeeded"] == 2)
    deferred = await conn.fetch(
        "SELECT (message->'kwargs'->>'n')::int AS n FROM pgmq.a_rev_chain "
        "WHERE message->>'task' = $1",
        second.name,
    )
    assert [r["n"] for r in deferred] == [2]  # the first attempt's job rolled back


def test_a_cursor_on_an_item_of_a_batch_is_never_ignored(
    sync_app: pgtasks.App, db_dsn: str
) -> None:
    """``defer_many_sync`` sends on the cursor given to it: an item's own ``cursor=`` that
    is not that one would be silently ignored, and the job sent outside the transaction
    the caller meant (it would survive a rollback). Refused before anything is sent."""
    welcome = _register(sync_app)
    with psycopg.connect(db_dsn) as conn, conn.cursor() as cur, conn.cursor() as other:
        with pytest.raises(TypeError, match=r"defer_many_sync\(signatures, cursor="):
            sync_app.defer_many_sync([welcome.s(1), welcome.options(cursor=cur).s(2)])
        with pytest.raises(TypeError, match=r"defer_many_sync\(signatures, cursor="):
            sync_app.defer_many_sync([welcome.options(cursor=other).s(1)], cursor=cur)
        # the same cursor on the items and the call is what was meant
        sync_app.defer_many_sync([welcome.options(cursor=cur).s(1)], cursor=cur)
        conn.rollback()
    assert _queued(db_dsn) == 0


async def test_a_cursor_on_an_item_of_an_async_batch_is_refused(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    welcome = _register(app)
    with (
        psycopg.connect(db_dsn) as pconn,
        pconn.cursor() as cur,
        pytest.raises(TypeError, match=r"cursor=\.\.\.\) is for defer_sync"),
    ):
        await app.defer_many([welcome.s(1), welcome.options(cursor=cur).s(2)])
    assert (
        await conn.fetchval("SELECT count(*) FROM pg_tables WHERE tablename = 'q_rev_enqueue'") == 0
    )


def test_close_sync_during_a_hook_around_a_cursor_send_ends_the_call(
    sync_app: pgtasks.App, db_dsn: str
) -> None:
    """An enqueue hook still running on the background loop when ``close_sync()`` stops it:
    the caller, waiting in its own thread to send on its cursor, gets a `RuntimeError`
    that says why, instead of a bare cancellation or a wait without end."""
    welcome = _register(sync_app)
    in_hook = threading.Event()

    @sync_app.hooks.around_enqueue
    async def slow(
        call: pgtasks.EnqueueCall, next: pgtasks.EnqueueNext
    ) -> list[pgtasks.JobRef[Any]]:
        in_hook.set()
        await asyncio.sleep(30)
        return await next(call)

    errors: list[BaseException] = []

    def produce() -> None:
        with psycopg.connect(db_dsn) as conn, conn.cursor() as cur:
            try:
                welcome.options(cursor=cur).defer_sync(1)
            except BaseException as exc:
                errors.append(exc)

    caller = threading.Thread(target=produce, daemon=True)
    caller.start()
    assert in_hook.wait(10)
    sync_app.close_sync()
    caller.join(timeout=15)
    assert not caller.is_alive(), "the caller never returned"
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError), repr(errors[0])
    assert "close_sync()" in str(errors[0])
    assert _queued(db_dsn) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_while_another_thread_hands_over_a_call_does_not_deadlock_the_child(
    sync_app: pgtasks.App, db_dsn: str
) -> None:
    """gunicorn with --preload, or multiprocessing's fork: a thread of the parent is in the
    middle of handing a call over (it holds the client's lock) when another forks. The
    child, which has no such thread, must still be able to defer."""
    welcome = _register(sync_app)
    welcome.defer_sync(0)
    lock = sync_app._sync._lock
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # the child: defer, and leave without pytest's teardown
        code = 1
        try:
            signal.alarm(20)
            welcome.defer_sync(1)
            sync_app.close_sync()
            code = 0
        finally:
            os._exit(code)
    try:
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child never deferred: the lock held at the fork deadlocked it")
        assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        release.set()
        holder.join(10)
    assert _queued(db_dsn) == 2


async def test_an_async_cursor_is_refused_with_a_pointer_to_defer(
    app: pgtasks.App, db_dsn: str
) -> None:
    """psycopg's AsyncCursor (or SQLAlchemy's AsyncConnection) has execute and fetchall,
    both coroutines: on the sync path they would only make coroutines never awaited."""
    welcome = _register(app)
    async with (
        await psycopg.AsyncConnection.connect(db_dsn) as aconn,
        aconn.cursor() as cur,
    ):
        with pytest.raises(TypeError, match=r"execute is async.*await defer\(\)"):
            welcome.options(cursor=cur)


async def test_a_partial_or_a_callable_object_needs_a_name_and_then_runs(
    app: pgtasks.App,
) -> None:
    """Neither has a ``__qualname__`` to name the task by: a clear error asks for
    ``name=``; given one, each runs in a thread like any plain ``def``."""

    def add(a: int, b: int) -> int:
        return a + b

    class Double:
        def __call__(self, n: int) -> int:
            return 2 * n

    for fn in (functools.partial(add, 1), Double()):
        with pytest.raises(TypeError, match=r"has no __qualname__.*name=\.\.\."):
            app.task(fn)
    plus_one = app.task(name="rev.plus_one", queue="rev_callables")(functools.partial(add, 1))
    double = app.task(name="rev.double", queue="rev_callables")(Double())
    one, two = await plus_one.defer(b=2), await double.defer(21)
    async with app.worker(poll_interval=0.1):
        assert await one.result(timeout=10) == 3
        assert await two.result(timeout=10) == 42
