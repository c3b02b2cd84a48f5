"""Deferring workflows, and what their `WorkflowRef`s ask: status, results, cancellation.

A workflow is sent by one call of ``pgtasks.workflow_start`` (its rows, and the steps that
start it), on the caller's connection when given. Its results are waited for like a job's
(`jobs.JobClient.wait`): a workflow that ends notifies ``pgtasks_done`` with the topic
``@workflows``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import asyncpg
import orjson

from .._shared import Connection
from ..db.connect import acquire_clean
from ..db.database import Database
from ..db.errors import translate
from ..db.workflows import (
    WorkflowRow,
    workflow_cancel,
    workflow_start,
    workflow_status,
    workflow_steps,
    workflows_get,
)
from ..exceptions import JobCancelled, JobNotFound, WorkflowFailed
from ..serialization import envelope
from ..serialization.hints import load_value
from ..tasks import Signature, Task
from ..tasks.canvas import Workflow, WorkflowRef, WorkflowStatus
from .jobs import JobClient

TOPIC = "@workflows"  # what workflows are waited for under (never a queue's name)


class WorkflowClient:
    """An app's `tasks.canvas.Workflows`: defers workflows and answers their refs."""

    def __init__(
        self,
        database: Database,
        jobs: JobClient,
        tasks: Callable[[], Mapping[str, Task[Any, Any]]],
        *,
        max_message_size: int,
        record_ttl: float,
    ) -> None:
        self._database = database
        self._jobs = jobs
        self._tasks = tasks
        self._max_message_size = max_message_size
        self._record_ttl = record_ttl
        jobs.lookups[TOPIC] = self._ended

    async def defer(self, workflow: Workflow, connection: Connection | None) -> WorkflowRef:
        steps = orjson.dumps(
            [self._step(workflow, i, sig) for i, sig in enumerate(workflow.steps)]
        ).decode()
        on_error = None
        if workflow.on_error is not None:
            _error_callback_checked(workflow.on_error)
            on_error = orjson.dumps(self._call(workflow.on_error, receives=True)).decode()
        try:
            if connection is not None:
                workflow_id = await workflow_start(connection, workflow.kind, steps, on_error)
            else:
                pool = await self._database.pool()
                async with acquire_clean(pool) as conn:
                    workflow_id = await workflow_start(conn, workflow.kind, steps, on_error)
        except asyncpg.PostgresError as exc:  # a queue it would send to is missing, say
            failure = translate(exc, f"deferring a {workflow.kind}")
            if failure is None:
                raise
            raise failure from exc
        return WorkflowRef(workflow_id, workflow.kind, self)

    def _step(self, workflow: Workflow, i: int, sig: Signature) -> dict[str, Any]:
        what = f"step {i} of a {workflow.kind}"
        if sig.options.eta is not None:
            raise ValueError(
                f"{what} has an eta: a step is sent when the one before it ends, so give it "
                "a delay instead"
            )
        _no_key(sig, what)
        _no_connection(sig, what)
        return {
            **self._call(sig, receives=workflow.passes_result(i)),
            "task": sig.task.name,
            "delay": sig.options.delay,
            "pass_result": workflow.passes_result(i),
        }

    def _call(self, sig: Signature, *, receives: bool) -> dict[str, Any]:
        if receives:  # its args as given: the result goes in front of them at run time
            body = envelope.encode(
                sig.task.name, sig.args, sig.kwargs, max_size=self._max_message_size
            )
        else:
            body = sig.body(self._max_message_size)
        headers = sig.headers()
        return {
            "queue": sig.queue,
            "body": orjson.Fragment(body),
            "headers": orjson.Fragment(headers) if headers is not None else None,
        }

    # --- what a WorkflowRef asks ---------------------------------------------------------

    async def status(self, ref: WorkflowRef, /) -> WorkflowStatus:
        pool = await self._database.pool()
        async with acquire_clean(pool) as conn:
            status = await workflow_status(conn, ref.id)
        if status is None:
            raise JobNotFound(f"no workflow {ref.id} (or it was pruned)")
        _check_kind(ref, status.kind)
        return status

    async def results(self, ref: WorkflowRef, /, *, timeout: float | None) -> list[Any]:  # noqa: ASYNC109
        with anyio.fail_after(timeout) if timeout is not None else contextlib.nullcontext():
            row: WorkflowRow | None = await self._jobs.wait(TOPIC, ref.id)
        if row is None:
            raise JobNotFound(f"no workflow {ref.id} (or it was pruned)")
        _check_kind(ref, row.kind)
        if row.state == "cancelled":
            raise JobCancelled(f"workflow {ref.id} was cancelled")
        pool = await self._database.pool()
        async with acquire_clean(pool) as conn:
            steps = await workflow_steps(conn, ref.id)
        if row.state == "failed":
            error = orjson.loads(row.error) if row.error else {}
            step = steps[row.failed_step] if row.failed_step is not None else None
            where = f"step {row.failed_step} ({step.task})" if step is not None else "a step"
            raise WorkflowFailed(
                f"workflow {ref.id} failed at {where}: "
                f"{error.get('reason') or error.get('message') or error.get('outcome')}",
                step=row.failed_step,
                error=error,
            )
        return [self._value(s.task, s.result) for s in steps]

    def _value(self, task_name: str, text: str | None) -> Any:
        if text is None:
            return None
        task = self._tasks().get(task_name)
        return load_value(text, task.returns if task is not None else Any)

    async def cancel(self, ref: WorkflowRef, /) -> int:
        pool = await self._database.pool()
        async with acquire_clean(pool) as conn:
            return await workflow_cancel(conn, ref.id, self._record_ttl)

    async def _ended(self, ids: Sequence[int]) -> dict[int, Any]:
        """For the waiters: the workflows of these ids that are over (None: no such one)."""
        pool = await self._database.pool()
        async with acquire_clean(pool) as conn:
            rows = await workflows_get(conn, ids)
        return {i: rows.get(i) for i in ids if i not in rows or rows[i].state != "running"}


def _no_key(sig: Signature, what: str) -> None:
    if sig.options.idempotency_key is not None:
        raise ValueError(
            f"{what} has an idempotency key: a workflow's jobs are sent exactly once by "
            "their workflow already (and a key held by another job would have one dropped "
            "as a duplicate); give the key to the code that defers the workflow instead"
        )


def _no_connection(sig: Signature, what: str) -> None:
    if sig.options.connection is not None or sig.options.cursor is not None:
        raise ValueError(
            f"{what} has a connection (or cursor) of its own: a workflow is sent on one "
            "connection, in one transaction; pass it to the workflow's "
            "defer(connection=...) instead"
        )


def _error_callback_checked(sig: Signature) -> None:
    """An error callback is sent as the workflow fails, at once: no eta, no delay, no key."""
    what = f"the error callback ({sig.task.name!r})"
    if sig.options.eta is not None or sig.options.delay:
        raise ValueError(
            f"{what} has an eta or a delay: it is sent when the workflow fails, at once; "
            "let the callback wait itself, or defer a delayed job from it"
        )
    _no_key(sig, what)
    _no_connection(sig, what)


def _check_kind(ref: WorkflowRef, kind: str) -> None:
    """A handle made with the wrong kind (``app.workflow(id, kind)``) would unpack the
    results of another kind of workflow (a group's list as a chain's last result)."""
    if kind != ref.kind:
        raise ValueError(
            f"workflow {ref.id} is a {kind}, not a {ref.kind}: make its handle with "
            f"app.workflow({ref.id}, {kind!r})"
        )
