"""What a producer can learn about the jobs it deferred: today, whether they have left their
queues (`wait_for`); later, job handles and results.
"""

from __future__ import annotations

from collections.abc import Iterable

import anyio

from ..db.connect import acquire_clean
from ..db.database import Database
from ..db.queues import messages_waiting
from ..tasks import JobRef


async def wait_for(database: Database, refs: Iterable[JobRef], *, poll: float = 0.05) -> None:
    """Wait until every one of these jobs has left its queue (see `App.wait_for`)."""
    waiting: dict[str, set[int]] = {}
    for ref in refs:
        waiting.setdefault(ref.queue, set()).add(ref.id)
    pool = await database.pool()
    while waiting:
        async with acquire_clean(pool) as conn:
            for queue, ids in list(waiting.items()):
                left = await messages_waiting(conn, queue, sorted(ids))
                if left:
                    waiting[queue] = left
                else:
                    del waiting[queue]
        if waiting:
            await anyio.sleep(poll)
