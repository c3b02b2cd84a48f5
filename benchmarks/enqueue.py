"""Enqueue benchmark: pgtasks vs raw pgmq (the ceiling), PgQueuer and Procrastinate.

    python benchmarks/enqueue.py [--dsn DSN] [--n N] [--runs 3]

Two comparisons, measured in the same process, one after the other; within each, the
contenders take turns in short slices every round (see ``_harness.run_interleaved``), so
drift affects them alike:

* serial: one job per call, awaited one at a time, on a single connection
  (pgtasks ``task.defer()`` with a pool of one; raw ``SELECT pgmq.send(...)``; PgQueuer
  ``Queries.enqueue``; Procrastinate ``defer_async``), with per-call p50/p99 latency;
* bulk: batches of ``--batch-size`` jobs per call (pgtasks ``app.defer_many``; raw
  ``pgmq.send_batch``; PgQueuer ``Queries.enqueue`` with lists; Procrastinate
  ``batch_defer_async``).

Each contender gets its own scratch database (created here, dropped at the end). Every job
carries the same arguments, ``{"user_id": i, "email": "user<i>@example.com"}``, encoded the
contender's own way; building the arguments and encoding them is inside the timed region
for everyone. Before every round the contender's queue table is emptied (untimed), so each
round starts from the same state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

import pgtasks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (
    Case,
    CaseResult,
    add_common_arguments,
    create_database,
    drop_database,
    fmt_ratio,
    load_average,
    machine_description,
    markdown_table,
    paired_ratio,
    results_table,
    run_interleaved,
    server_description,
)

SERIAL = "serial (1 job per call)"
BULK = "bulk ({size:,} jobs per call)"
QUEUE = "bench"
TASK = "bench_noop"


async def bench_noop(user_id: int, email: str) -> None:
    """The task every contender enqueues (never run here)."""


def job_kwargs(i: int) -> dict[str, Any]:
    """The arguments of job ``i``: the same for every contender."""
    return {"user_id": i, "email": f"user{i}@example.com"}


@dataclass(frozen=True)
class Workload:
    serial_calls: int
    batch_size: int
    batches: int
    warmup_calls: int = 200
    settings: Mapping[str, str] = field(default_factory=dict)


class ContenderCase:
    """A `Case` over one method of a `Contender` (serial or bulk)."""

    def __init__(
        self,
        contender: Contender,
        name: str,
        group: str,
        call: Callable[[int], Awaitable[object]],
        calls: int,
        items_per_call: int,
        warmup_calls: int,
    ) -> None:
        self.name = name
        self.group = group
        self.calls = calls
        self.items_per_call = items_per_call
        self._contender = contender
        self._call = call
        self._warmup_calls = warmup_calls

    async def prepare(self) -> None:
        for i in range(self._warmup_calls):
            await self._call(i)

    async def reset(self) -> None:
        await self._contender.reset()

    async def call(self, i: int) -> object:
        return await self._call(i)

    async def close(self) -> None:
        return None


class Contender:
    """One library: creates its scratch database and schema, offers a serial and a bulk
    case."""

    label: str
    database: str

    def __init__(self, admin_dsn: str, workload: Workload) -> None:
        self.admin_dsn = admin_dsn
        self.workload = workload
        self.dsn = ""
        self._admin: asyncpg.Connection | None = None

    async def setup(self) -> None:
        """Create the scratch database and install the library's schema; on failure, drop
        the database again."""
        self.dsn = await create_database(self.admin_dsn, self.database, self.workload.settings)
        try:
            await self.install()
            self._admin = await asyncpg.connect(self.dsn)
        except BaseException:
            with contextlib.suppress(Exception):  # keep the original error
                await self.teardown()
            raise

    async def install(self) -> None:
        raise NotImplementedError

    async def empty(self, admin: asyncpg.Connection) -> None:
        """Empty the queue tables (untimed, before every round)."""
        raise NotImplementedError

    async def serial_call(self, i: int) -> object:
        raise NotImplementedError

    async def bulk_call(self, i: int) -> object:
        """Enqueue batch ``i`` (jobs ``i*size`` to ``(i+1)*size - 1``)."""
        raise NotImplementedError

    async def reset(self) -> None:
        assert self._admin is not None
        await self.empty(self._admin)

    async def teardown(self) -> None:
        try:
            if self._admin is not None:
                await self._admin.close()
            await self.close()
        finally:
            await drop_database(self.admin_dsn, self.database)

    async def close(self) -> None:
        return None

    def cases(self, serial_name: str, bulk_name: str) -> tuple[Case, Case]:
        w = self.workload
        return (
            ContenderCase(
                self, serial_name, SERIAL, self.serial_call, w.serial_calls, 1, w.warmup_calls
            ),
            ContenderCase(
                self,
                bulk_name,
                BULK.format(size=w.batch_size),
                self.bulk_call,
                w.batches,
                w.batch_size,
                1,
            ),
        )

    def batch_range(self, i: int) -> range:
        size = self.workload.batch_size
        return range(i * size, (i + 1) * size)


# --- raw pgmq: the ceiling ----------------------------------------------------------------------

RAW_SEND = "SELECT pgmq.send($1::text, $2::jsonb, $3::jsonb, $4::integer)"
RAW_SEND_BATCH = "SELECT * FROM pgmq.send_batch($1::text, $2::jsonb[], $3::jsonb[], $4::integer)"


def envelope(i: int) -> str:
    """pgtasks' envelope for job ``i``: the raw contenders send the same bytes."""
    return orjson.dumps({"v": 1, "task": TASK, "kwargs": job_kwargs(i)}).decode()


