"""``pgtasks worker``: the only code in pgtasks that installs signal handlers.

It waits for a database that is not up yet (``--connect-timeout``), checks the schema, logs
one line per finished job (a subscriber of the worker's events), and stops gracefully on
SIGTERM or SIGINT, at once on a second one. Its default shutdown timeout (20 s) plus the
final flush of outcomes (at most 10 s) fits Kubernetes' default grace period of 30 s. A
burst worker exits 1 when a queue could not be served; a worker whose job ignored
cancellation exits instead of hanging.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg

from ..admin import queues
from ..app import App
from ..db import errors, schema
from ..exceptions import DatabaseUnavailable
from ..worker import WORKER_OPTIONS, JobEvent, Worker
from .supervisor import SUPERVISOR_PID, supervise

if TYPE_CHECKING:
    from ..integrations.prometheus import Metrics

logger = logging.getLogger("pgtasks")
job_logger = logging.getLogger("pgtasks.jobs")

_LATER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    DatabaseUnavailable,
)


def log_job(event: JobEvent) -> None:
    """The worker command's event subscriber: one INFO line per finished job."""
    if event.kind in ("started", "failed"):  # a failed attempt is followed by retried/dead
        return
    took = f" in {event.duration:.3f}s" if event.duration is not None else ""
    if event.kind == "succeeded":
        outcome = f"succeeded{took}" + (f" ({event.reason})" if event.reason else "")
    elif event.kind == "retried":
        outcome = f"failed{took}, retrying in {event.retry_in or 0:.1f}s"
    elif event.kind == "dead":
        outcome = f"failed{took}, moved to the dead letters" if took else "dead-lettered"
    elif event.kind in ("cancelled", "expired"):
        outcome = event.kind + (f" ({event.reason})" if event.reason else "")
    else:
        outcome = "lost its lease, not acked"
    job_logger.info(
        "%s[%d] queue=%s attempt=%d %s",
        event.task or "?",
        event.msg_id,
        event.queue,
        event.attempt,
        outcome,
    )


def run_worker(app: App, args: argparse.Namespace) -> int:
    if args.processes > 1:
        return supervise(
            args.argv,
            args.processes,
            burst=args.burst,
            shutdown_timeout=args.shutdown_timeout,
        )
    options: dict[str, Any] = {name: getattr(args, name) for name in WORKER_OPTIONS}
    worker = app.worker(**options)
    if args.log_jobs:
        worker.subscribe(log_job)
    metrics = None
    if args.metrics_port is not None:
        from ..integrations.prometheus import Metrics  # the metrics extra, only when asked

        metrics = Metrics(app)
        metrics.watch(worker)
    status: int = asyncio.run(_serve(app, worker, args, metrics))
    return status


async def _serve(
    app: App, worker: Worker, args: argparse.Namespace, metrics: Metrics | None = None
) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        force = signals > 1
        stopping.set()
        logger.info(
            "%s received, %s",
            signal.Signals(signum).name,
            "stopping now"
            if force
            else f"finishing running jobs for up to {worker.shutdown_timeout:g}s "
            "(SIGTERM or Ctrl-C again: stop now)",
        )
        worker.stop(force=force)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    stack = contextlib.ExitStack()
    orphaned = _watch_supervisor(on_signal)
    try:
        if not await connect(app, args.connect_timeout, stopping):
            logger.info("stopped before the worker started")
            return 0
        await schema.check_installed(await app.pool())
        if metrics is not None:
            server = await metrics.serve(args.metrics_port, args.metrics_host)
            logger.info("metrics at http://%s:%d/metrics", args.metrics_host, args.metrics_port)
            stack.callback(server.close)
        await worker.run()
        if args.burst and not stopping.is_set():
            await _log_later(app, worker.queues)
        failed = worker.failed_queues
        if args.burst and failed:
            for queue, error in failed.items():
                logger.error("queue %s could not be served: %s", queue, error)
            return 1
        return 0
    finally:
        stack.close()
        if orphaned is not None:
            orphaned.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        with anyio.move_on_after(10):  # a job that ignored cancellation may hold a connection
            await app.close()
        if worker.abandoned:
            # such a job cannot be stopped from here, and asyncio.run would wait for it
            # forever: its message is handed back already, so the process ends now
            logger.error(
                "%d job(s) ignored cancellation; exiting without waiting for them",
                worker.abandoned,
            )
            logging.shutdown()
            os._exit(1)


def _watch_supervisor(stop: Callable[[int], None]) -> asyncio.Task[None] | None:
    """In a worker process of ``--processes N``: stop gracefully, as on SIGTERM, once the
    supervisor is gone (killed with SIGKILL, say: it cannot forward anything then)."""
    supervisor = os.environ.get(SUPERVISOR_PID)
    if supervisor is None or not supervisor.isdigit():
        return None

    async def watch() -> None:
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != int(supervisor):
                break
        logger.warning("the supervisor (pid %s) is gone; stopping", supervisor)
        stop(signal.SIGTERM)

    return asyncio.get_running_loop().create_task(watch())


async def connect(app: App, timeout: float, stopping: asyncio.Event) -> bool:  # noqa: ASYNC109
    """Open the app's pool, trying again with backoff (1 s, 2 s, ... at most 10 s) while the
    database is unreachable for a reason that may pass (refused, starting up, too many
    clients), for at most ``timeout`` seconds. False when ``stopping`` is set meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 1.0
    while True:
        try:
            await app.pool()
            return True
        except DatabaseUnavailable as exc:
            cause = exc.__cause__
            if cause is not None and not errors.is_transient(cause):
                raise  # a wrong password or database does not fix itself
            left = deadline - loop.time()
            if left <= 0:
                if timeout == 0:
                    raise
                raise DatabaseUnavailable(
                    f"{exc} (gave up after --connect-timeout {timeout:g}s)"
                ) from exc
            wait = min(delay, left)
            logger.warning("%s; trying again in %.0fs", exc, wait)
            try:
                await asyncio.wait_for(stopping.wait(), wait)
                return False
            except asyncio.TimeoutError:
                delay = min(delay * 2, 10.0)


async def _log_later(app: App, names: Sequence[str]) -> None:
    """After a burst: the jobs that are not visible yet, so that an exit is not mistaken for
    'all done'."""
    try:
        count, due, seconds = await queues.later(app.database, names)
    except _LATER_ERRORS as exc:
        logger.warning("burst: could not count the jobs that wait for later: %s", exc)
        return
    if count and due is not None:
        logger.info(
            "burst: %d job(s) wait for later (delayed, retrying or leased); the next is due "
            "at %s UTC, in %.1fs",
            count,
            f"{due.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S}",
            max(seconds or 0.0, 0.0),
        )
