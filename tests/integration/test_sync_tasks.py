"""Plain ``def`` tasks on a real worker: they run in the worker's threads with their context,
retry, time out, are cancelled and stopped as far as a thread allows (told through
``current_job().cancel_requested``; their lease kept and nothing written while the thread
runs), and never stall the worker's loops."""

from __future__ import annotations

import contextvars
import statistics
import threading
import time
from collections.abc import Awaitable, Callable

import anyio
import asyncpg
import pytest

import pgtasks
from tests.helpers import Events


async def _state(ref: pgtasks.JobRef[object]) -> str:
    return (await ref.status()).state


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 15) -> None:
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.02)


async def _wait_thread_event(event: threading.Event, timeout: float = 15) -> None:
    assert await anyio.to_thread.run_sync(event.wait, timeout), "the thread never got there"


async def _lease(conn: asyncpg.Connection, queue: str) -> tuple[bool, int, object]:
    """(vt in the future, read_ct, the released header) of the queue's only message."""
    row = await conn.fetchrow(
        "SELECT vt > clock_timestamp() AS leased, read_ct, "
        f"(headers->>'x-pgtasks-released')::int AS r FROM pgmq.q_{queue}"
    )
    assert row is not None, "the message left its queue"
    return row["leased"], row["read_ct"], row["r"]


async def test_a_plain_def_runs_in_a_thread_with_its_context(app: pgtasks.App) -> None:
    seen: list[tuple[str, int, int, str]] = []

    @app.task(queue="sync_basic")
    def add(a: int, b: int) -> int:
        if a >= 0:
            job = pgtasks.current_job()
            seen.append((threading.current_thread().name, job.id, job.attempt, job.task))
        return a + b

    assert isinstance(add, pgtasks.SyncTask)
    assert add(-2, 3) == 1  # calling it runs the function
    ref = await add.defer(2, 3)
    async with app.worker(concurrency=4, threads=2):
        assert await ref.result(timeout=15) == 5
    (thread, job_id, attempt, name) = seen[0]
    assert thread.startswith("pgtasks-job")
    assert (job_id, attempt, name) == (ref.id, 1, add.name)


async def test_retries_and_dead_letters_as_for_async_tasks(app: pgtasks.App) -> None:
    attempts: list[int] = []

    @app.task(queue="sync_retry", max_retries=2, retry_backoff=0.05, retry_jitter=False)
    def flaky(fail_until: int) -> str:
        attempt = pgtasks.current_job().attempt
        attempts.append(attempt)
        if attempt < fail_until:
            raise ValueError(f"attempt {attempt}")
        return "ok"

    ok = await flaky.defer(2)
    dead = await flaky.defer(10)
    async with app.worker(concurrency=4, poll_interval=0.05):
        assert await ok.result(timeout=15) == "ok"
        with pytest.raises(pgtasks.JobFailed) as failed:
            await dead.result(timeout=15)
    assert failed.value.error_type == "ValueError"
    assert "retries exhausted after 3 attempt(s)" in (failed.value.reason or "")
    assert sorted(attempts) == [1, 1, 2, 2, 3]


async def test_the_thread_limit_is_kept(app: pgtasks.App) -> None:
    lock = threading.Lock()
    running = 0
    most = 0

    @app.task(queue="sync_limit")
    def busy() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.2)
        with lock:
            running -= 1

    await app.defer_many(busy.s() for _ in range(8))
    await app.worker(concurrency=8, threads=3, burst=True).run()
    assert most == 3


async def test_execute_hooks_and_context_variables_reach_the_thread(app: pgtasks.App) -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    seen: list[str] = []

    async def hook(ctx: pgtasks.JobContext, call_next: pgtasks.ExecuteNext) -> object:
        request_id.set(f"req-{ctx.id}")
        return await call_next(ctx)

    app.hooks.around_execute(hook)

    @app.task(queue="sync_hooks")
    def job() -> None:
        seen.append(request_id.get())

    ref = await job.defer()
    await app.worker(burst=True).run()
    assert seen == [f"req-{ref.id}"]


