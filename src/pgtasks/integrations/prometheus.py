"""Prometheus metrics of pgtasks workers and queues (the ``metrics`` extra:
``pip install 'pgtasks[metrics]'``, which installs ``prometheus-client``).

::

    from pgtasks.integrations.prometheus import Metrics

    metrics = Metrics(app)               # its own registry, unless you pass one
    worker = app.worker()
    metrics.watch(worker)                # job counters and run times, from its events
    api.mount("/metrics", metrics.asgi_app())   # or: await metrics.serve(9100)

``pgtasks worker --metrics-port 9100`` does the same for the command line's worker.

What is measured (names and labels in docs/operations.md, "Metrics"):

* from a watched worker's events: ``pgtasks_jobs_total{queue, task, outcome}`` (one outcome
  per attempt that ended: succeeded, retried, failed, dead_lettered, lost, and cancelled or
  expired where the worker reports those) and ``pgtasks_job_run_seconds{queue, task}``;
* from an execute hook on the app (so every worker of it, watched or not):
  ``pgtasks_jobs_running{queue}`` and ``pgtasks_job_queue_wait_seconds{queue, task}`` (from
  ``enqueued_at`` to the start of a first attempt, on the worker's clock);
* at each scrape, from one status query (`pgtasks.admin.status`) cached for
  ``cache_seconds``: every queue's jobs by state, its oldest waiting job, its dead letters and
  its live workers.

Task labels are the app's registered task names; a message naming any other task counts as
``task="(unknown)"``, so a producer cannot blow up the label set. Nothing of this runs unless
a `Metrics` is made: an app without one pays nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on what is installed
    from ..exceptions import ConfigurationError

    raise ConfigurationError(
        "pgtasks' Prometheus metrics need the prometheus-client package: "
        "pip install 'pgtasks[metrics]'"
    ) from exc

from ..admin import status as admin_status
from ..admin.status import Status
from ..app import App
from ..context import JobContext
from ..hooks import ExecuteNext
from ..worker import JobEvent, Worker

logger = logging.getLogger("pgtasks")

UNKNOWN_TASK = "(unknown)"
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)
STATES = ("waiting", "scheduled", "running", "retrying")

# event kind -> outcome label; "dead" is split by whether the job ran (see `outcome`)
_OUTCOMES = {
    "succeeded": "succeeded",
    "retried": "retried",
    "lost": "lost",
    "cancelled": "cancelled",
    "expired": "expired",
}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def outcome(event: JobEvent) -> str | None:
    """The outcome label of an event that ends an attempt, else None (``started``,
    ``failed``: a failed attempt ends as ``retried`` or in the dead letters)."""
    if event.kind == "dead":
        # moved after a run that failed, or without running (a poison message)
        return "failed" if event.duration is not None else "dead_lettered"
    return _OUTCOMES.get(event.kind)


class Metrics:
    """The metrics of one app's workers and queues, in a Prometheus registry.

    Args:
        app: the app whose jobs are measured (its execute hooks get one hook) and whose
            database the queue gauges read.
        registry: where the metrics are registered; default a registry of its own (pass
            ``prometheus_client.REGISTRY`` to expose them with your other metrics).
        queue_stats: also expose every queue's state, read from the database at scrape
            time (one query per ``cache_seconds``); turn it off in all but one place when
            many processes are scraped, or aggregate with ``max by (queue)``.
        cache_seconds: how long one status query serves scrapes.
        status_timeout: how long a scrape waits for the status query (a database that does
            not answer then shows as ``pgtasks_queue_status_up 0``, and the scrape is
            answered in time).
    """

    def __init__(
        self,
        app: App,
        *,
        registry: CollectorRegistry | None = None,
        queue_stats: bool = True,
        cache_seconds: float = 5.0,
        status_timeout: float = 5.0,
    ) -> None:
        self.app = app
        self.registry = registry if registry is not None else CollectorRegistry()
        self.cache_seconds = cache_seconds
        self.status_timeout = status_timeout
        self.jobs = Counter(
            "pgtasks_jobs",
            "Attempts that ended, by queue, task and outcome (succeeded, retried, failed, "
            "dead_lettered, lost, cancelled, expired).",
            ["queue", "task", "outcome"],
            registry=self.registry,
        )
        self.run_seconds = Histogram(
            "pgtasks_job_run_seconds",
            "Run time of attempts that ran (succeeded or raised), by queue and task.",
            ["queue", "task"],
            buckets=RUN_BUCKETS,
            registry=self.registry,
        )
        self.wait_seconds = Histogram(
            "pgtasks_job_queue_wait_seconds",
            "Seconds from enqueue to the start of a job's first attempt (includes a delay "
            "or eta it was deferred with), by queue and task.",
            ["queue", "task"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.running = Gauge(
            "pgtasks_jobs_running",
            "Jobs running now in this process, by queue.",
            ["queue"],
            registry=self.registry,
        )
        self._snapshot: Status | None = None
        self._snapshot_at = -float("inf")
        self._snapshot_ok = True
        self._refreshing: asyncio.Lock | None = None
        if queue_stats:
            self.registry.register(_QueueCollector(self))
        app.hooks.around_execute(self._around_execute)

    # --- feeding ------------------------------------------------------------------------

    def watch(self, worker: Worker) -> Callable[[], None]:
        """Count the jobs this worker finishes; returns a function that stops it."""
        return worker.subscribe(self.on_event)

    def task_label(self, name: str | None) -> str:
        """The task's name if the app registers it, else ``(unknown)``."""
        return name if name is not None and name in self.app.tasks else UNKNOWN_TASK

    def on_event(self, event: JobEvent) -> None:
        """A worker event (`watch` subscribes this)."""
        if event.kind == "failed" and event.duration is not None:
            self.run_seconds.labels(event.queue, self.task_label(event.task)).observe(
                event.duration
            )
            return
        label = outcome(event)
        if label is None:
            return
        task = self.task_label(event.task)
        self.jobs.labels(event.queue, task, label).inc()
        if event.kind == "succeeded" and event.duration is not None:
            self.run_seconds.labels(event.queue, task).observe(event.duration)

    async def _around_execute(self, job: JobContext, next: ExecuteNext) -> object:
        task = self.task_label(job.task)
        if job.attempt == 1:
            waited = (dt.datetime.now(dt.timezone.utc) - job.enqueued_at).total_seconds()
            self.wait_seconds.labels(job.queue, task).observe(max(waited, 0.0))
        running = self.running.labels(job.queue)
        running.inc()
        try:
            return await next(job)
        finally:
            running.dec()

    # --- the queues -----------------------------------------------------------------------

    async def refresh(self) -> Status | None:
        """The status snapshot the queue gauges show: read again when older than
        ``cache_seconds`` (one query however many scrapes wait for it, for at most
        ``status_timeout``); None if the query failed or timed out (logged;
        ``pgtasks_queue_status_up`` is then 0)."""
        loop_lock = self._refreshing
        if loop_lock is None:
            loop_lock = self._refreshing = asyncio.Lock()
        async with loop_lock:
            if time.monotonic() - self._snapshot_at < self.cache_seconds:
                return self._snapshot if self._snapshot_ok else None
            try:
                self._snapshot = await asyncio.wait_for(
                    admin_status.status(self.app.database), self.status_timeout
                )
                self._snapshot_ok = True
            except asyncio.TimeoutError:
                logger.warning(
                    "metrics: the queue status query took more than %s s: given up",
                    self.status_timeout,
                )
                self._snapshot_ok = False
            except Exception as exc:
                logger.warning("metrics: the queue status query failed: %s", exc)
                self._snapshot_ok = False
            self._snapshot_at = time.monotonic()
            return self._snapshot if self._snapshot_ok else None

    # --- exposing ---------------------------------------------------------------------------

    async def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (refreshing the queue gauges first) and its content type, in the
        format ``accept`` asks for (Prometheus text, or OpenMetrics): for any web
        framework's handler."""
        await self.refresh()
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def asgi_app(self) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        """An ASGI app serving the metrics at any path under where it is mounted
        (``api.mount("/metrics", metrics.asgi_app())``)."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":  # mounted apps do not get one; standalone might
                while (message := await receive())["type"] != "lifespan.shutdown":
                    await send({"type": message["type"] + ".complete"})
                await send({"type": "lifespan.shutdown.complete"})
                return
            if scope["type"] != "http":
                return
            headers = dict(scope.get("headers") or [])
            body, content_type = await self.render(headers.get(b"accept", b"").decode("latin-1"))
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", content_type.encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})

        return app

    async def serve(self, port: int, host: str = "0.0.0.0") -> asyncio.Server:
        """Serve the metrics over HTTP on ``host:port`` (``GET /metrics``, or ``/``) in the
        background of the running event loop, with no web framework; close the returned
        server to stop. What ``worker --metrics-port`` runs."""
        return await asyncio.start_server(self._handle, host, port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                request, *lines = head.decode("latin-1").split("\r\n")
                method, _, rest = request.partition(" ")
                path = rest.partition(" ")[0].partition("?")[0]
                accept = next(
                    (
                        line.partition(":")[2].strip()
                        for line in lines
                        if line.lower().startswith("accept:")
                    ),
                    "",
                )
                if method not in ("GET", "HEAD") or path not in ("/", "/metrics"):
                    status, content_type, body = "404 Not Found", "text/plain", b"not found\n"
                else:
                    body, content_type = await self.render(accept)
                    status = "200 OK"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + (body if method != "HEAD" else b"")
                )
                await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()


class _QueueCollector(Collector):
    """The queue gauges, from the last snapshot `Metrics.refresh` read (collecting never
    queries: it runs in whatever thread renders)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        up = GaugeMetricFamily(
            "pgtasks_queue_status_up",
            "1 if the last queue status query succeeded, else 0.",
            value=1.0 if metrics._snapshot_ok else 0.0,
        )
        yield up
        snapshot = metrics._snapshot if metrics._snapshot_ok else None
        if snapshot is None:
            return
        jobs = GaugeMetricFamily(
            "pgtasks_queue_jobs",
            "Jobs in a queue by state: waiting (visible, held by no worker), scheduled "
            "(deferred for later), running (held by a worker), retrying (waiting out a "
            "backoff). Past 50,000 a count is estimated or a lower bound.",
            labels=["queue", "state"],
        )
        oldest = GaugeMetricFamily(
            "pgtasks_queue_oldest_waiting_seconds",
            "How long the first waiting job in line has been due (0 when none waits).",
            labels=["queue"],
        )
        dead = GaugeMetricFamily(
            "pgtasks_queue_dead_letters", "Jobs in the dead letters, by queue.", labels=["queue"]
        )
        workers = GaugeMetricFamily(
            "pgtasks_queue_workers", "Live workers serving a queue.", labels=["queue"]
        )
        for q in snapshot.queues:
            for state in STATES:
                jobs.add_metric([q.queue, state], float(getattr(q, state)))
            oldest.add_metric([q.queue], q.oldest_waiting_seconds or 0.0)
            dead.add_metric([q.queue], float(q.dead_letters))
            workers.add_metric([q.queue], float(q.workers))
        yield jobs
        yield oldest
        yield dead
        yield workers
        yield GaugeMetricFamily(
            "pgtasks_workers_alive",
            "Workers whose heartbeat is current, across every queue.",
            value=float(sum(1 for w in snapshot.workers if w.state == "alive")),
        )
