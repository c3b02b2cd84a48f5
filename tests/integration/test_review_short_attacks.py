"""Attacks on the short-jobs change (claims of at least 10 ms of work, a job's task that
starts the next job at its own end, a run cancelled before its first step that ends by the
reason as it begins), against a real database and real workers.

A cancellation is injected right after a job's task is created (before its first step: the
window the change is about) or right after its task ended, by wrapping the slots' launch.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Literal

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks.worker import slots as slots_module
from pgtasks.worker.job import CancelReason, Job
from tests.helpers import Events

Action = Literal["request", "stop", "force", "lost", "timeout"]
Kind = Literal["async", "def", "tx"]


def _hook_launch(worker: pgtasks.Worker, on_launch: Callable[[Job], None]) -> None:
    """Call ``on_launch(job)`` right after each job's task is created, before its first step."""
    slots = worker._slots
    launch = slots._start

    def start(job: Job) -> None:
        launch(job)
        assert job.task is not None
        assert not job.began
        on_launch(job)

    slots._start = start


def _act(worker: pgtasks.Worker, job: Job, action: Action) -> None:
    if action == "request":
        worker._on_cancel(f"{job.queue}:{job.msg_id}")  # what the listener calls
    elif action == "stop":
        worker.stop()
    elif action == "force":
        worker.stop(force=True)
    elif action == "lost":
        job.cancel(CancelReason.LOST_LEASE)
    else:
        job.cancel(CancelReason.TIMEOUT)


def _register(app: pgtasks.App, kind: Kind, queue: str, runs: Counter[int]) -> Any:
    if kind == "async":

        @app.task(queue=queue, name=f"{queue}.job", lease=3)
        async def job(n: int) -> None:
            runs[n] += 1
            await asyncio.sleep(0.001)

        return job
    if kind == "def":
        lock = threading.Lock()

        @app.task(queue=queue, name=f"{queue}.job", lease=3)
        def sync_job(n: int) -> None:
            with lock:
                runs[n] += 1
            time.sleep(0.001)

        return sync_job

    @app.task(queue=queue, name=f"{queue}.job", lease=3, transactional=True)
    async def tx_job(n: int) -> None:
        connection = pgtasks.current_job().connection
        assert connection is not None
        await connection.execute("INSERT INTO effects VALUES ($1)", n)
        runs[n] += 1

    return tx_job


async def _settled(worker: pgtasks.Worker, timeout: float = 20.0) -> None:
    """The worker holds nothing: every slot free, no job held."""
    with anyio.fail_after(timeout):
        while worker.running or worker._jobs or worker._slots.waiting:
            await anyio.sleep(0.01)


N = 40