class RawPgmq(Contender):
    """Plain ``pgmq.send`` / ``pgmq.send_batch`` on one asyncpg connection, in the pgtasks
    database (pgmq installed by pgtasks' migration): the least work an enqueue can do."""

    label = "raw pgmq"

    def __init__(self, pgtasks: PgTasks) -> None:
        super().__init__(pgtasks.admin_dsn, pgtasks.workload)
        self._pgtasks = pgtasks
        self._conn: asyncpg.Connection | None = None

    async def setup(self) -> None:  # shares the pgtasks database, which pgtasks drops
        self.dsn = self._pgtasks.dsn
        self._conn = await asyncpg.connect(self.dsn)
        self._admin = await asyncpg.connect(self.dsn)
        await self._conn.execute("SELECT pgmq.create('raw')")

    async def empty(self, admin: asyncpg.Connection) -> None:
        await admin.execute("SELECT pgmq.purge_queue('raw')")

    async def serial_call(self, i: int) -> object:
        assert self._conn is not None
        return await self._conn.fetchval(RAW_SEND, "raw", envelope(i), None, 0)

    async def bulk_call(self, i: int) -> object:
        assert self._conn is not None
        bodies = [envelope(j) for j in self.batch_range(i)]
        return await self._conn.fetch(RAW_SEND_BATCH, "raw", bodies, None, 0)

    async def teardown(self) -> None:
        for conn in (self._conn, self._admin):
            if conn is not None:
                await conn.close()


# --- pgtasks ------------------------------------------------------------------------------------


class PgTasks(Contender):
    """pgtasks ``task.defer()`` / ``app.defer_many()`` through an App with a pool of one."""

    label = "pgtasks"
    database = "bench_enqueue_pgtasks"
    app: pgtasks.App | None = None

    async def install(self) -> None:
        self.app = pgtasks.App(self.dsn, pool_min_size=1, pool_max_size=1)
        self.task = self.app.task(name=TASK, queue=QUEUE)(bench_noop)
        await self.app.migrate()

    async def empty(self, admin: asyncpg.Connection) -> None:
        await admin.execute("SELECT pgmq.purge_queue($1)", QUEUE)

    async def serial_call(self, i: int) -> object:
        return await self.task.defer(**job_kwargs(i))

    async def bulk_call(self, i: int) -> object:
        assert self.app is not None
        return await self.app.defer_many(self.task.s(**job_kwargs(j)) for j in self.batch_range(i))

    async def close(self) -> None:
        if self.app is not None:
            await self.app.close()


# --- PgQueuer -----------------------------------------------------------------------------------


