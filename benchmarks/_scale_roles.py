"""The helper processes of ``benchmarks/scale.py``: producers and raw pgmq consumers that
must not share the measured worker's event loop (or its core).

    python benchmarks/_scale_roles.py topup   DSN QUEUE {pgtasks,raw} LEVEL
    python benchmarks/_scale_roles.py stream  DSN RATE
    python benchmarks/_scale_roles.py consume DSN QUEUE BATCH

* **topup** keeps about ``LEVEL`` visible jobs in ``QUEUE`` (``scale.short`` jobs: through
  ``app.defer_many``, or the same envelopes through ``pgmq.send_batch`` for ``raw``),
  looking every 10 ms; it prints ``ready`` once the level is first reached.
* **stream** defers ``scale.stream(sent=time.time())`` at ``RATE`` jobs/s in batches of
  one 50th of a second (``app.defer_many``); it prints ``ready`` after its first batch.
* **consume** is the raw pgmq consumer: it prints ``ready`` once connected, waits for a
  line on stdin (the go), then loops ``pgmq.read(QUEUE, 30, BATCH)`` + ``pgmq.archive`` of
  the batch, and polls every 10 ms when the queue is empty.

Each runs until SIGTERM (or SIGINT) and then exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import asyncpg
import orjson
from _scale_tasks import make

CHECK_EVERY = 0.01  # seconds between two looks at the queue (topup, consume)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _ready() -> None:
    print("ready", flush=True)


async def topup(dsn: str, queue: str, mode: str, level: int) -> None:
    stop = _stop_event()
    bench = make(dsn)
    conn = await asyncpg.connect(dsn)
    count = f"SELECT count(*) FROM pgmq.q_{queue} WHERE vt <= clock_timestamp()"
    i, announced = 0, False
    try:
        while not stop.is_set():
            missing = level - await conn.fetchval(count)
            if missing > level // 20:  # top up in batches, not job by job
                ids = range(i, i + missing)
                i += missing
                if mode == "raw":
                    bodies = [
                        orjson.dumps({"v": 1, "task": "scale.short", "kwargs": {"i": k}}).decode()
                        for k in ids
                    ]
                    await conn.execute("SELECT pgmq.send_batch($1, $2::jsonb[])", queue, bodies)
                else:
                    call = bench.short.options(queue=queue)
                    await bench.app.defer_many(call.s(k) for k in ids)
            elif not announced:
                announced = True
                _ready()
            await asyncio.sleep(CHECK_EVERY)
    finally:
        await conn.close()
        await bench.app.close()


async def stream(dsn: str, rate: float) -> None:
    stop = _stop_event()
    bench = make(dsn)
    per_tick = max(1, round(rate / 50))
    interval = per_tick / rate
    began = time.perf_counter()
    k = 0
    try:
        while not stop.is_set():
            await bench.app.defer_many(bench.stream.s(time.time()) for _ in range(per_tick))
            if k == 0:
                _ready()
            k += 1
            pause = began + k * interval - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)
            elif pause < -1.0:  # fell a second behind: say so rather than burst to catch up
                print(f"behind by {-pause:.1f}s", file=sys.stderr, flush=True)
                began, k = time.perf_counter(), 0
    finally:
        await bench.app.close()


async def consume(dsn: str, queue: str, batch: int) -> None:
    stop = _stop_event()
    conn = await asyncpg.connect(dsn)
    _ready()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    read = f"SELECT msg_id FROM pgmq.read($1::text, 30, {int(batch)})"
    try:
        while not stop.is_set():
            rows = await conn.fetch(read, queue)
            if not rows:
                await asyncio.sleep(CHECK_EVERY)
                continue
            await conn.execute(
                "SELECT pgmq.archive($1::text, $2::bigint[])", queue, [r[0] for r in rows]
            )
    finally:
        await conn.close()


def main(argv: list[str]) -> None:
    role, dsn, *rest = argv
    if role == "topup":
        asyncio.run(topup(dsn, rest[0], rest[1], int(rest[2])))
    elif role == "stream":
        asyncio.run(stream(dsn, float(rest[0])))
    elif role == "consume":
        asyncio.run(consume(dsn, rest[0], int(rest[1])))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
