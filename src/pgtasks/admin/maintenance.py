"""Deleting what has outlived its use: expired idempotency keys, old error history, the
records of jobs past their ``result_ttl``, requests to cancel jobs that ended meanwhile, the
rows of workers long stopped or gone, and (when asked) old archived messages. Schedule it
(``pgtasks prune``); nothing runs it on its own.
"""

from __future__ import annotations

import datetime as dt

from ..db import attempt_errors, keys, queues, results, workers
from ..db.database import Database
from ..queues import QUEUE_NAME


async def prune(
    database: Database,
    *,
    errors_older_than: dt.timedelta,
    archive_older_than: dt.timedelta | None,
    workers_older_than: dt.timedelta = dt.timedelta(days=1),
) -> dict[str, int]:
    """See `App.prune`; returns how many rows of each kind were deleted."""
    pool = await database.pool()
    counts = {
        "keys": await keys.keys_prune(pool),
        "errors": await attempt_errors.errors_prune(pool, errors_older_than),
        "results": await results.results_prune(pool),
        "cancel_requests": await results.cancel_requests_prune(pool),
        "workers": await workers.workers_prune(pool, workers_older_than),
        "archived": 0,
    }
    if archive_older_than is not None:
        for queue in await queues.queue_list(pool):
            if not QUEUE_NAME.fullmatch(queue):  # not one of ours
                continue
            counts["archived"] += await queues.archive_prune(pool, queue, archive_older_than)
    return counts