@pytest.mark.parametrize("kind", ["async", "def", "tx"])
@pytest.mark.parametrize("action", ["request", "lost", "timeout"])
@pytest.mark.parametrize("when", ["before", "after"])
async def test_job_cancelled_around_its_first_step(
    app: pgtasks.App, conn: asyncpg.Connection, kind: Kind, action: Action, when: str
) -> None:
    await conn.execute("CREATE TABLE effects (n integer NOT NULL)")
    queue = f"race_{kind}"
    runs: Counter[int] = Counter()
    job = _register(app, kind, queue, runs)
    refs = await app.defer_many([job.s(i) for i in range(N)])
    by_id = {ref.id: i for i, ref in enumerate(refs)}
    hit: list[Job] = []
    from_a_job: list[bool] = []
    worker = app.worker(queues=[queue], concurrency=2, poll_interval=0.2)
    # a line of 6 from the first claim on, whatever the measured times: jobs are launched
    # both by a claim and by a job's end, whatever the machine's speed
    slots = worker._slots
    slots.prefetch, slots.batch, slots.gather = 6, 3, 0.001
    slots._pace = lambda: None  # type: ignore[method-assign]
    tasks: set[asyncio.Task[None]] = set()
    launches = Counter[bool]()
    targets = {False: {0}, True: {2, 7, 15}}  # the nth launch by a claim, by a job's end

    def on_launch(j: Job) -> None:
        assert j.task is not None
        current = asyncio.current_task()
        by_a_job = current is not None and current in tasks
        tasks.add(j.task)
        nth = launches[by_a_job]
        launches[by_a_job] += 1
        if nth in targets[by_a_job]:
            hit.append(j)
            from_a_job.append(by_a_job)
            if when == "before":
                _act(worker, j, action)
            else:

                def after(_t: object, j: Job = j) -> None:
                    _act(worker, j, action)

                j.task.add_done_callback(after)

    _hook_launch(worker, on_launch)
    async with worker:
        events = Events(worker)
        with anyio.fail_after(60):
            while True:
                left = await conn.fetchval(f"SELECT count(*) FROM pgmq.q_{queue}")
                if left == 0:
                    break
                await anyio.sleep(0.05)
        await _settled(worker)
        assert worker.running == 0
        assert not worker._jobs
        done = await conn.fetchval(f"SELECT count(*) FROM pgmq.a_{queue}")
    assert len(hit) == 4, (launches, from_a_job)
    hit_n = {by_id[j.msg_id] for j in hit}
    assert all(c == 1 for c in runs.values()), runs
    if when == "before" and action == "request":
        for j in hit:
            status = await refs[by_id[j.msg_id]].status()
            assert status.state == "cancelled", (j, status)
        assert set(runs) == set(range(N)) - hit_n
        assert events.counts["cancelled"] == 4
    else:  # ran once each: the withdrawn ones (lost, timeout) again on a later claim
        assert set(runs) == set(range(N)), (sorted(set(range(N)) - set(runs)), hit_n)
        assert done == N
    if kind == "tx":
        counts = await conn.fetch("SELECT n, count(*) AS c FROM effects GROUP BY n")
        assert all(r["c"] == 1 for r in counts)
        assert {r["n"] for r in counts} == set(runs)


@pytest.mark.parametrize("kind", ["async", "def", "tx"])
@pytest.mark.parametrize("action", ["stop", "force"])
@pytest.mark.parametrize("target", [0, 9])
async def test_worker_stopped_between_a_launch_and_its_first_step(
    app: pgtasks.App, conn: asyncpg.Connection, kind: Kind, action: Action, target: int
) -> None:
    await conn.execute("CREATE TABLE effects (n integer NOT NULL)")
    queue = f"stop_{kind}"
    runs: Counter[int] = Counter()
    job = _register(app, kind, queue, runs)
    refs = await app.defer_many([job.s(i) for i in range(N)])
    by_id = {ref.id: i for i, ref in enumerate(refs)}
    worker = app.worker(queues=[queue], concurrency=2, poll_interval=0.2, shutdown_timeout=5)
    slots = worker._slots  # a line of 6 from the first claim on (the 10th launch is in it)
    slots.prefetch, slots.batch, slots.gather = 6, 3, 0.001
    slots._pace = lambda: None  # type: ignore[method-assign]
    hit: list[Job] = []
    launched = 0

    def on_launch(j: Job) -> None:
        nonlocal launched
        if launched == target:
            hit.append(j)
            _act(worker, j, action)
        launched += 1

    _hook_launch(worker, on_launch)
    with anyio.fail_after(30):
        async with worker:
            await worker._done.wait()
    assert worker.running == 0
    assert not worker._jobs
    assert not worker._slots.waiting
    assert len(hit) == 1
    assert all(c == 1 for c in runs.values()), runs  # started once at most
    (j,) = hit
    if action == "force":
        assert by_id[j.msg_id] not in runs  # cancelled before its first step: never ran
    archived = {by_id[r["msg_id"]] for r in await conn.fetch(f"SELECT msg_id FROM pgmq.a_{queue}")}
    assert archived <= set(runs)
    rows = await conn.fetch(
        f"SELECT msg_id, read_ct, headers::text AS headers, vt <= clock_timestamp() AS visible "
        f"FROM pgmq.q_{queue}"
    )
    assert len(rows) + len(archived) == N  # nothing lost
    # a forced stop may abandon a claim in flight (`Fetcher._claim`): its messages wait out
    # their lease (3 s), unreleased; every other one is handed back at once
    cut = [r for r in rows if not r["visible"] and r["headers"] is None and action == "force"]
    for row in rows:
        if row in cut:
            continue
        assert row["visible"], row
        if row["read_ct"]:
            assert json.loads(row["headers"]) == {"x-pgtasks-released": row["read_ct"]}, row
    if cut:
        print(f"\nclaim in flight abandoned by the forced stop: {len(cut)} message(s)")
        with anyio.fail_after(10):
            while await conn.fetchval(
                f"SELECT count(*) FROM pgmq.q_{queue} WHERE vt > clock_timestamp()"
            ):
                await anyio.sleep(0.1)
    if action == "force":
        assert any(r["msg_id"] == j.msg_id for r in rows)
    else:  # a soft stop lets a launched job run to its end
        assert by_id[j.msg_id] in archived
    if kind == "tx":
        assert await conn.fetchval("SELECT count(*) FROM effects") == len(archived)