async def test_a_timed_out_thread_keeps_its_lease_until_it_returns(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    """The run is over its time limit after 0.3 s, but its thread sleeps on for 3 s without
    looking: the flag says "timeout", the 1 s lease is extended meanwhile (nobody else may
    claim it), nothing is written, and only once the thread returns is the attempt
    recorded as failed with a timeout."""
    told = threading.Event()
    returned = threading.Event()
    reasons: list[str | None] = []

    @app.task(queue="sync_timeout", timeout=0.3, lease=1, max_retries=0)
    def stubborn() -> str:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if pgtasks.current_job().cancel_requested and not told.is_set():
                reasons.append(pgtasks.current_job().cancel_reason)
                told.set()
            time.sleep(0.05)
        returned.set()
        return "too late"

    ref = await stubborn.defer()
    async with app.worker(poll_interval=0.1) as worker:
        events = Events(worker)
        await _wait_thread_event(told)
        for _ in range(5):  # past the 1 s lease, several times over
            assert not returned.is_set()
            assert await _lease(conn, "sync_timeout") == (True, 1, None)
            assert await _state(ref) == "running"
            await anyio.sleep(0.4)
        await events.until(lambda: events.counts["dead"] == 1)
        assert returned.is_set()
    assert reasons == ["timeout"]
    with pytest.raises(pgtasks.JobFailed) as failed:
        await ref.result(timeout=5)
    assert failed.value.error_type == "JobTimeout"
    assert events.counts["succeeded"] == 0


async def test_a_cancel_request_is_seen_by_the_thread(app: pgtasks.App) -> None:
    reasons: list[str | None] = []

    @app.task(queue="sync_cancel", lease=2)
    def polite() -> int:
        job = pgtasks.current_job()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if job.cancel_requested:
                reasons.append(job.cancel_reason)
                return 1
            time.sleep(0.02)
        return 0

    ref = await polite.defer()
    async with app.worker(poll_interval=0.1) as worker:
        events = Events(worker)
        await _until(lambda: _is(ref, "running"))
        assert await ref.cancel() == "requested"
        with pytest.raises(pgtasks.JobCancelled):
            await ref.result(timeout=10)
        await events.until(lambda: events.counts["cancelled"] == 1)
    assert reasons == ["requested"]
    assert events.counts["succeeded"] == events.counts["retried"] == 0


async def _is(ref: pgtasks.JobRef[object], state: str) -> bool:
    return await _state(ref) == state


async def test_a_stop_waits_for_the_thread_then_hands_the_message_back(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    started = threading.Event()
    returned = threading.Event()
    reasons: list[str | None] = []

    @app.task(queue="sync_stop", lease=1)
    def slow() -> None:
        started.set()
        while not pgtasks.current_job().cancel_requested:
            time.sleep(0.02)
        reasons.append(pgtasks.current_job().cancel_reason)
        time.sleep(1.5)  # some cleanup, past the lease: it is kept
        returned.set()

    await slow.defer()
    worker = app.worker(shutdown_timeout=0.2, poll_interval=0.1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await _wait_thread_event(started)
        worker.stop()
    assert returned.is_set(), "run() returned before the thread did"
    assert reasons == ["stop"]
    assert worker.abandoned == 0
    # released: visible at once, the attempt given back
    leased, read_ct, released = await _lease(conn, "sync_stop")
    assert (leased, read_ct, released) == (False, 1, 1)


@pytest.mark.slow
async def test_a_thread_that_ignores_a_stop_is_left_without_any_write(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    """Past the stop's grace the worker returns without the thread, writes nothing for it,
    and leaves its lease to lapse (the CLI then ends the process, and with it the thread)."""
    started = threading.Event()
    returned = threading.Event()

    @app.task(queue="sync_deaf", lease=30)
    def deaf() -> None:
        started.set()
        time.sleep(5)  # never looks at cancel_requested
        returned.set()

    await deaf.defer()
    worker = app.worker(shutdown_timeout=0.2, poll_interval=0.1)
    began = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await _wait_thread_event(started)
        worker.stop()
    assert time.monotonic() - began < 4.9
    assert not returned.is_set()
    assert worker.abandoned == 1
    leased, read_ct, released = await _lease(conn, "sync_deaf")
    assert (leased, read_ct, released) == (True, 1, None)  # not released, not acked
    await _wait_thread_event(returned)
    await anyio.sleep(0.1)  # its job's asyncio task ends, and writes nothing
    assert await _lease(conn, "sync_deaf") == (True, 1, None)
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_sync_deaf") == 0


@pytest.mark.slow
async def test_blocking_threads_never_stall_the_loop(app: pgtasks.App) -> None:
    """Ten 5-second ``time.sleep`` tasks and a stream of fast async jobs together: the fast
    ones start promptly while every thread is still asleep."""
    asleep = threading.Semaphore(0)
    woke: list[float] = []

    @app.task(queue="sync_mixed")
    def sleeper() -> None:
        asleep.release()
        time.sleep(5)
        woke.append(time.monotonic())

    started_at: dict[int, float] = {}

    @app.task(queue="sync_mixed")
    async def fast(n: int) -> None:
        started_at[n] = time.monotonic()

    await app.defer_many(sleeper.s() for _ in range(10))
    async with app.worker(concurrency=30, threads=10, poll_interval=0.1):
        for _ in range(10):
            assert await anyio.to_thread.run_sync(asleep.acquire, True, 15)
        sent_at: dict[int, float] = {}
        for n in range(50):
            sent_at[n] = time.monotonic()
            await fast.defer(n)
            await anyio.sleep(0.02)
        with anyio.fail_after(10):
            while len(started_at) < 50:
                await anyio.sleep(0.01)
        stream_done = time.monotonic()
        latencies = [started_at[n] - sent_at[n] for n in range(50)]
        assert not woke, "the stream should be over while the sleepers still sleep"
        with anyio.fail_after(20):
            while len(woke) < 10:
                await anyio.sleep(0.05)
    assert stream_done < min(woke)
    assert statistics.median(latencies) < 0.25, latencies
    assert max(latencies) < 1.0, latencies


async def test_a_lost_lease_is_told_to_the_thread_and_nothing_is_written(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    """Another claim takes the message while the thread runs (simulated: its read_ct moves
    on): the next extension finds it gone, the thread is told "lost_lease", and when it
    returns nothing is written; the message is the other claim's."""
    started = threading.Event()
    reasons: list[str | None] = []

    @app.task(queue="sync_lost", lease=1)
    def job() -> str:
        started.set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not pgtasks.current_job().cancel_requested:
            time.sleep(0.02)
        reasons.append(pgtasks.current_job().cancel_reason)
        return "done"

    await job.defer()
    async with app.worker(poll_interval=0.1) as worker:
        events = Events(worker)
        await _wait_thread_event(started)
        await conn.execute("UPDATE pgmq.q_sync_lost SET read_ct = read_ct + 1")
        await events.until(lambda: events.counts["lost"] == 1)
        with anyio.fail_after(10):
            while not reasons:
                await anyio.sleep(0.02)
        await anyio.sleep(0.2)
    assert reasons == ["lost_lease"]
    assert events.counts["succeeded"] == events.counts["retried"] == 0
    row = await conn.fetchrow("SELECT read_ct FROM pgmq.q_sync_lost")
    assert row is not None
    assert row["read_ct"] == 2  # untouched: the other claim's
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_sync_lost") == 0
