"""The SQL of workflows (see the 0005 migration): start one, move it on when a step's job
ends (in the worker's transaction that writes that end), cancel it, read it (its status, for
its handle and for operators; the workflow a job belongs to), prune the finished ones."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg
import orjson

from .._shared import Connection
from ..tasks.canvas import StepStatus, WorkflowStatus
from .sql import Executor

WORKFLOW_START = "SELECT pgtasks.workflow_start($1::text, $2::text::jsonb, $3::text::jsonb)"


async def workflow_start(conn: Executor, kind: str, steps: str, on_error: str | None) -> int:
    """Start a workflow (``steps``: its steps as a JSON array); returns its id."""
    workflow_id: int = await conn.fetchval(WORKFLOW_START, kind, steps, on_error)
    return workflow_id


STEPS_ENDED = """
SELECT pgtasks.workflow_step_ended(t.w, t.step, t.outcome, t.result::jsonb, t.error::jsonb)
FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::text[], $5::text[])
    WITH ORDINALITY AS t(w, step, outcome, result, error, i)
ORDER BY t.w, t.i
"""


class StepEnd(NamedTuple):
    """A workflow step's job ended: ``outcome`` is succeeded, failed, cancelled or expired;
    ``result`` (JSON text) what it returned, ``error`` (JSON text) why it has none or why it
    failed."""

    workflow: int
    step: int
    outcome: str
    result: str | None
    error: str | None


async def steps_ended(conn: Executor, ends: Sequence[StepEnd]) -> None:
    """Move workflows on; in the transaction that writes the steps' ends (workflows in id
    order, so that two workers lock them in the same order)."""
    await conn.execute(
        STEPS_ENDED,
        [e.workflow for e in ends],
        [e.step for e in ends],
        [e.outcome for e in ends],
        [e.result for e in ends],
        [e.error for e in ends],
    )


STEPS_FAILED_UNREAD = """
SELECT pgtasks.workflow_step_ended(s.workflow_id, s.step, 'failed', NULL,
                                   jsonb_build_object('reason', t.reason))
FROM unnest($2::bigint[], $3::text[]) AS t(msg_id, reason)
JOIN pgtasks.workflow_steps AS s ON s.queue = $1::text AND s.msg_id = t.msg_id
ORDER BY s.workflow_id, s.step
"""


async def steps_failed_unread(
    conn: Executor, queue: str, ids: Sequence[int], reasons: Sequence[str]
) -> None:
    """Fail the workflow steps among these dead-lettered messages whose headers were never
    loaded (too large), found by their rows; in the transaction of the dead letters."""
    await conn.execute(STEPS_FAILED_UNREAD, queue, list(ids), list(reasons))


WORKFLOW_CANCEL = "SELECT pgtasks.workflow_cancel($1::bigint, $2::float8)"


# the oldest finished first, through the workflows_finished index (migration 0014); SKIP
# LOCKED: a workflow whose last step's end is being written is left to the next prune
WORKFLOWS_PRUNE = """
WITH gone AS (
    SELECT id FROM pgtasks.workflows
    WHERE state <> 'running' AND finished_at < $1
    ORDER BY finished_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM pgtasks.workflows AS w USING gone WHERE w.id = gone.id RETURNING 1
)
SELECT count(*) FROM deleted
"""


async def workflows_prune(conn: Executor, finished_before: dt.datetime, batch: int) -> int:
    """Delete up to ``batch`` workflows finished before ``finished_before``, with their
    steps; returns how many."""
    count: int = await conn.fetchval(WORKFLOWS_PRUNE, finished_before, batch)
    return count


async def workflow_cancel(conn: Executor, workflow_id: int, ttl: float) -> int:
    count: int = await conn.fetchval(WORKFLOW_CANCEL, workflow_id, ttl)
    return count


class WorkflowRow(NamedTuple):
    id: int
    kind: str
    state: str
    failed_step: int | None
    error: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None


class StepRow(NamedTuple):
    step: int
    task: str
    queue: str
    state: str
    msg_id: int | None
    result: str | None
    sent_at: dt.datetime | None
    finished_at: dt.datetime | None


WORKFLOWS_GET = """
SELECT id, kind, state, failed_step, error::text, created_at, finished_at
FROM pgtasks.workflows WHERE id = ANY($1::bigint[])
"""

WORKFLOW_STEPS = """
SELECT step, task, queue, state, msg_id, result::text, sent_at, finished_at
FROM pgtasks.workflow_steps WHERE workflow_id = $1 ORDER BY step
"""


async def workflows_get(conn: Executor, ids: Sequence[int]) -> dict[int, WorkflowRow]:
    return {r[0]: WorkflowRow(*r) for r in await conn.fetch(WORKFLOWS_GET, list(ids))}


async def workflow_steps(conn: Executor, workflow_id: int) -> list[StepRow]:
    return [StepRow(*r) for r in await conn.fetch(WORKFLOW_STEPS, workflow_id)]


async def workflow_status(conn: Connection, workflow_id: int) -> WorkflowStatus | None:
    """A workflow's state and every step's, read in one snapshot (None: no such workflow,
    or it was pruned)."""
    async with _snapshot(conn):
        row = (await workflows_get(conn, [workflow_id])).get(workflow_id)
        if row is None:
            return None
        steps = await workflow_steps(conn, workflow_id)
    at: int | None = row.failed_step
    if at is None and row.kind == "chain" and row.state == "running":
        at = next((s.step for s in steps if s.state != "succeeded"), None)
    return WorkflowStatus(
        row.state,  # type: ignore[arg-type]
        row.kind,  # type: ignore[arg-type]
        at,
        row.failed_step,
        orjson.loads(row.error) if row.error else None,
        row.created_at,
        row.finished_at,
        [
            StepStatus(s.step, s.task, s.queue, s.state, s.msg_id, s.sent_at, s.finished_at)
            for s in steps
        ],
    )


def _snapshot(conn: Connection) -> Any:
    """A repeatable-read transaction on a connection outside one (the workflow and its
    steps agree), else nothing more (the caller's transaction decides)."""
    if not conn.is_in_transaction():
        return conn.transaction(isolation="repeatable_read", readonly=True)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class WorkflowPlace:
    """Where a job stands in its workflow: the workflow's id and kind, the job's step
    (0 is the first; a chord's callback is the last) and how many steps there are."""

    workflow: int
    kind: str
    step: int
    steps: int


WORKFLOW_OF_JOB = """
SELECT s.workflow_id, w.kind, s.step, w.steps
FROM pgtasks.workflow_steps AS s JOIN pgtasks.workflows AS w ON w.id = s.workflow_id
WHERE s.queue = $1 AND s.msg_id = $2
"""


async def workflow_of_job(conn: Executor, queue: str, msg_id: int) -> WorkflowPlace | None:
    """The workflow (and step) a job belongs to, if any."""
    try:
        row: Any = await conn.fetchrow(WORKFLOW_OF_JOB, queue, msg_id)
    except asyncpg.UndefinedTableError:  # not migrated this far
        return None
    return WorkflowPlace(*row) if row is not None else None