@pytest.mark.parametrize("kind", ["async", "def"])
async def test_real_cancel_requests_race_short_jobs(
    app: pgtasks.App, conn: asyncpg.Connection, kind: Kind
) -> None:
    """ref.cancel() (through the database and the listener) on every other job of a stream of
    short ones: each ends once, succeeded or cancelled, and the worker ends holding nothing."""
    await conn.execute("CREATE TABLE effects (n integer NOT NULL)")
    queue = f"realcancel_{kind}"
    runs: Counter[int] = Counter()
    job = _register(app, kind, queue, runs)
    total = 600
    refs = await app.defer_many([job.s(i) for i in range(total)])
    async with app.worker(queues=[queue], concurrency=3, poll_interval=0.2) as worker:
        for ref in refs[::2]:
            await ref.cancel()
        with anyio.fail_after(60):
            while await conn.fetchval(f"SELECT count(*) FROM pgmq.q_{queue}"):
                await anyio.sleep(0.05)
        await _settled(worker)
    assert all(c == 1 for c in runs.values()), runs
    states: Counter[str] = Counter()
    for i, ref in enumerate(refs):
        state = (await ref.status()).state
        states[state] += 1
        assert state in ("succeeded", "cancelled"), (i, state)
        if i % 2:
            assert state == "succeeded"
            assert runs[i] == 1
    assert states["succeeded"] + states["cancelled"] == total


