"""Scale benchmark (issue 18): many queues, short jobs, many workers, a deep backlog, and a
long transaction holding back vacuum.

    python benchmarks/scale.py [--dsn DSN] [--runs 3] [--sections queues,short,...] [--quick]

pgtasks only, through its public API (``App``, ``defer``/``defer_many``, ``app.worker``,
``python -m pgtasks worker``, the status API), with raw SQL for setup and raw pgmq as the
reference where the issue asks for one. Each section has its own scratch database
(``bench_scale``, created and dropped here) and prints its own table: medians over rounds
with the min-max range, and the issue's target beside the figure.

1. **queues**: one worker serving N queues (1, 10, 100, 1000), one busy, the rest empty:
   drain rate at concurrency 100, defer->start latency on an idle worker, serial defer rate
   round-robin over the N queues, and one status snapshot.
2. **short**: 1 ms jobs kept ~4,000 deep by a producer process, at concurrency 16 and 4,
   against a plain pgmq consumer; jobs/s and the share of the slot limit.
3. **workers**: 1, 2, 4, 8 worker processes on one backlog: total drain rate; raw pgmq
   consumer processes for reference.
4. **backlog**: a million waiting jobs, then a million scheduled a day ahead: drain rate,
   the latency of fresh jobs beside them, and how long the status snapshot takes.
5. **vacuum**: a 500 jobs/s stream while REPEATABLE READ transactions hold a snapshot:
   throughput, latency and the queue table's dead tuples before, during and after.

The sections live in ``_scale_queues.py`` (1, 2, 3) and ``_scale_deep.py`` (4, 5).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import add_common_arguments, machine_description, server_description
from _scale_common import Sizes
from _scale_deep import section_backlog, section_vacuum
from _scale_queues import section_queues, section_short, section_workers

SECTIONS = {
    "queues": section_queues,
    "short": section_short,
    "workers": section_workers,
    "backlog": section_backlog,
    "vacuum": section_vacuum,
}


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_common_arguments(parser)
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset of %(default)s"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and one round, a smoke run of about a minute for all sections",
    )
    add = parser.add_argument
    add("--queue-counts", type=int_list, help="queues: N values (default 1,10,100,1000)")
    add("--drain-jobs", type=int, help="queues: jobs per drain (default 20000)")
    add("--drain-cap", type=float, help="queues: longest drain, seconds (default 30)")
    add("--defers", type=int, help="queues: serial defers per case (default 2000)")
    add("--duration", type=float, help="short: seconds measured per case (default 20)")
    add("--level", type=int, help="short: jobs kept waiting (default 4000)")
    add("--worker-counts", type=int_list, help="workers: processes (default 1,2,4,8)")
    add("--size", type=int, help="workers: the backlog drained (default 50000)")
    add("--backlog", type=int, help="backlog: waiting / scheduled jobs (default 1000000)")
    add("--backlog-seconds", type=float, help="backlog: seconds measured (default 15)")
    add("--hold", type=float, help="vacuum: seconds the snapshot is held (default 60)")
    add("--phase", type=float, help="vacuum: seconds before and after the hold (default 15)")
    add("--readers", type=int_list, help="vacuum: REPEATABLE READ readers, cases (default 1,4)")
    add("--rate", type=float, help="vacuum: the stream, jobs/s (default 500)")
    add("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown --sections: {', '.join(sorted(unknown))}")
    if args.quick and "--runs" not in " ".join(argv or sys.argv):
        args.runs = 1
    if args.runs < 1:
        parser.error("--runs must be positive")
    return args


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = Sizes.from_args(args)
    logging.basicConfig(level=logging.WARNING)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    print(f"machine:  {machine_description()}")
    print(f"server:   {await server_description(args.dsn)}")
    print(f"rounds:   {args.runs}{' (--quick sizes)' if args.quick else ''}\n")
    began = time.perf_counter()
    missed = 0
    for name in args.sections.split(","):
        log(f"== {name}")
        section_began = time.perf_counter()
        missed += await SECTIONS[name](args.dsn, args.runs, sizes, log)
        print(f"({name}: {time.perf_counter() - section_began:.0f} s)\n")
    print(f"machine at the end: {machine_description()}")
    print(f"(total time {time.perf_counter() - began:.0f} s; targets missed: {missed})")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
