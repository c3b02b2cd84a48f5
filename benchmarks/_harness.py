"""Shared benchmark harness: scratch databases, timing, interleaved rounds, summaries, tables.

Every benchmark in this directory is a set of *cases* (one contender doing one kind of work,
e.g. "pgtasks, serial defer") measured in rounds. Within a round the cases take turns in
short slices, in an order that rotates every slice, so background drift (autovacuum,
checkpoints, other processes on a shared machine) lands on every contender alike. A case
yields one `Measurement` per round; tables show the median over rounds and the min-max
range, and ratios are taken round by round (paired) before summarising.

Only the standard library and asyncpg are used here, so the worker/drain benchmark can reuse
it without pulling in the competitors.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

DEFAULT_DSN = "postgresql://root@127.0.0.1:5432/test"


def default_dsn() -> str:
    """The admin DSN: ``PGTASKS_BENCH_DSN``, else ``PGTASKS_DSN``, else a local server."""
    return os.environ.get("PGTASKS_BENCH_DSN") or os.environ.get("PGTASKS_DSN") or DEFAULT_DSN


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dsn`` and ``--runs``, shared by every benchmark."""
    parser.add_argument(
        "--dsn",
        default=default_dsn(),
        help="admin DSN; scratch databases are created (and dropped) on that server "
        "(default: $PGTASKS_BENCH_DSN, $PGTASKS_DSN or %(default)s)",
    )
    parser.add_argument("--runs", type=int, default=3, help="rounds per case (default: 3)")


# --- scratch databases ------------------------------------------------------------------------


def with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at another database on the same server."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_SETTING = re.compile(r"[a-z_][a-z0-9_.]*")


async def create_database(
    admin_dsn: str, name: str, settings: Mapping[str, str] | None = None
) -> str:
    """(Re)create an empty database ``name``, with per-database ``settings`` (``ALTER
    DATABASE ... SET``, so every connection of every client library gets them); returns its
    DSN."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
        for key, value in (settings or {}).items():
            if not (_SETTING.fullmatch(key) and _SETTING.fullmatch(value)):
                raise ValueError(f"unsupported setting {key}={value}")
            await conn.execute(f"ALTER DATABASE {_quote_ident(name)} SET {key} = {value}")
    finally:
        await conn.close()
    return with_database(admin_dsn, name)


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


@asynccontextmanager
async def scratch_database(
    admin_dsn: str, name: str, settings: Mapping[str, str] | None = None, *, keep: bool = False
) -> AsyncIterator[str]:
    """A fresh database for the duration of the block, dropped afterwards unless ``keep``."""
    dsn = await create_database(admin_dsn, name, settings)
    try:
        yield dsn
    finally:
        if not keep:
            await drop_database(admin_dsn, name)


async def server_description(dsn: str) -> str:
    """``PostgreSQL 15.x`` plus the settings that move enqueue numbers most, as a connection
    to ``dsn`` sees them."""
    conn = await asyncpg.connect(dsn)
    try:
        version = await conn.fetchval("SHOW server_version")
        settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("synchronous_commit", "fsync", "shared_buffers")
        }
    finally:
        await conn.close()
    extra = ", ".join(f"{k}={v}" for k, v in settings.items())
    return f"PostgreSQL {version} ({extra})"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ("n/a" where the OS has none)."""
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def machine_description() -> str:
    cores = os.cpu_count() or 0
    return (
        f"{platform.system()} {platform.machine()}, {cores} cores, load average "
        f"{load_average()}; Python {platform.python_version()}"
    )


