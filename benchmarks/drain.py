"""Worker benchmark: drain rate, enqueue->start latency and delayed-job lateness.

    python benchmarks/drain.py [--dsn DSN] [--n N] [--runs 3] [--quick]

pgtasks against raw pgmq (the ceiling), PgQueuer and Procrastinate, measured in the same
process, round by round, with the order of the cases rotating every round:

1. **drain**: ``N`` pre-enqueued no-op jobs drained at concurrency 1, 16 and 100 by each
   library's own worker (pgtasks: an in-process ``app.worker(concurrency=c,
   burst=True).run()``). The raw pgmq ceiling is one asyncpg connection looping
   ``pgmq.read(q, 30, 1000)`` + ``pgmq.archive``/``pgmq.delete`` by id array.
2. **latency**: an idle worker; jobs deferred one at a time at a fixed rate (default 500 at
   100 jobs/s); latency = the time the task starts - the time the defer call began, on the
   same process clock.
3. **delayed**: jobs deferred with an eta 1 s ahead, 100 ms apart, to an idle worker;
   lateness = the time the task starts - its eta (wall clock, which the server shares).
4. **invisible**: pgtasks draining ``N`` jobs at concurrency 100 behind 100,000 far-future
   (invisible) messages with lower msg_ids, against the same drain of an otherwise empty
   queue (the concurrency-100 drain of part 1, same round).

Each library gets its own scratch database (created here, dropped at the end); raw pgmq
runs in the pgtasks database, on its own queue. Before every timed drain the queue is
emptied (TRUNCATE), refilled, and ``VACUUM ANALYZE``d, untimed. A drain's time covers the
worker's start (its LISTEN connection, its checks) and its exit once the queue is empty.
Every drain checks that each job ran exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

import pgtasks
from pgtasks.tasks import OnSuccess

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (
    CaseResult,
    Measurement,
    Summary,
    add_common_arguments,
    create_database,
    drop_database,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    machine_description,
    markdown_table,
    paired_ratio,
    rotated,
    server_description,
)

UTC = dt.timezone.utc
ENQUEUE_CHUNK = 5_000  # jobs per enqueue call while refilling a queue (untimed)
FAR_FUTURE = "1 year"  # the invisible messages' delay
SCRATCH = {
    "pgtasks": "bench_drain_pgtasks",
    "pgqueuer": "bench_drain_pgqueuer",
    "procrastinate": "bench_drain_procrastinate",
}
CONTENDERS = ("pgtasks", "raw", "pgqueuer", "procrastinate")
SECTIONS = ("drain", "latency", "delayed", "invisible")


@dataclass(frozen=True)
class Workload:
    n: int  # jobs per drain (concurrency 16 and 100)
    latency_jobs: int = 500
    latency_rate: float = 100.0  # jobs/s
    latency_warmup: int = 20
    delayed_jobs: int = 20
    delay: float = 1.0  # seconds from defer to eta
    delayed_spacing: float = 0.1  # seconds between two delayed defers
    invisible: int = 100_000

    def jobs(self, contender: str, concurrency: int) -> int:
        """Jobs per drain. At concurrency 1 a quarter of N (pgtasks, raw); PgQueuer and
        Procrastinate drain fewer (see the README): at their rates the same N would not fit
        a ten-minute run, and each of their drains still lasts seconds (a steady rate)."""
        n = self.n
        if contender == "procrastinate":
            return max(50, n // 40 if concurrency == 1 else n // 10)
        if contender == "pgqueuer" and concurrency == 1:
            return max(50, n // 40)
        return max(50, n // 4) if concurrency == 1 else n


# --- cases ------------------------------------------------------------------------------------


class BenchCase:
    """One contender doing one kind of work; satisfies the harness's `Case` protocol (one
    call per round) and adds `measure`, which returns the round's `Measurement`."""

    name: str
    group: str
    calls = 1
    items_per_call: int

    def __init__(self, name: str, group: str, items: int) -> None:
        self.name = name
        self.group = group
        self.items_per_call = items

    async def prepare(self) -> None:
        return None

    async def reset(self) -> None:
        """Untimed, right before every round's measurement."""

    async def call(self, i: int) -> object:
        raise NotImplementedError

    async def close(self) -> None:
        return None

    async def measure(self) -> Measurement:
        """Default: the whole `call` is timed; ``items_per_call`` jobs."""
        began = time.perf_counter()
        await self.call(0)
        return Measurement(self.items_per_call, time.perf_counter() - began)


