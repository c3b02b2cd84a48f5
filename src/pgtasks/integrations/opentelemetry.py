"""OpenTelemetry traces of enqueueing and running jobs (the ``tracing`` extra:
``pip install 'pgtasks[tracing]'``, which installs ``opentelemetry-api``; the SDK and its
exporters are the application's to configure).

::

    from pgtasks.integrations.opentelemetry import instrument

    instrument(app)   # once, where the app is made: producers and workers alike

Two hooks on the app (`pgtasks.hooks`):

* **around an enqueue**: a ``PRODUCER`` span ``send <queue>`` per ``defer`` (and one per
  ``defer_many``, whatever its size), whose context is injected into every job's headers by
  the configured propagator: W3C ``traceparent`` and ``tracestate`` by default, header names
  any OpenTelemetry consumer understands (they are not in pgtasks' reserved ``x-pgtasks-``
  space, so a producer in another language can write them too);
* **around a run**: a ``CONSUMER`` span ``process <queue>``, a child of the context found
  in the job's headers (so one trace runs from the request that deferred a job to the job,
  and on to what the job defers), current while the task runs, with the exception recorded
  and the status set to error when the attempt fails.

Attributes follow the OpenTelemetry messaging semantic conventions
(``messaging.system="pgmq"``, ``messaging.destination.name``, ``messaging.operation.type``
and ``.name``, ``messaging.message.id``, ``messaging.batch.message_count``) plus
``pgtasks.task``, ``pgtasks.job.id`` and ``pgtasks.job.attempt``. Nothing is traced unless
`instrument` is called: an app without it runs no hook.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider
except ImportError as exc:  # pragma: no cover - depends on what is installed
    from ..exceptions import ConfigurationError

    raise ConfigurationError(
        "pgtasks' OpenTelemetry tracing needs the opentelemetry-api package: "
        "pip install 'pgtasks[tracing]'"
    ) from exc

from .._version import __version__
from ..app import App
from ..context import JobContext
from ..hooks import EnqueueCall, EnqueueNext, ExecuteNext
from ..tasks import JobRef

SYSTEM = "pgmq"


class Tracing:
    """The two hooks `instrument` registers, with the tracer they use."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    async def around_enqueue(self, call: EnqueueCall, next: EnqueueNext) -> list[JobRef[Any]]:
        signatures = call.signatures
        queues = {s.queue for s in signatures}
        queue = queues.pop() if len(queues) == 1 else None
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
        }
        if queue is not None:
            attributes["messaging.destination.name"] = queue
        tasks = {s.task.name for s in signatures}
        if len(tasks) == 1:
            attributes["pgtasks.task"] = tasks.pop()
        if len(signatures) != 1:
            attributes["messaging.batch.message_count"] = len(signatures)
        name = f"send {queue}" if queue is not None else "send"
        with self.tracer.start_as_current_span(
            name, kind=SpanKind.PRODUCER, attributes=attributes
        ) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            refs = await next(call.with_headers(carrier) if carrier else call)
            if len(refs) == 1:
                span.set_attribute("messaging.message.id", str(refs[0].id))
                span.set_attribute("pgtasks.job.id", refs[0].id)
                if refs[0].deduplicated:
                    span.set_attribute("pgtasks.job.deduplicated", True)
            return refs

    async def around_execute(self, job: JobContext, next: ExecuteNext) -> object:
        parent = propagate.extract(_text_headers(job.headers))
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.destination.name": job.queue,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.message.id": str(job.id),
            "pgtasks.task": job.task,
            "pgtasks.job.id": job.id,
            "pgtasks.job.attempt": job.attempt,
        }
        span = self.tracer.start_span(
            f"process {job.queue}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            return await next(job)
        except BaseException as exc:  # the attempt failed (or was cancelled): say so, re-raise
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            otel_context.detach(token)
            span.end()


def _text_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """The headers a propagator can read: text values only."""
    return {k: v for k, v in headers.items() if isinstance(v, str)}


def instrument(app: App, *, tracer_provider: TracerProvider | None = None) -> Tracing:
    """Trace every ``defer`` and every run of this app's jobs (see the module docstring);
    spans go to ``tracer_provider``, default the global one. Call once per app."""
    tracer = trace.get_tracer("pgtasks", __version__, tracer_provider=tracer_provider)
    tracing = Tracing(tracer)
    app.hooks.around_enqueue(tracing.around_enqueue)
    app.hooks.around_execute(tracing.around_execute)
    return tracing