# --- measuring --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One round of one case: ``items`` jobs in ``seconds``; per-call latencies (seconds)."""

    items: int
    seconds: float
    latencies: Sequence[float] = ()

    @property
    def throughput(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else math.inf

    def latency_percentile(self, q: float) -> float:
        return percentile(self.latencies, q)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest-rank on sorted values; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class Summary:
    """Median and range over rounds."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values))


# --- cases and interleaved rounds -------------------------------------------------------------


class Case(Protocol):
    """One contender doing one kind of work: ``calls`` timed calls per round, each enqueueing
    ``items_per_call`` jobs.

    ``group`` names the comparison it belongs to (rows of one group are printed together).
    ``prepare`` runs once (connect, warm statement caches); ``reset`` runs before every round,
    untimed (e.g. empty the queue table, so every round starts from the same state); ``call``
    is one timed call, ``i`` counting from 0 within the round; ``close`` runs once at the end.
    """

    name: str
    group: str
    calls: int
    items_per_call: int

    async def prepare(self) -> None: ...
    async def reset(self) -> None: ...
    async def call(self, i: int) -> object: ...
    async def close(self) -> None: ...


@dataclass
class CaseResult:
    case: Case
    rounds: list[Measurement] = field(default_factory=list)

    def throughput(self) -> Summary:
        return Summary.of([m.throughput for m in self.rounds])

    def latency(self, q: float) -> Summary | None:
        values = [m.latency_percentile(q) for m in self.rounds if m.latencies]
        return Summary.of(values) if values else None


T = TypeVar("T")


def rotated(items: Sequence[T], by: int) -> list[T]:
    """``items`` rotated left by ``by`` places."""
    if not items:
        return []
    k = by % len(items)
    return [*items[k:], *items[:k]]


async def _timed_calls(case: Case, start: int, stop: int, latencies: list[float]) -> float:
    """Run calls ``start..stop-1`` of ``case`` one at a time; returns the elapsed seconds and
    appends each call's latency."""
    clock = time.perf_counter
    began = clock()
    for i in range(start, stop):
        t0 = clock()
        await case.call(i)
        latencies.append(clock() - t0)
    return clock() - began


async def run_interleaved(
    cases: Sequence[Case],
    runs: int,
    *,
    slices: int = 10,
    progress: Callable[[str], None] | None = None,
) -> list[CaseResult]:
    """Measure every case ``runs`` times (rounds). Within a round, each case's calls are
    split into ``slices`` consecutive slices and the cases take turns slice by slice, in an
    order that rotates every slice: a disturbance lasting a second or two (a checkpoint, a
    neighbour's test run) is shared by every case instead of landing on one. Every case is
    reset before a round. Returns one result per case, in the order given."""
    results = [CaseResult(c) for c in cases]
    for r in range(runs):
        for case in cases:
            await case.reset()
        seconds = [0.0] * len(cases)
        latencies: list[list[float]] = [[] for _ in cases]
        for s in range(slices):
            for k in rotated(range(len(cases)), r * slices + s):
                case = cases[k]
                start, stop = case.calls * s // slices, case.calls * (s + 1) // slices
                seconds[k] += await _timed_calls(case, start, stop, latencies[k])
        for k, case in enumerate(cases):
            m = Measurement(case.calls * case.items_per_call, seconds[k], latencies[k])
            results[k].rounds.append(m)
            if progress is not None:
                progress(
                    f"round {r + 1}/{runs}  {case.group:<28} {case.name:<38} "
                    f"{m.throughput:>10,.0f} jobs/s"
                )
    return results


def paired_ratio(numerator: CaseResult, denominator: CaseResult) -> Summary:
    """Round-by-round throughput ratio (rounds are paired: same round, same conditions),
    summarised over rounds."""
    return Summary.of(
        [
            a.throughput / b.throughput
            for a, b in zip(numerator.rounds, denominator.rounds, strict=True)
        ]
    )


# --- printing ---------------------------------------------------------------------------------


def fmt_rate(s: Summary) -> str:
    return f"{s.median:,.0f} ({s.low:,.0f}-{s.high:,.0f})"


def fmt_ms(s: Summary | None) -> str:
    if s is None or math.isnan(s.median):
        return "-"
    return f"{s.median * 1e3:.2f} ({s.low * 1e3:.2f}-{s.high * 1e3:.2f})"


def fmt_ratio(s: Summary) -> str:
    return f"{s.median:.2f} ({s.low:.2f}-{s.high:.2f})"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table, columns padded for reading in a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def results_table(results: Sequence[CaseResult], *, latency_label: str = "per call") -> str:
    """Throughput and p50/p99 latency per case: median over rounds (min-max)."""
    headers = [
        "benchmark",
        "contender",
        "jobs/s, median (min-max)",
        f"p50 ms {latency_label}",
        f"p99 ms {latency_label}",
    ]
    rows = [
        [
            r.case.group,
            r.case.name,
            fmt_rate(r.throughput()),
            fmt_ms(r.latency(50)),
            fmt_ms(r.latency(99)),
        ]
        for r in results
    ]
    return markdown_table(headers, rows)