class DrainCase(BenchCase):
    def __init__(
        self,
        name: str,
        group: str,
        items: int,
        *,
        refill: Callable[[], Awaitable[None]],
        drain: Callable[[], Awaitable[None]],
        check: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(name, group, items)
        self._refill = refill
        self._drain = drain
        self._check = check

    async def reset(self) -> None:
        await self._refill()

    async def call(self, i: int) -> object:
        await self._drain()
        return None

    async def measure(self) -> Measurement:
        m = await super().measure()
        await self._check()  # untimed: every job ran exactly once
        return m


class SampledCase(BenchCase):
    """A case whose round yields per-job samples (latency, lateness)."""

    def __init__(
        self, name: str, group: str, items: int, run: Callable[[], Awaitable[Measurement]]
    ):
        super().__init__(name, group, items)
        self._run = run
        self.missing: list[int] = []  # jobs that never started, per round

    async def measure(self) -> Measurement:
        m = await self._run()
        self.missing.append(self.items_per_call - len(m.latencies))
        return m


# --- shared measuring routines -----------------------------------------------------------------


async def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def paced_latency(
    defer: Callable[[int], Awaitable[object]],
    started: dict[int, float],
    w: Workload,
) -> Measurement:
    """Defer jobs 0..latency_jobs-1 one at a time at ``latency_rate``, to a worker that is
    already waiting; latency = ``started[i]`` (perf_counter at the task's first line) - the
    perf_counter just before ``defer(i)``. A few warm-up jobs (negative ids) go first."""
    started.clear()
    for k in range(-w.latency_warmup, 0):
        await defer(k)
        await asyncio.sleep(1 / w.latency_rate)
    await wait_for(lambda: len(started) >= w.latency_warmup, 10.0)
    await asyncio.sleep(0.2)  # let the worker go idle again
    sent: dict[int, float] = {}
    began = time.perf_counter()
    for k in range(w.latency_jobs):
        pause = began + k / w.latency_rate - time.perf_counter()
        if pause > 0:
            await asyncio.sleep(pause)
        sent[k] = time.perf_counter()
        await defer(k)
    await wait_for(lambda: all(k in started for k in sent), 10.0)
    latencies = [started[k] - t for k, t in sent.items() if k in started]
    return Measurement(len(latencies), time.perf_counter() - began, latencies)


async def eta_lateness(
    defer_at: Callable[[int, float], Awaitable[float]],
    started: dict[int, float],
    w: Workload,
    *,
    grace: float = 10.0,
) -> Measurement:
    """Defer jobs with an eta ``delay`` seconds ahead, ``delayed_spacing`` apart, to a
    waiting worker; lateness = ``started[i]`` (time.time() at the task's first line) - the
    eta. ``defer_at(i, delay)`` returns the eta as a time.time() value."""
    started.clear()
    etas: dict[int, float] = {}
    began = time.perf_counter()
    for k in range(w.delayed_jobs):
        etas[k] = await defer_at(k, w.delay)
        await asyncio.sleep(w.delayed_spacing)
    await wait_for(lambda: all(k in started for k in etas), w.delay + grace)
    lateness = [started[k] - eta for k, eta in etas.items() if k in started]
    return Measurement(len(lateness), time.perf_counter() - began, lateness)


def executed_check(
    label: str, executed: Counter[str], key: str, expected: int
) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        got = executed[key]
        if got != expected:
            raise RuntimeError(f"{label}: {got} executions for {expected} jobs")

    return check


# --- pgtasks and raw pgmq -----------------------------------------------------------------------

RAW_READ = (
    "SELECT msg_id, read_ct, enqueued_at, vt, message::text, headers::text "
    "FROM pgmq.read($1::text, 30, 1000)"
)


def envelope(i: int) -> str:
    return orjson.dumps({"v": 1, "task": "bench.raw", "args": [], "kwargs": {"i": i}}).decode()


class PgTasksBench:
    """pgtasks (and raw pgmq, in the same database)."""

    label = "pgtasks"

    def __init__(self, admin_dsn: str, w: Workload) -> None:
        self.admin_dsn = admin_dsn
        self.w = w
        self.executed: Counter[str] = Counter()
        self.started: dict[int, float] = {}
        self.tasks: dict[str, Any] = {}

    async def setup(self) -> None:
        self.dsn = await create_database(self.admin_dsn, SCRATCH["pgtasks"])
        self.app = pgtasks.App(self.dsn)  # the defaults: a pool of up to 10 connections
        modes: tuple[tuple[str, OnSuccess], ...] = (
            ("drain", "archive"),
            ("drain_del", "delete"),
            ("deep", "archive"),
        )
        for queue, on_success in modes:
            self.tasks[queue] = self._noop(queue, on_success)
        started = self.started

        @self.app.task(name="bench.latency", queue="latency")
        async def latency(i: int) -> None:
            started[i] = time.perf_counter()

        @self.app.task(name="bench.delayed", queue="delayed")
        async def delayed(i: int) -> None:
            started[i] = time.time()

        self.tasks["latency"], self.tasks["delayed"] = latency, delayed
        await self.app.migrate()
        self.admin = await asyncpg.connect(self.dsn)
        await self.admin.execute("SELECT pgmq.create('raw')")

    def _noop(self, queue: str, on_success: OnSuccess) -> Any:
        executed = self.executed

        async def noop(i: int) -> None:
            executed[queue] += 1

        return self.app.task(name=f"bench.{queue}", queue=queue, on_success=on_success)(noop)

    async def teardown(self) -> None:
        await self.admin.close()
        await self.app.close()
        await drop_database(self.admin_dsn, SCRATCH["pgtasks"])

    # refilling (untimed)

    async def _empty(self, queue: str) -> None:
        await self.admin.execute(f"TRUNCATE pgmq.q_{queue}, pgmq.a_{queue}")

    async def _vacuum(self, queue: str) -> None:
        await self.admin.execute(f"VACUUM ANALYZE pgmq.q_{queue}")

    async def refill(self, queue: str, jobs: int, invisible: int = 0) -> None:
        await self._empty(queue)
        if invisible:  # far-future messages, with lower msg_ids than the work
            await self.admin.execute(
                f"""INSERT INTO pgmq.q_{queue} (vt, message)
                SELECT clock_timestamp() + interval '{FAR_FUTURE}',
                       jsonb_build_object('v', 1, 'task', 'bench.{queue}', 'args', '[]'::jsonb,
                                          'kwargs', jsonb_build_object('i', -g))
                FROM generate_series(1, $1::int) AS g""",
                invisible,
            )
        task = self.tasks[queue]
        for start in range(0, jobs, ENQUEUE_CHUNK):
            stop = min(jobs, start + ENQUEUE_CHUNK)
            await self.app.defer_many(task.s(i=i) for i in range(start, stop))
        await self._vacuum(queue)
        self.executed[queue] = 0

    async def drain(self, queue: str, concurrency: int) -> None:
        await self.app.worker(queues=[queue], concurrency=concurrency, burst=True).run()

    def check(self, queue: str, jobs: int, left: int = 0) -> Callable[[], Awaitable[None]]:
        executed = executed_check(f"pgtasks {queue}", self.executed, queue, jobs)

        async def check() -> None:
            await executed()
            remaining = await self.admin.fetchval(f"SELECT count(*) FROM pgmq.q_{queue}")
            if remaining != left:
                raise RuntimeError(f"pgtasks {queue}: {remaining} messages left, not {left}")

        return check

    def drain_case(
        self, name: str, group: str, queue: str, concurrency: int, jobs: int, invisible: int = 0
    ) -> DrainCase:
        return DrainCase(
            name,
            group,
            jobs,
            refill=lambda: self.refill(queue, jobs, invisible),
            drain=lambda: self.drain(queue, concurrency),
            check=self.check(queue, jobs, left=invisible),
        )

    # raw pgmq: the ceiling

    async def raw_refill(self, jobs: int) -> None:
        await self._empty("raw")
        bodies = [envelope(i) for i in range(jobs)]
        for start in range(0, jobs, ENQUEUE_CHUNK):
            await self.admin.execute(
                "SELECT pgmq.send_batch('raw', $1::jsonb[])", bodies[start : start + ENQUEUE_CHUNK]
            )
        await self._vacuum("raw")

    async def raw_drain(self, ack: str, jobs: int) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            done = 0
            ack_sql = f"SELECT count(*) FROM pgmq.{ack}('raw', $1::bigint[])"
            while True:
                rows = await conn.fetch(RAW_READ, "raw")
                if not rows:
                    break
                done += await conn.fetchval(ack_sql, [r[0] for r in rows])
        finally:
            await conn.close()
        if done != jobs:
            raise RuntimeError(f"raw pgmq {ack}: acked {done} of {jobs}")

    def raw_case(self, name: str, group: str, ack: str, jobs: int) -> DrainCase:
        async def nothing() -> None:
            return None

        return DrainCase(
            name,
            group,
            jobs,
            refill=lambda: self.raw_refill(jobs),
            drain=lambda: self.raw_drain(ack, jobs),
            check=nothing,
        )

    # latency and delays

    @asynccontextmanager
    async def idle_worker(self, queue: str) -> AsyncIterator[None]:
        await self._empty(queue)
        async with self.app.worker(queues=[queue], concurrency=10):  # returns once listening
            await asyncio.sleep(0.2)
            yield

    async def latency(self) -> Measurement:
        task = self.tasks["latency"]
        async with self.idle_worker("latency"):
            return await paced_latency(lambda i: task.defer(i), self.started, self.w)

    async def delayed(self) -> Measurement:
        task = self.tasks["delayed"]

        async def defer_at(i: int, delay: float) -> float:
            eta = time.time() + delay
            await task.options(eta=dt.datetime.fromtimestamp(eta, UTC)).defer(i)
            return eta

        async with self.idle_worker("delayed"):
            return await eta_lateness(defer_at, self.started, self.w)


# --- PgQueuer -----------------------------------------------------------------------------------


class PgQueuerBench:
    """PgQueuer's QueueManager on its asyncpg driver (one connection, as its docs show).
    Concurrency c: the entrypoint's ``concurrency_limit=c`` and ``batch_size=c`` (of c/4,
    c/2, c and 2c, c was the fastest or tied at 16 and 100; at c=1 a batch of 1). One more
    row keeps PgQueuer's default ``batch_size=10`` at c=100."""

    label = "PgQueuer"

    def __init__(self, admin_dsn: str, w: Workload) -> None:
        self.admin_dsn = admin_dsn
        self.w = w
        self.executed: Counter[str] = Counter()
        self.started: dict[int, float] = {}

    async def setup(self) -> None:
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        logging.getLogger("pgqueuer").setLevel(logging.ERROR)
        self.dsn = await create_database(self.admin_dsn, SCRATCH["pgqueuer"])
        self.admin = await asyncpg.connect(self.dsn)
        self.queries: Any = Queries(AsyncpgDriver(self.admin))
        await self.queries.install()
        qualified = self.queries.qbq.qualified
        self.table = qualified.queue_table
        self._truncate = f"TRUNCATE {qualified.queue_table}, {qualified.queue_table_log}"

    async def teardown(self) -> None:
        await self.admin.close()
        await drop_database(self.admin_dsn, SCRATCH["pgqueuer"])

    async def refill(self, jobs: int) -> None:
        await self.admin.execute(self._truncate)
        for start in range(0, jobs, ENQUEUE_CHUNK):
            batch = range(start, min(jobs, start + ENQUEUE_CHUNK))
            await self.queries.enqueue(
                ["drain"] * len(batch), [orjson.dumps({"i": i}) for i in batch], [0] * len(batch)
            )
        await self.admin.execute(f"VACUUM ANALYZE {self.table}")
        self.executed["drain"] = 0

    def _manager(self, conn: asyncpg.Connection) -> Any:
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.qm import QueueManager
        from pgqueuer.queries import Queries

        return QueueManager(Queries(AsyncpgDriver(conn)))

    async def drain(self, concurrency: int, batch_size: int) -> None:
        from pgqueuer.types import QueueExecutionMode

        conn = await asyncpg.connect(self.dsn)
        try:
            qm = self._manager(conn)
            executed = self.executed

            async def drain(job: Any) -> None:
                executed["drain"] += 1

            qm.entrypoint("drain", concurrency_limit=concurrency)(drain)

            await qm.run(mode=QueueExecutionMode.drain, batch_size=batch_size)
        finally:
            await conn.close()

    def drain_case(
        self, name: str, group: str, concurrency: int, jobs: int, batch_size: int | None = None
    ) -> DrainCase:
        return DrainCase(
            name,
            group,
            jobs,
            refill=lambda: self.refill(jobs),
            drain=lambda: self.drain(concurrency, batch_size or concurrency),
            check=executed_check("PgQueuer", self.executed, "drain", jobs),
        )

    @asynccontextmanager
    async def idle_worker(self, entrypoint: str, clock: Callable[[], float]) -> AsyncIterator[None]:
        await self.admin.execute(self._truncate)
        conn = await asyncpg.connect(self.dsn)
        qm = self._manager(conn)
        started = self.started

        async def job(job: Any) -> None:
            started[int(job.payload)] = clock()

        qm.entrypoint(entrypoint, concurrency_limit=10)(job)

        runner = asyncio.create_task(qm.run(batch_size=10))
        try:
            await asyncio.sleep(0.5)  # listening by now
            yield
        finally:
            qm.shutdown.set()
            try:
                await asyncio.wait_for(runner, 10)
            finally:
                await conn.close()

    async def latency(self) -> Measurement:
        async def defer(i: int) -> object:
            return await self.queries.enqueue("latency", str(i).encode())

        async with self.idle_worker("latency", time.perf_counter):
            return await paced_latency(defer, self.started, self.w)

    async def delayed(self) -> Measurement:
        async def defer_at(i: int, delay: float) -> float:
            # the server sets execute_after = NOW() + delay, NOW() being a little later than
            # this eta: lateness is overstated by up to one round trip
            eta = time.time() + delay
            await self.queries.enqueue(
                "delayed", str(i).encode(), execute_after=dt.timedelta(seconds=delay)
            )
            return eta

        async with self.idle_worker("delayed", time.time):
            return await eta_lateness(defer_at, self.started, self.w)


# --- Procrastinate ------------------------------------------------------------------------------


class ProcrastinateBench:
    """Procrastinate's worker (``run_worker_async``) on its psycopg connector with the
    library's default pool; ``wait=False`` to drain."""

    label = "Procrastinate"

    def __init__(self, admin_dsn: str, w: Workload) -> None:
        self.admin_dsn = admin_dsn
        self.w = w
        self.executed: Counter[str] = Counter()
        self.started: dict[int, float] = {}

    async def setup(self) -> None:
        import procrastinate

        # it warns that the app lives in __main__, which is what a benchmark script does
        logging.getLogger("procrastinate").setLevel(logging.ERROR)
        self.dsn = await create_database(self.admin_dsn, SCRATCH["procrastinate"])
        self.app: Any = procrastinate.App(
            connector=procrastinate.PsycopgConnector(conninfo=self.dsn)
        )
        executed, started = self.executed, self.started

        @self.app.task(name="bench.drain", queue="drain")
        async def drain(i: int) -> None:
            executed["drain"] += 1

        @self.app.task(name="bench.latency", queue="latency")
        async def latency(i: int) -> None:
            started[i] = time.perf_counter()

        @self.app.task(name="bench.delayed", queue="delayed")
        async def delayed(i: int) -> None:
            started[i] = time.time()

        self.tasks: dict[str, Any] = {"drain": drain, "latency": latency, "delayed": delayed}
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()
        self.admin = await asyncpg.connect(self.dsn)

    async def teardown(self) -> None:
        await self.admin.close()
        await self.app.close_async()
        await drop_database(self.admin_dsn, SCRATCH["procrastinate"])

    async def _empty(self) -> None:
        await self.admin.execute("TRUNCATE procrastinate_jobs CASCADE")

    async def refill(self, jobs: int) -> None:
        await self._empty()
        for start in range(0, jobs, ENQUEUE_CHUNK):
            batch = range(start, min(jobs, start + ENQUEUE_CHUNK))
            await self.tasks["drain"].batch_defer_async(*({"i": i} for i in batch))
        await self.admin.execute("VACUUM ANALYZE procrastinate_jobs")
        self.executed["drain"] = 0

    async def drain(self, concurrency: int) -> None:
        await self.app.run_worker_async(
            queues=["drain"], concurrency=concurrency, wait=False, install_signal_handlers=False
        )

    def drain_case(self, name: str, group: str, concurrency: int, jobs: int) -> DrainCase:
        return DrainCase(
            name,
            group,
            jobs,
            refill=lambda: self.refill(jobs),
            drain=lambda: self.drain(concurrency),
            check=executed_check("Procrastinate", self.executed, "drain", jobs),
        )

    @asynccontextmanager
    async def idle_worker(self, queue: str) -> AsyncIterator[None]:
        await self._empty()
        runner = asyncio.create_task(
            self.app.run_worker_async(
                queues=[queue], concurrency=10, wait=True, install_signal_handlers=False
            )
        )
        try:
            await asyncio.sleep(0.5)  # listening by now
            yield
        finally:
            runner.cancel()  # a graceful stop for Procrastinate
            with suppress(asyncio.CancelledError):
                await asyncio.wait_for(runner, 10)

    async def latency(self) -> Measurement:
        task = self.tasks["latency"]
        async with self.idle_worker("latency"):
            return await paced_latency(lambda i: task.defer_async(i=i), self.started, self.w)

    async def delayed(self) -> Measurement:
        task = self.tasks["delayed"]

        async def defer_at(i: int, delay: float) -> float:
            eta = time.time() + delay
            await task.configure(schedule_at=dt.datetime.fromtimestamp(eta, UTC)).defer_async(i=i)
            return eta

        async with self.idle_worker("delayed"):
            # its worker looks for scheduled jobs on its polling interval (5 s by default)
            return await eta_lateness(defer_at, self.started, self.w)


# --- the run ------------------------------------------------------------------------------------

DRAIN = "drain c={c}"
CEILING = "raw pgmq ceiling"
LATENCY = "enqueue->start latency"
DELAYED = "delayed: start - eta"
INVISIBLE = "drain c=100 behind invisible msgs"


def pgtasks_name(c: int, delete: bool = False) -> str:
    return f"pgtasks c={c}" + (" (delete)" if delete else "")


RAW_ARCHIVE, RAW_DELETE = "raw read 1000 + archive", "raw read 1000 + delete"
PGT_INVISIBLE = "pgtasks c=100, invisible ahead"


PGQ_DEFAULT = "PgQueuer 1.6 c=100, batch_size=10 (default)"


def pgq_name(c: int) -> str:
    return f"PgQueuer 1.6 c={c}"


def proc_name(c: int) -> str:
    return f"Procrastinate 3.10 c={c}"


@dataclass
class Built:
    cases: list[BenchCase]
    teardowns: list[Callable[[], Awaitable[None]]]
    notes: list[str]


async def build(args: argparse.Namespace, w: Workload, log: Callable[[str], None]) -> Built:
    only, sections = set(args.only.split(",")), set(args.sections.split(","))
    built = Built([], [], [])
    pgt = PgTasksBench(args.dsn, w)
    if only & {"pgtasks", "raw"}:
        await pgt.setup()
        built.teardowns.append(pgt.teardown)
    if "pgtasks" in only:
        if "drain" in sections or "invisible" in sections:
            for c in (1, 16, 100):
                if c == 100 or "drain" in sections:
                    group = DRAIN.format(c=c)
                    built.cases.append(
                        pgt.drain_case(pgtasks_name(c), group, "drain", c, w.jobs("pgtasks", c))
                    )
        if "drain" in sections:
            built.cases.append(
                pgt.drain_case(
                    pgtasks_name(100, delete=True), DRAIN.format(c=100), "drain_del", 100, w.n
                )
            )
        if "invisible" in sections:
            built.cases.append(
                pgt.drain_case(PGT_INVISIBLE, INVISIBLE, "deep", 100, w.n, invisible=w.invisible)
            )
        if "latency" in sections:
            built.cases.append(SampledCase("pgtasks", LATENCY, w.latency_jobs, pgt.latency))
        if "delayed" in sections:
            built.cases.append(SampledCase("pgtasks", DELAYED, w.delayed_jobs, pgt.delayed))
    if "raw" in only and "drain" in sections:
        built.cases.append(pgt.raw_case(RAW_ARCHIVE, CEILING, "archive", w.n))
        built.cases.append(pgt.raw_case(RAW_DELETE, CEILING, "delete", w.n))

    competitors: list[tuple[str, PgQueuerBench | ProcrastinateBench]] = []
    if "pgqueuer" in only:
        competitors.append(("pgqueuer", PgQueuerBench(args.dsn, w)))
    if "procrastinate" in only:
        competitors.append(("procrastinate", ProcrastinateBench(args.dsn, w)))
    for key, bench in competitors:
        try:
            await bench.setup()
        except Exception as exc:  # a competitor that will not run is reported, not faked
            built.notes.append(f"{bench.label} left out: {type(exc).__name__}: {exc}")
            log(traceback.format_exc())
            continue
        built.teardowns.append(bench.teardown)
        namer = pgq_name if key == "pgqueuer" else proc_name
        if "drain" in sections:
            for c in (1, 16, 100):
                built.cases.append(bench.drain_case(namer(c), DRAIN.format(c=c), c, w.jobs(key, c)))
            if isinstance(bench, PgQueuerBench):  # its default batch size, for reference
                built.cases.append(
                    bench.drain_case(PGQ_DEFAULT, DRAIN.format(c=100), 100, w.n // 4, batch_size=10)
                )
        if "latency" in sections:
            built.cases.append(SampledCase(bench.label, LATENCY, w.latency_jobs, bench.latency))
        if "delayed" in sections:
            built.cases.append(SampledCase(bench.label, DELAYED, w.delayed_jobs, bench.delayed))
    return built


def too_many_connections(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything it wraps) is the server's "too many clients"."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, asyncpg.TooManyConnectionsError):
            return True
        inner = getattr(e, "exceptions", ())  # an exception group (3.10: the backport)
        if isinstance(inner, tuple | list):
            todo.extend(x for x in inner if isinstance(x, BaseException))
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return False


async def run_rounds(
    cases: Sequence[BenchCase], runs: int, log: Callable[[str], None]
) -> list[CaseResult]:
    """Every case once per round, in an order that rotates every round (so a slow phase of
    the machine is shared); each case is reset (untimed) right before it is measured."""
    results = {id(c): CaseResult(c) for c in cases}
    for r in range(runs):
        for case in rotated(cases, r):
            for attempt in range(1, 4):
                try:
                    await case.reset()
                    m = await case.measure()
                    break
                except Exception as exc:
                    # a shared server: someone else's test run may hold every connection
                    if attempt == 3 or not too_many_connections(exc):
                        raise
                    log(f"{case.name}: the server has no free connection; retrying in 5 s")
                    await asyncio.sleep(5)
            results[id(case)].rounds.append(m)
            if m.latencies:
                detail = f"p50 {m.latency_percentile(50) * 1e3:8.2f} ms"
            else:
                detail = f"{m.throughput:>10,.0f} jobs/s"
            log(f"round {r + 1}/{runs}  {case.group:<34} {case.name:<38} {detail}")
    return [results[id(c)] for c in cases]


# --- tables -------------------------------------------------------------------------------------


def drain_table(results: Sequence[CaseResult]) -> str:
    rows = [
        [r.case.group, r.case.name, f"{r.case.items_per_call:,}", fmt_rate(r.throughput())]
        for r in results
        if r.case.group.startswith(("drain", CEILING))
    ]
    return markdown_table(
        ["benchmark", "contender", "jobs/round", "jobs/s, median (min-max)"], rows
    )


def sampled_table(results: Sequence[CaseResult], group: str, qs: Sequence[float]) -> str:
    rows = []
    for r in results:
        if r.case.group != group:
            continue
        missing = sum(getattr(r.case, "missing", []))
        cells = [r.case.name, f"{r.case.items_per_call:,}"]
        cells += [fmt_ms(r.latency(q)) for q in qs]
        cells.append(str(missing))
        rows.append(cells)
    if not rows:
        return ""
    labels = ["max" if q == 100 else f"p{q:g}" for q in qs]
    return markdown_table(
        ["contender", "jobs/round", *(f"{lab} ms" for lab in labels), "never started"], rows
    )


@dataclass(frozen=True)
class Target:
    label: str
    value: Callable[[dict[str, CaseResult]], Summary | None]
    goal: float
    higher_is_better: bool = True
    unit: str = "x"


def ratio(num: str, den: str) -> Callable[[dict[str, CaseResult]], Summary | None]:
    def value(by: dict[str, CaseResult]) -> Summary | None:
        a, b = by.get(num), by.get(den)
        return paired_ratio(a, b) if a and b else None

    return value


def latency_of(
    name: str, group: str, q: float
) -> Callable[[dict[str, CaseResult]], Summary | None]:
    def value(by: dict[str, CaseResult]) -> Summary | None:
        r = by.get(f"{group}/{name}")
        return r.latency(q) if r else None

    return value


TARGETS = (
    Target("pgtasks / PgQueuer, drain c=100", ratio(pgtasks_name(100), pgq_name(100)), 5.0),
    Target("pgtasks / Procrastinate, drain c=100", ratio(pgtasks_name(100), proc_name(100)), 25.0),
    Target("pgtasks / Procrastinate, drain c=1", ratio(pgtasks_name(1), proc_name(1)), 4.0),
    Target("pgtasks / raw pgmq, archive, c=100", ratio(pgtasks_name(100), RAW_ARCHIVE), 0.40),
    Target("pgtasks / raw pgmq, delete, c=100", ratio(pgtasks_name(100, True), RAW_DELETE), 0.40),
    Target("pgtasks enqueue->start p50", latency_of("pgtasks", LATENCY, 50), 3.5, False, "ms"),
    Target("pgtasks enqueue->start p99", latency_of("pgtasks", LATENCY, 99), 10.0, False, "ms"),
    Target(
        "pgtasks delayed start - eta, max", latency_of("pgtasks", DELAYED, 100), 100.0, False, "ms"
    ),
    Target("pgtasks invisible ahead / empty, c=100", ratio(PGT_INVISIBLE, pgtasks_name(100)), 0.50),
)

INFO_RATIOS = (
    ("pgtasks / PgQueuer, drain c=16", ratio(pgtasks_name(16), pgq_name(16))),
    ("pgtasks / Procrastinate, drain c=16", ratio(pgtasks_name(16), proc_name(16))),
    ("pgtasks / PgQueuer, drain c=1", ratio(pgtasks_name(1), pgq_name(1))),
    ("pgtasks / PgQueuer default batch_size, c=100", ratio(pgtasks_name(100), PGQ_DEFAULT)),
)


def targets_table(results: Sequence[CaseResult]) -> str:
    by: dict[str, CaseResult] = {
        r.case.name: r for r in results if not isinstance(r.case, SampledCase)
    }
    by.update(
        {f"{r.case.group}/{r.case.name}": r for r in results if isinstance(r.case, SampledCase)}
    )
    rows = []
    for t in TARGETS:
        s = t.value(by)
        if s is None:
            continue
        if t.unit == "ms":
            shown, median = fmt_ms(s), s.median * 1e3
            goal = f"<= {t.goal:g} ms"
        else:
            shown, median = fmt_ratio(s), s.median
            goal = f">= {t.goal:g}"
        met = median >= t.goal if t.higher_is_better else median <= t.goal
        rows.append([t.label, shown, goal, "met" if met else "MISSED"])
    for label, value in INFO_RATIOS:
        s = value(by)
        if s is not None:
            rows.append([label, fmt_ratio(s), "-", "-"])
    if not rows:
        return ""
    return markdown_table(["measure (paired by round)", "median (min-max)", "target", ""], rows)


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_common_arguments(parser)
    parser.add_argument(
        "--n", type=int, default=None, help="jobs per drain (default: 20000; 2000 with --quick)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for a smoke run: N=2000, 100 latency jobs, 5 delayed jobs, "
        "20,000 invisible messages",
    )
    parser.add_argument(
        "--only", default=",".join(CONTENDERS), help="comma-separated subset of %(default)s"
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset of %(default)s"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-round progress")
    args = parser.parse_args(argv)
    for option, allowed in (("only", CONTENDERS), ("sections", SECTIONS)):
        unknown = set(getattr(args, option).split(",")) - set(allowed)
        if unknown:
            parser.error(f"unknown --{option}: {', '.join(sorted(unknown))}")
    if args.n is None:
        args.n = 2_000 if args.quick else 20_000
    if min(args.n, args.runs) < 1:
        parser.error("--n and --runs must be positive")
    return args


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        w = Workload(args.n, latency_jobs=100, delayed_jobs=5, invisible=20_000)
    else:
        w = Workload(args.n)
    logging.basicConfig(level=logging.WARNING)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    print(f"machine:  {machine_description()}")
    print(f"server:   {await server_description(args.dsn)}")
    print(
        f"workload: drains of N={w.n:,} no-op jobs (concurrency 1: see jobs/round); latency "
        f"{w.latency_jobs} jobs at {w.latency_rate:g}/s; {w.delayed_jobs} delayed jobs "
        f"(eta +{w.delay:g} s); {w.invisible:,} invisible messages; {args.runs} rounds, "
        "case order rotating every round\n"
    )
    began = time.perf_counter()
    built = Built([], [], [])
    try:
        built = await build(args, w, log)
        results = await run_rounds(built.cases, args.runs, log)
    finally:
        for teardown in reversed(built.teardowns):
            try:
                await teardown()
            except Exception as exc:
                log(f"teardown failed: {exc!r}")

    print("### Drain (jobs/s)\n")
    print(drain_table(results))
    for title, group, qs in (
        ("Enqueue->start latency, idle worker", LATENCY, (50, 95, 99, 100)),
        ("Delayed jobs: start - eta", DELAYED, (50, 99, 100)),
    ):
        table = sampled_table(results, group, qs)
        if table:
            print(f"\n### {title} (per-round percentile: median over rounds (min-max))\n")
            print(table)
    invisible = [r for r in results if r.case.group == INVISIBLE]
    if invisible:
        print(f"\n### Drain behind {w.invisible:,} invisible messages (jobs/s)\n")
        print(
            markdown_table(
                ["contender", "jobs/round", "jobs/s, median (min-max)"],
                [
                    [r.case.name, f"{r.case.items_per_call:,}", fmt_rate(r.throughput())]
                    for r in invisible
                ],
            )
        )
    table = targets_table(results)
    if table:
        print("\n### Targets\n")
        print(table)
    for note in built.notes:
        print(f"\nnote: {note}")
    print(f"\n(total time {time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
