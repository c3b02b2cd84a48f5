"""Workflows as an operator sees them (``pgtasks workflow show``): a workflow's state and
every step's, with timings, and for each step that was sent the state of its job now
(waiting, running, retrying, ...), which the step's own state (``sent``) does not tell."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ..db import results
from ..db.connect import acquire_clean
from ..db.database import Database
from ..db.workflows import workflow_status
from ..exceptions import JobNotFound


@dataclass(frozen=True)
class StepDetail:
    """One step: ``state`` is the step's (``pending`` until it is sent, then ``sent``,
    ``succeeded``, ``failed`` or ``cancelled``); ``job_state`` that of its job, once sent."""

    step: int
    task: str
    queue: str
    state: str
    job_id: int | None
    job_state: str | None
    sent_at: dt.datetime | None
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class WorkflowDetail:
    """A workflow in full: as `pgtasks.WorkflowStatus` says, with its steps' jobs."""

    id: int
    kind: str
    state: str
    step: int | None  # a chain's step it is at, or the step that failed
    failed_step: int | None
    error: dict[str, Any] | None
    created_at: dt.datetime
    finished_at: dt.datetime | None
    steps: list[StepDetail]


async def get_workflow(database: Database, workflow_id: int) -> WorkflowDetail:
    """The workflow of this id. Raises `JobNotFound` when there is none."""
    pool = await database.pool()
    async with acquire_clean(pool) as conn:
        status = await workflow_status(conn, workflow_id)
        if status is None:
            raise JobNotFound(f"no workflow {workflow_id} (never deferred, rolled back, or pruned)")
        sent: dict[str, list[int]] = defaultdict(list)
        for s in status.steps:
            if s.state == "sent" and s.job_id is not None:
                sent[s.queue].append(s.job_id)
        job_states = {
            (queue, info.msg_id): info.state
            for queue, ids in sent.items()
            for info in await results.job_info(conn, queue, ids)
        }
    return WorkflowDetail(
        id=workflow_id,
        kind=status.kind,
        state=status.state,
        step=status.step,
        failed_step=status.failed_step,
        error=status.error,
        created_at=status.created_at,
        finished_at=status.finished_at,
        steps=[
            StepDetail(
                s.step,
                s.task,
                s.queue,
                s.state,
                s.job_id,
                job_states.get((s.queue, s.job_id)) if s.job_id is not None else None,
                s.sent_at,
                s.finished_at,
            )
            for s in status.steps
        ],
    )
