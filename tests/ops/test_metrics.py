"""Prometheus metrics with the real prometheus_client, a real database and real workers:
counters by queue, task and outcome (succeeded, retried, failed, dead_lettered), run time and
queue wait histograms, the running gauge, the queue gauges from one cached status query, the
ASGI app, the exposition parsed by prometheus_client's own parser, and ``worker
--metrics-port`` in a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pgtasks
from pgtasks.integrations.prometheus import UNKNOWN_TASK, Metrics
from tests.helpers import Events


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_jobs_are_counted_by_outcome_and_timed(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    release = asyncio.Event()

    @app.task(queue="m", name="m.ok")
    async def ok() -> None: ...

    @app.task(queue="m", name="m.flaky", retry_backoff=0.01, retry_jitter=False)
    async def flaky() -> None:
        if pgtasks.current_job().attempt == 1:
            raise ValueError("first time")

    @app.task(queue="m", name="m.refuse")
    async def refuse() -> None:
        raise pgtasks.Fail("no")

    @app.task(queue="m", name="m.hold")
    async def hold() -> None:
        await release.wait()

    metrics = Metrics(app)
    worker = app.worker(concurrency=5)
    metrics.watch(worker)
    async with worker:
        events = Events(worker)
        await ok.defer()
        await flaky.defer()
        await refuse.defer()
        await conn.execute("SELECT pgmq.send('m', '{\"v\": 1}'::jsonb)")  # no task: poison
        await hold.defer()
        await events.until(lambda: events.counts["dead"] == 2 and events.counts["succeeded"] == 2)
        await events.until(lambda: worker.running == 1)
        assert sample(metrics, "pgtasks_jobs_running", queue="m") == 1
        release.set()
        await events.until(lambda: events.counts["succeeded"] == 3)

    def jobs(task: str, outcome: str) -> float:
        return sample(metrics, "pgtasks_jobs_total", queue="m", task=task, outcome=outcome)

    assert jobs("m.ok", "succeeded") == 1
    assert (jobs("m.flaky", "retried"), jobs("m.flaky", "succeeded")) == (1, 1)
    assert jobs("m.refuse", "failed") == 1
    assert jobs(UNKNOWN_TASK, "dead_lettered") == 1
    assert sample(metrics, "pgtasks_jobs_running", queue="m") == 0
    runs = {t: sample(metrics, "pgtasks_job_run_seconds_count", queue="m", task=t) for t in
            ("m.ok", "m.flaky", "m.refuse", "m.hold")}  # fmt: skip
    assert runs == {"m.ok": 1, "m.flaky": 2, "m.refuse": 1, "m.hold": 1}
    assert sample(metrics, "pgtasks_job_run_seconds_sum", queue="m", task="m.hold") > 0
    # queue wait: first attempts only (the retry of m.flaky is not a wait in line)
    waits = {t: sample(metrics, "pgtasks_job_queue_wait_seconds_count", queue="m", task=t) for t
             in ("m.ok", "m.flaky", "m.refuse", "m.hold")}  # fmt: skip
    assert waits == {"m.ok": 1, "m.flaky": 1, "m.refuse": 1, "m.hold": 1}


async def test_queue_gauges_come_from_one_cached_query(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="mq")
    async def later() -> None: ...

    await later.defer()
    await later.options(delay=3600).defer()
    await conn.execute("SELECT pgmq.send('mq', '{\"v\": 1}'::jsonb)")
    metrics = Metrics(app, cache_seconds=60)
    transport = httpx.ASGITransport(app=metrics.asgi_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(response.text)}
        jobs = {(s.labels["queue"], s.labels["state"]): s.value for s in families[
            "pgtasks_queue_jobs"].samples}  # fmt: skip
        assert jobs[("mq", "waiting")] == 2
        assert jobs[("mq", "scheduled")] == 1
        assert families["pgtasks_queue_status_up"].samples[0].value == 1
        [oldest] = families["pgtasks_queue_oldest_waiting_seconds"].samples
        assert oldest.value >= 0

        await later.defer()  # not seen while the snapshot is fresh: one query per minute
        again = await client.get("/")
        assert 'pgtasks_queue_jobs{queue="mq",state="waiting"} 2.0' in again.text
        metrics.cache_seconds = 0
        fresh = await client.get("/")
        assert 'pgtasks_queue_jobs{queue="mq",state="waiting"} 3.0' in fresh.text

        openmetrics = await client.get("/", headers={"accept": "application/openmetrics-text"})
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.rstrip().endswith("# EOF")


async def test_an_app_without_metrics_has_no_hook(app: pgtasks.App) -> None:
    assert app.hooks.execute == []
    Metrics(app, queue_stats=False)
    assert len(app.hooks.execute) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


TASKS = """
import pgtasks

app = pgtasks.App()

@app.task(queue="mcli", name="mcli.work")
async def work(n: int) -> None: ...
"""


@pytest.mark.slow
async def test_the_worker_command_serves_metrics(
    app: pgtasks.App, db_dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "mcli_tasks.py").write_text(textwrap.dedent(TASKS))
    work = app.task(queue="mcli", name="mcli.work")(_work)
    await app.defer_many(work.s(n) for n in range(5))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PGTASKS_DSN", "DATABASE_URL")}
    env["PYTHONPATH"] = str(tmp_path)
    args = ["-A", "mcli_tasks:app", "--dsn", db_dsn, "--metrics-port", str(port)]
    proc = subprocess.Popen(  # noqa: ASYNC220 (waited for in a thread)
        [sys.executable, "-m", "pgtasks", "worker", *args, "--metrics-host", "127.0.0.1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        succeeded = ("pgtasks_jobs_total", (("outcome", "succeeded"), ("queue", "mcli"),
                                            ("task", "mcli.work")))  # fmt: skip
        workers = ("pgtasks_queue_workers", (("queue", "mcli"),))
        async with httpx.AsyncClient() as client:
            with anyio.fail_after(30):
                # the queue gauges are cached for 5 s: the first scrape may precede the worker
                while values.get(succeeded) != 5 or values.get(workers) != 1:
                    if proc.poll() is not None:
                        raise AssertionError(proc.communicate())
                    await anyio.sleep(0.2)
                    try:
                        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                    except httpx.TransportError:
                        continue
                    values = {
                        (s.name, tuple(sorted(s.labels.items()))): s.value
                        for f in text_string_to_metric_families(text)
                        for s in f.samples
                    }
            missing = await client.get(f"http://127.0.0.1:{port}/other")
        assert missing.status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=30))
    assert proc.returncode == 0, err
    assert f"metrics at http://127.0.0.1:{port}/metrics" in err


async def _work(n: int) -> None: ...