class PgQueuer(Contender):
    """PgQueuer's ``Queries.enqueue`` over its asyncpg driver (one connection)."""

    label = "PgQueuer"
    database = "bench_enqueue_pgqueuer"
    queries: Any = None
    _conn: asyncpg.Connection | None = None
    _truncate = ""

    async def install(self) -> None:
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        self._conn = await asyncpg.connect(self.dsn)
        self.queries = Queries(AsyncpgDriver(self._conn))
        await self.queries.install()
        qualified = self.queries.qbq.qualified
        self._truncate = f"TRUNCATE {qualified.queue_table}, {qualified.queue_table_log}"

    async def empty(self, admin: asyncpg.Connection) -> None:
        await admin.execute(self._truncate)

    async def serial_call(self, i: int) -> object:
        return await self.queries.enqueue(TASK, orjson.dumps(job_kwargs(i)), 0)

    async def bulk_call(self, i: int) -> object:
        batch = self.batch_range(i)
        return await self.queries.enqueue(
            [TASK] * len(batch),
            [orjson.dumps(job_kwargs(j)) for j in batch],
            [0] * len(batch),
        )

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


# --- Procrastinate ------------------------------------------------------------------------------


class Procrastinate(Contender):
    """Procrastinate's ``defer_async`` / ``batch_defer_async`` over its async psycopg
    connector (a pool of one connection)."""

    label = "Procrastinate"
    database = "bench_enqueue_procrastinate"
    app: Any = None
    task: Any = None

    async def install(self) -> None:
        import procrastinate

        # it warns that the app lives in __main__, which is what a benchmark script does
        logging.getLogger("procrastinate").setLevel(logging.ERROR)
        self.app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(conninfo=self.dsn, min_size=1, max_size=1)
        )

        self.task = self.app.task(name=TASK, queue=QUEUE)(bench_noop)
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()

    async def empty(self, admin: asyncpg.Connection) -> None:
        await admin.execute("TRUNCATE procrastinate_jobs CASCADE")

    async def serial_call(self, i: int) -> object:
        return await self.task.defer_async(**job_kwargs(i))

    async def bulk_call(self, i: int) -> object:
        return await self.task.batch_defer_async(*(job_kwargs(j) for j in self.batch_range(i)))

    async def close(self) -> None:
        if self.app is not None:
            await self.app.close_async()


# --- main ---------------------------------------------------------------------------------------

CONTENDERS = ("pgtasks", "raw", "pgqueuer", "procrastinate")

# case names, used in the tables and to pair the ratios
PGTASKS_SERIAL, PGTASKS_BULK = "pgtasks task.defer()", "pgtasks app.defer_many()"
RAW_SERIAL, RAW_BULK = "raw pgmq.send (ceiling)", "raw pgmq.send_batch (ceiling)"
PGQ_SERIAL, PGQ_BULK = "PgQueuer 1.6 enqueue", "PgQueuer 1.6 enqueue(lists)"
PROC_SERIAL, PROC_BULK = "Procrastinate 3.10 defer_async", "Procrastinate 3.10 batch_defer_async"


@dataclass(frozen=True)
class Ratio:
    label: str
    numerator: str
    denominator: str
    target: float | None = None


RATIOS = (
    Ratio("pgtasks serial / raw pgmq.send", PGTASKS_SERIAL, RAW_SERIAL, 0.90),
    Ratio("pgtasks defer_many / raw send_batch", PGTASKS_BULK, RAW_BULK, 0.70),
    Ratio("pgtasks serial / PgQueuer serial", PGTASKS_SERIAL, PGQ_SERIAL),
    Ratio("pgtasks defer_many / PgQueuer bulk", PGTASKS_BULK, PGQ_BULK),
    Ratio("pgtasks serial / Procrastinate serial", PGTASKS_SERIAL, PROC_SERIAL),
    Ratio("pgtasks defer_many / Procrastinate bulk", PGTASKS_BULK, PROC_BULK),
)


def ratios_table(results: Sequence[CaseResult], ratios: Sequence[Ratio]) -> str:
    """Throughput ratios, paired round by round; "met"/"MISSED" against a target."""
    by_name = {r.case.name: r for r in results}
    rows = []
    for ratio in ratios:
        num, den = by_name.get(ratio.numerator), by_name.get(ratio.denominator)
        if num is None or den is None:
            continue
        s = paired_ratio(num, den)
        verdict = "-"
        if ratio.target is not None:
            verdict = f">= {ratio.target:.2f}: " + ("met" if s.median >= ratio.target else "MISSED")
        rows.append([ratio.label, fmt_ratio(s), verdict])
    if not rows:
        return ""
    return markdown_table(
        ["ratio of throughputs (paired by round)", "median (min-max)", "target"], rows
    )