@pytest.mark.parametrize("how", ["soft", "force"])
async def test_shutdown_with_a_full_line(
    app: pgtasks.App, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Short jobs make the line long; then jobs that block fill the slots and the line: a stop
    hands every job in line back at once (attempt given back), the running ones after
    shutdown_timeout, and nothing is lost."""
    monkeypatch.setattr(slots_module, "PATIENCE", 60.0)  # the line stays until the stop
    gate = anyio.Event()
    started: Counter[int] = Counter()

    @app.task(queue="fullline")
    async def short(n: int) -> None:
        pass  # as short as a job gets: the line is long on any machine

    @app.task(queue="fullline")
    async def blocked(n: int) -> None:
        started[n] += 1
        await gate.wait()

    shorts = await app.defer_many([short.s(i) for i in range(3000)])
    blocks = await app.defer_many([blocked.s(i) for i in range(200)])
    worker = app.worker(queues=["fullline"], concurrency=4, poll_interval=0.2, shutdown_timeout=1)
    async with worker:
        events = Events(worker)
        await events.until(lambda: len(started) == 4, timeout=60)
        with anyio.fail_after(20):
            while not worker._slots.waiting:
                await anyio.sleep(0.01)
        await anyio.sleep(0.3)  # claims in flight land
        line = len(worker._slots.waiting)
        held = len(worker._jobs)
        prefetch = worker._slots.prefetch
        t0 = time.monotonic()
        worker.stop(force=how == "force")
        await worker._done.wait()
        took = time.monotonic() - t0
    print(f"\nline {line} held {held} prefetch {prefetch} stop took {took:.2f}s")
    assert line >= 1
    assert took < (0.0 if how == "force" else 1.0) + 3.0 + 7.0
    if how == "soft":
        assert took >= 1.0  # shutdown_timeout honoured for the running ones
    assert worker.running == 0
    assert not worker._jobs
    assert not worker._slots.waiting
    assert sum(started.values()) == 4
    assert all(c == 1 for c in started.values())
    archived = await conn.fetchval("SELECT count(*) FROM pgmq.a_fullline")
    rows = await conn.fetch(
        "SELECT msg_id, read_ct, headers::text AS headers, vt <= clock_timestamp() AS visible "
        "FROM pgmq.q_fullline"
    )
    assert archived == len(shorts)
    assert len(rows) == len(blocks)
    for row in rows:
        assert row["visible"], row
        if row["read_ct"]:
            assert json.loads(row["headers"]) == {"x-pgtasks-released": row["read_ct"]}, row
    assert sum(1 for r in rows if r["read_ct"]) == held


async def test_jobs_that_turn_long_are_handed_to_another_worker(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    """Worker A's line fills behind jobs that turned long; worker B, idle, must get them
    within about PATIENCE."""
    app_a, app_b = pgtasks.App(db_dsn), pgtasks.App(db_dsn)
    started: dict[int, tuple[str, float]] = {}
    release = anyio.Event()

    def tasks(a: pgtasks.App, who: str) -> Any:
        @a.task(queue="turn", name="turn.job")
        async def job(n: int, long: bool) -> None:
            if long:
                started.setdefault(n, (who, time.monotonic()))
                await release.wait()
            # else as short as a job gets: A's line is long on any machine

        return job

    job_a = tasks(app_a, "a")
    tasks(app_b, "b")
    try:
        await app_a.defer_many([job_a.s(i, False) for i in range(3000)])
        await app_a.defer_many([job_a.s(1000 + i, True) for i in range(40)])
        async with app_a.worker(queues=["turn"], concurrency=4, poll_interval=0.2) as a:
            with anyio.fail_after(60):
                while not a._slots.waiting or len(started) < 4:
                    await anyio.sleep(0.005)
            line = len(a._slots.waiting)
            t0 = time.monotonic()
            async with app_b.worker(queues=["turn"], concurrency=40, poll_interval=0.2) as b:
                with anyio.fail_after(30):
                    while len(started) < 40:
                        await anyio.sleep(0.01)
                took = time.monotonic() - t0
                release.set()
                with anyio.fail_after(30):
                    while await conn.fetchval("SELECT count(*) FROM pgmq.q_turn"):
                        await anyio.sleep(0.05)
                await _settled(b)
            await _settled(a)
    finally:
        await app_a.close()
        await app_b.close()
    by = Counter(who for who, _ in started.values())
    print(f"\nline of A {line}; all 40 long jobs started {took:.2f}s after B started: {by}")
    assert took < 10.0
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_turn") == 3040


async def test_two_workers_share_a_queue_of_short_jobs(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    """No job runs twice; how the jobs split between two equal workers (printed)."""
    apps = [pgtasks.App(db_dsn) for _ in range(2)]
    runs: Counter[int] = Counter()
    by: Counter[str] = Counter()
    total = 8000

    def tasks(a: pgtasks.App, who: str) -> Any:
        @a.task(queue="fair", name="fair.job")
        async def job(n: int) -> None:
            runs[n] += 1
            by[who] += 1
            await asyncio.sleep(0.001)

        return job

    job = tasks(apps[0], "a")
    tasks(apps[1], "b")
    try:
        await apps[0].defer_many([job.s(i) for i in range(total)])
        async with (
            apps[0].worker(queues=["fair"], concurrency=4) as a,
            apps[1].worker(queues=["fair"], concurrency=4) as b,
        ):
            t0 = time.monotonic()
            with anyio.fail_after(120):
                while await conn.fetchval("SELECT count(*) FROM pgmq.q_fair"):
                    await anyio.sleep(0.05)
            took = time.monotonic() - t0
            await _settled(a)
            await _settled(b)
            pre = (a._slots.prefetch, b._slots.prefetch)
    finally:
        for a_ in apps:
            await a_.close()
    print(f"\nfairness: {dict(by)} in {took:.2f}s, prefetch at end {pre}")
    assert all(c == 1 for c in runs.values())
    assert len(runs) == total
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_fair") == total


async def test_each_task_runs_with_its_own_plan(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    """Two tasks, two queues, one worker: lease, timeout and retry policy are each task's own
    (the plan is cached by task name), jobs interleaved so both plans are in use at once."""
    vts: dict[str, list[float]] = {"a": [], "b": []}
    attempts: Counter[str] = Counter()

    async def lease_left(queue: str) -> float:
        ctx = pgtasks.current_job()
        pool = await app.pool()
        async with pool.acquire() as c:
            left = await c.fetchval(
                f"SELECT extract(epoch FROM vt - clock_timestamp()) FROM pgmq.q_{queue} "
                "WHERE msg_id = $1",
                ctx.id,
            )
        return float(left)

    @app.task(queue="plan_a", lease=5, timeout=0.3, max_retries=0)
    async def a(n: int) -> None:
        attempts[f"a{n}"] += 1
        vts["a"].append(await lease_left("plan_a"))
        await asyncio.sleep(5)  # past its timeout: a failed attempt, no retry

    @app.task(queue="plan_b", lease=40, max_retries=2, retry_backoff=0.01)
    async def b(n: int) -> None:
        attempts[f"b{n}"] += 1
        vts["b"].append(await lease_left("plan_b"))
        await asyncio.sleep(0.5)  # no timeout: a's must not apply
        if pgtasks.current_job().attempt < 3:
            raise ValueError("again")

    refs = await app.defer_many([a.s(i) for i in range(3)] + [b.s(i) for i in range(3)])
    async with app.worker(queues=["plan_a", "plan_b"], concurrency=6, poll_interval=0.1) as w:
        events = Events(w)
        await events.until(
            lambda: events.counts["dead"] == 3 and events.counts["succeeded"] == 3, timeout=60
        )
    assert all(attempts[f"a{i}"] == 1 for i in range(3)), attempts
    assert all(attempts[f"b{i}"] == 3 for i in range(3)), attempts
    assert all(1 < v <= 5 for v in vts["a"]), vts  # the lease of a's claim
    assert all(20 < v <= 40 for v in vts["b"]), vts
    for ref in refs[3:]:
        assert (await ref.status()).state == "succeeded"
    errors = await conn.fetch("SELECT error FROM pgtasks.dead_letters")
    assert len(errors) == 3
    assert all("time limit of 0.3s" in str(r["error"]) for r in errors), errors


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_burst_worker_ends_after_short_jobs_with_cancels(
    app: pgtasks.App, conn: asyncpg.Connection, concurrency: int
) -> None:
    runs: Counter[int] = Counter()

    @app.task(queue="burst")
    async def job(n: int) -> None:
        runs[n] += 1
        await asyncio.sleep(0.0005)

    total = 3000
    await app.defer_many([job.s(i) for i in range(total)])
    worker = app.worker(queues=["burst"], concurrency=concurrency, burst=True, poll_interval=0.2)
    launched = 0

    def on_launch(j: Job) -> None:
        nonlocal launched
        launched += 1
        if launched % 97 == 0:
            j.cancel(CancelReason.TIMEOUT)  # withdrawn at its first step: handed back

    _hook_launch(worker, on_launch)
    with anyio.fail_after(120):
        await worker.run()
    assert worker.running == 0
    assert not worker._jobs
    assert not worker._slots.waiting
    assert set(runs) == set(range(total))
    assert all(c == 1 for c in runs.values())
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_burst") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_burst") == total


class _Rest:
    """The rest of a coroutine whose first step was taken already (it yielded ``first``)."""

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro, self._first = coro, first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self._coro, self._first
        while True:
            try:
                sent = yield value
            except BaseException as exc:
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


_Task: Any = asyncio.Task  # with ``context`` (3.11+)


async def _resume(coro: Coroutine[Any, Any, Any], first: Any) -> Any:
    return await _Rest(coro, first)


def _emulated_eager_factory(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, Any],
    *,
    context: contextvars.Context | None = None,
    **kwargs: Any,
) -> Any:
    """What `asyncio.eager_task_factory` (3.12+) does to a job's task, for 3.10 and 3.11: its
    first step is taken at once, inside create_task, in the task's own context."""
    if getattr(coro, "__qualname__", "") != "Worker._run":  # only jobs: anyio's own tasks
        return _Task(coro, loop=loop, context=context, **kwargs)  # need current_task
    ctx = context if context is not None else contextvars.copy_context()
    try:
        first = ctx.run(coro.send, None)
    except StopIteration as stop:
        done: asyncio.Future[Any] = loop.create_future()
        done.set_result(stop.value)
        return done
    except BaseException as exc:
        failed: asyncio.Future[Any] = loop.create_future()
        failed.set_exception(exc)
        return failed
    return _Task(_resume(coro, first), loop=loop, context=ctx, **kwargs)


@pytest.mark.parametrize("real", [True, False])
async def test_jobs_under_an_eager_task_factory_free_their_slots(
    app: pgtasks.App, conn: asyncpg.Connection, real: bool
) -> None:
    """Jobs that end without suspending, in a long line behind jobs that do, under an eager
    task factory: each job's whole run is its first step, inside create_task. One that
    started the next job from its own frame recursed down the line (RecursionError): the
    slots stayed taken and the jobs held (their leases kept) for as long as the worker ran."""
    factory: Any = getattr(asyncio, "eager_task_factory", None)
    if real and factory is None:
        pytest.skip("asyncio.eager_task_factory is Python 3.12+")
    if not real:
        if sys.version_info < (3, 11):
            pytest.skip("asyncio.Task(context=...) is Python 3.11+")
        factory = _emulated_eager_factory
    concurrency, first, total = 200, 2000, 8000
    done: Counter[int] = Counter()

    @app.task(queue="eager")
    async def job(n: int) -> None:
        if first <= n < first + concurrency:  # these fill the slots; the line fills behind
            await asyncio.sleep(0.3)
        done[n] += 1

    await app.defer_many([job.s(i) for i in range(total)])
    loop = asyncio.get_running_loop()
    old = loop.get_task_factory()
    loop.set_task_factory(factory)
    try:
        async with app.worker(queues=["eager"], concurrency=concurrency, poll_interval=0.2) as w:
            with anyio.fail_after(60):
                while len(done) < total:
                    await anyio.sleep(0.05)
            await _settled(w)
            deepest = w._slots.prefetch
    finally:
        loop.set_task_factory(old)
    assert all(c == 1 for c in done.values())
    assert deepest > 0
    with anyio.fail_after(20):
        while await conn.fetchval("SELECT count(*) FROM pgmq.q_eager"):
            await anyio.sleep(0.05)


async def test_a_job_that_force_stops_its_worker_in_an_eager_first_step(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    """Under an eager task factory, a job that stops its worker (force) in its first step is
    cancelled in a step that has no task yet: it must still be cancelled once its task is
    known, and handed back with the others."""
    factory: Any = getattr(asyncio, "eager_task_factory", None)
    if factory is None:
        pytest.skip("asyncio.eager_task_factory is Python 3.12+")
    holder: list[pgtasks.Worker] = []
    stopped_at: list[float] = []
    raised: list[BaseException] = []

    @app.task(queue="eagerstop")
    async def job(n: int) -> None:
        if n == 3:
            stopped_at.append(time.monotonic())
            try:
                holder[0].stop(force=True)
            except BaseException as exc:  # was: AssertionError (a job began, with no task)
                raised.append(exc)
        await asyncio.sleep(30)

    await app.defer_many([job.s(i) for i in range(6)])
    loop = asyncio.get_running_loop()
    old = loop.get_task_factory()
    loop.set_task_factory(factory)
    try:
        worker = app.worker(queues=["eagerstop"], concurrency=10, poll_interval=0.2)
        holder.append(worker)
        with anyio.fail_after(30):
            async with worker:
                await worker._done.wait()
    finally:
        loop.set_task_factory(old)
    took = time.monotonic() - stopped_at[0]
    assert not raised, raised
    assert took < 2.0, took  # cancelled at once, not left for CANCEL_GRACE
    assert worker.abandoned == 0
    rows = await conn.fetch(
        "SELECT msg_id, read_ct, headers::text AS headers, vt <= clock_timestamp() AS visible "
        "FROM pgmq.q_eagerstop ORDER BY msg_id"
    )
    assert len(rows) == 6
    for row in rows:
        assert row["visible"], rows
        if row["read_ct"]:
            assert json.loads(row["headers"]) == {"x-pgtasks-released": row["read_ct"]}, row
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.attempt_errors") == 0
