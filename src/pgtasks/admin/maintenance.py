"""Deleting what has outlived its use: expired idempotency keys, old error history, the
records of jobs past their ``result_ttl``, requests to cancel jobs that ended meanwhile, the
rows of workers long stopped or gone, workflows long finished, and old archived messages.

`prune` does all of it when called (``pgtasks prune``, ``app.schedule_prune``);
`prune_archives` is the archive's part alone, which every worker also runs on its own queues
(``worker/retention.py``), so that an archive is bounded without anyone scheduling anything.
It deletes in batches of `queues.ARCHIVE_BATCH`, each its own transaction, oldest first, up
to one cutoff taken on the database's clock when it starts (so it ends even while jobs keep
being archived).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence

import asyncpg

from ..db import attempt_errors, keys, queues, results, workers, workflows
from ..db.database import Database
from ..db.sql import Executor
from ..queues import QUEUE_NAME

# prune's ages by default: one definition for App.prune, the scheduled prune and the CLI
ERRORS_OLDER_THAN = dt.timedelta(days=7)
WORKERS_OLDER_THAN = dt.timedelta(days=1)
WORKFLOWS_OLDER_THAN = dt.timedelta(days=7)


async def prune_archives(
    conn: Executor,
    older_than: dt.timedelta,
    queue_names: Sequence[str] | None = None,
    *,
    batch: int = queues.ARCHIVE_BATCH,
    until: float | None = None,
    failed: dict[str, asyncpg.PostgresError] | None = None,
) -> int:
    """Delete the archived messages older than ``older_than`` of these queues (None: of
    every pgtasks queue), a batch per statement; returns how many. A queue that does not
    exist (any more) is skipped. With ``until`` (a `time.monotonic` instant), no batch is
    started after it: a later call goes on where this one stopped. With ``failed``, a queue
    whose archive cannot be pruned (a database error: its table locked, a missing grant) is
    recorded there and the others are pruned all the same; without it, the error is
    raised."""
    names = list(queue_names) if queue_names is not None else await queues.queue_list(conn)
    cutoff = await queues.ago(conn, older_than)
    deleted = 0
    for queue in names:
        if not QUEUE_NAME.fullmatch(queue):  # not one of ours
            continue
        while True:
            if until is not None and time.monotonic() >= until:
                return deleted
            try:
                n = await queues.archive_prune(conn, queue, cutoff, batch)
            except asyncpg.UndefinedTableError:  # dropped meanwhile
                break
            except asyncpg.PostgresError as exc:  # a lost connection is no PostgresError
                if failed is None:
                    raise
                failed[queue] = exc
                break
            deleted += n
            if n < batch:
                break
    return deleted


async def prune_workflows(
    conn: Executor, older_than: dt.timedelta, *, batch: int = queues.ARCHIVE_BATCH
) -> int:
    """Delete the workflows (with their steps) finished longer ago than ``older_than``, a
    batch per statement; returns how many. Running workflows are kept."""
    cutoff = await queues.ago(conn, older_than)
    deleted = 0
    while True:
        n = await workflows.workflows_prune(conn, cutoff, batch)
        deleted += n
        if n < batch:
            return deleted


async def prune(
    database: Database,
    *,
    errors_older_than: dt.timedelta,
    archive_older_than: dt.timedelta | None,
    archive_queues: Sequence[str] | None = None,
    workers_older_than: dt.timedelta = WORKERS_OLDER_THAN,
    workflows_older_than: dt.timedelta = WORKFLOWS_OLDER_THAN,
) -> dict[str, int]:
    """See `App.prune`; returns how many rows of each kind were deleted. The archives of
    ``archive_queues`` (None: every pgtasks queue) lose their messages older than
    ``archive_older_than`` (None: none)."""
    pool = await database.pool()
    counts = {
        "keys": await keys.keys_prune(pool),
        "errors": await attempt_errors.errors_prune(pool, errors_older_than),
        "results": await results.results_prune(pool),
        "cancel_requests": await results.cancel_requests_prune(pool),
        "workers": await workers.workers_prune(pool, workers_older_than),
        "workflows": await prune_workflows(pool, workflows_older_than),
        "archived": 0,
    }
    if archive_older_than is not None:
        counts["archived"] = await prune_archives(pool, archive_older_than, archive_queues)
    return counts