def contenders(
    admin_dsn: str, workload: Workload, only: set[str]
) -> list[tuple[str, Contender, str, str]]:
    """(key, contender, serial case name, bulk case name) for the selected contenders."""
    pgtasks = PgTasks(admin_dsn, workload)
    wanted: list[tuple[str, Contender, str, str]] = []
    if only & {"pgtasks", "raw"}:  # raw pgmq runs in the pgtasks database
        wanted.append(("pgtasks", pgtasks, PGTASKS_SERIAL, PGTASKS_BULK))
    if "raw" in only:
        wanted.append(("raw", RawPgmq(pgtasks), RAW_SERIAL, RAW_BULK))
    if "pgqueuer" in only:
        wanted.append(("pgqueuer", PgQueuer(admin_dsn, workload), PGQ_SERIAL, PGQ_BULK))
    if "procrastinate" in only:
        wanted.append(("procrastinate", Procrastinate(admin_dsn, workload), PROC_SERIAL, PROC_BULK))
    return wanted


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_common_arguments(parser)
    parser.add_argument(
        "--n", type=int, default=5000, help="serial calls per round (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=1000, help="jobs per bulk call (default: %(default)s)"
    )
    parser.add_argument(
        "--batches", type=int, default=20, help="bulk calls per round (default: %(default)s)"
    )
    parser.add_argument(
        "--slices",
        type=int,
        default=10,
        help="turns per case per round; the cases alternate slice by slice (default: %(default)s)",
    )
    parser.add_argument(
        "--only", default=",".join(CONTENDERS), help="comma-separated subset of %(default)s"
    )
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        default=None,
        help="set synchronous_commit on every scratch database (default: the server's); "
        "'off' takes the WAL flush out of every commit, leaving client and SQL overhead",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-round progress")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    if min(args.n, args.batch_size, args.batches, args.runs, args.slices) < 1:
        parser.error("--n, --batch-size, --batches, --runs and --slices must be positive")
    return args


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(","))
    settings = {"synchronous_commit": args.synchronous_commit} if args.synchronous_commit else {}
    workload = Workload(args.n, args.batch_size, args.batches, settings=settings)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    print(f"machine:  {machine_description()}")
    print(f"server:   {await server_description(args.dsn)}")
    if settings:
        print(f"scratch databases: {', '.join(f'{k}={v}' for k, v in settings.items())}")
    print(
        f"workload: serial {workload.serial_calls:,} calls/round; bulk {workload.batches} x "
        f"{workload.batch_size:,} jobs/round; {args.runs} round(s), cases interleaved in "
        f"{args.slices} slices per round\n"
    )

    notes: list[str] = []
    ready: list[Contender] = []
    serial: list[Case] = []
    bulk: list[Case] = []
    try:
        for key, contender, serial_name, bulk_name in contenders(args.dsn, workload, only):
            try:
                await contender.setup()
                ready.append(contender)
                if key not in only:
                    continue
                serial_case, bulk_case = contender.cases(serial_name, bulk_name)
                await serial_case.prepare()
                await bulk_case.prepare()
            except Exception as exc:  # a competitor that will not run is reported, not faked
                if key in ("pgtasks", "raw"):
                    raise
                notes.append(f"{contender.label} left out: {type(exc).__name__}: {exc}")
                log(traceback.format_exc())
                continue
            serial.append(serial_case)
            bulk.append(bulk_case)
        # each comparison is interleaved within itself; bulk slices (thousands of rows of WAL
        # each) would otherwise slow the commits of the serial slices that follow them
        results = [
            *await run_interleaved(serial, args.runs, slices=args.slices, progress=log),
            *await run_interleaved(bulk, args.runs, slices=args.slices, progress=log),
        ]
    finally:
        for case in [*serial, *bulk]:
            await case.close()
        for contender in reversed(ready):
            try:
                await contender.teardown()
            except Exception as exc:
                log(f"teardown of {contender.label} failed: {exc!r}")

    print(results_table(results))
    table = ratios_table(results, RATIOS)
    if table:
        print()
        print(table)
    for note in notes:
        print(f"\nnote: {note}")
    print(f"\nload average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
