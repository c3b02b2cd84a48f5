"""OpenTelemetry traces with the SDK's in-memory exporter, a real database and a real
worker: defer injects the W3C trace context into the job's headers under a producer span, the
worker continues it with a consumer span (the task's own spans its children), attributes
follow the messaging conventions, a failed attempt is recorded as an error, a batch is one
producer span, user headers survive and the reserved-header check lets the hook write, and
an app that is not instrumented adds nothing."""

from __future__ import annotations

import asyncpg
import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import pgtasks
from pgtasks.integrations.opentelemetry import instrument
from tests.helpers import Events


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return tracer_provider


def parent_of(span: ReadableSpan) -> int | None:
    """The parent's span id (a parent read from headers is remote: compare ids only)."""
    return span.parent.span_id if span.parent is not None else None


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def headers_of(conn: asyncpg.Connection, queue: str) -> list[dict[str, object]]:
    rows = await conn.fetch(f"SELECT headers::text FROM pgmq.q_{queue} ORDER BY msg_id")
    return [orjson.loads(r[0]) if r[0] else {} for r in rows]


async def test_a_trace_runs_from_defer_to_the_job_and_on(
    app: pgtasks.App,
    conn: asyncpg.Connection,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    tracer = provider.get_tracer("test")

    @app.task(queue="tr", name="tr.child")
    async def child() -> None:
        with tracer.start_as_current_span("inside the child"):
            pass

    @app.task(queue="tr", name="tr.parent")
    async def parent(n: int) -> None:
        with tracer.start_as_current_span("inside the parent"):
            await child.defer()

    instrument(app, tracer_provider=provider)
    with tracer.start_as_current_span("request"):
        ref = await parent.options(headers={"tenant": "acme"}).defer(1)
    [headers] = await headers_of(conn, "tr")
    assert headers["tenant"] == "acme"
    assert isinstance(headers["traceparent"], str)

    await app.worker(burst=True).run()
    spans = exporter.get_finished_spans()
    [request] = by_name(spans, "request")
    sends = by_name(spans, "send tr")
    processes = by_name(spans, "process tr")
    assert len(sends) == len(processes) == 2
    trace_id = request.context.trace_id
    assert {s.context.trace_id for s in spans} == {trace_id}  # one trace, end to end
    first_send = next(s for s in sends if parent_of(s) == request.context.span_id)
    assert first_send.kind is SpanKind.PRODUCER
    assert str(headers["traceparent"]).startswith(  # then the flags: sampled (and random)
        f"00-{trace_id:032x}-{first_send.context.span_id:016x}-"
    )
    first_process = next(p for p in processes if parent_of(p) == first_send.context.span_id)
    assert first_process.kind is SpanKind.CONSUMER
    assert dict(first_send.attributes or {}) == {
        "messaging.system": "pgmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "tr",
        "pgtasks.task": "tr.parent",
        "messaging.message.id": str(ref.id),
        "pgtasks.job.id": ref.id,
    }
    assert dict(first_process.attributes or {}) == {
        "messaging.system": "pgmq",
        "messaging.destination.name": "tr",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.message.id": str(ref.id),
        "pgtasks.task": "tr.parent",
        "pgtasks.job.id": ref.id,
        "pgtasks.job.attempt": 1,
    }
    # the task's own span is the consumer span's child; what it defers continues the trace
    [inside] = by_name(spans, "inside the parent")
    assert parent_of(inside) == first_process.context.span_id
    second_send = next(s for s in sends if s is not first_send)
    assert parent_of(second_send) == inside.context.span_id
    [inside_child] = by_name(spans, "inside the child")
    second_process = next(p for p in processes if p is not first_process)
    assert (parent_of(second_process), parent_of(inside_child)) == (
        second_send.context.span_id,
        second_process.context.span_id,
    )


async def test_a_failed_attempt_is_an_error_and_a_batch_is_one_span(
    app: pgtasks.App,
    conn: asyncpg.Connection,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    @app.task(queue="trb", name="trb.boom", max_retries=1, retry_backoff=0.01)
    async def boom(n: int) -> None:
        if pgtasks.current_job().attempt == 1:
            raise ValueError(f"boom {n}")

    instrument(app, tracer_provider=provider)
    refs = await app.defer_many(boom.s(n) for n in range(3))
    [batch] = by_name(exporter.get_finished_spans(), "send trb")
    assert (batch.attributes or {})["messaging.batch.message_count"] == 3
    assert "messaging.message.id" not in (batch.attributes or {})
    parents = {str(h["traceparent"])[:52] for h in await headers_of(conn, "trb")}
    assert parents == {f"00-{batch.context.trace_id:032x}-{batch.context.span_id:016x}"}

    async with app.worker(poll_interval=0.05) as worker:  # a burst worker could stop
        events = Events(worker)  # while a retry is still 10 ms away
        await events.until(lambda: events.counts["succeeded"] == 3)
    processes = by_name(exporter.get_finished_spans(), "process trb")
    assert len(processes) == 6  # three jobs, two attempts each
    failed = [p for p in processes if p.status.status_code is StatusCode.ERROR]
    assert [(p.attributes or {})["pgtasks.job.attempt"] for p in failed] == [1, 1, 1]
    assert all(parent_of(p) == batch.context.span_id for p in processes)
    [event] = failed[0].events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.type"] == "ValueError"
    assert {(p.attributes or {})["pgtasks.job.id"] for p in processes} == {r.id for r in refs}


async def test_the_hook_replaces_a_callers_traceparent_and_uninstrumented_adds_none(
    app: pgtasks.App,
    conn: asyncpg.Connection,
    provider: TracerProvider,
) -> None:
    @app.task(queue="trh")
    async def noop() -> None: ...

    await noop.options(headers={"traceparent": "mine"}).defer()  # not instrumented: as given
    await noop.defer()  # no headers at all
    assert await headers_of(conn, "trh") == [{"traceparent": "mine"}, {}]
    assert (app.hooks.enqueue, app.hooks.execute) == ([], [])

    instrument(app, tracer_provider=provider)
    await noop.options(headers={"traceparent": "mine"}).defer()
    third = (await headers_of(conn, "trh"))[2]
    assert third["traceparent"] != "mine"
    assert str(third["traceparent"]).startswith("00-")
