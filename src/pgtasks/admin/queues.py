"""Queues as an operator sees them: how deep each is (`status`), and what waits for later
(`later`: delayed, retrying or leased jobs that are not visible yet).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import NamedTuple

from ..db import queues
from ..db.database import Database


class QueueStatus(NamedTuple):
    """One queue's depth: messages in it (waiting, delayed or running), visible now, and the
    age of the oldest, in seconds (None when it is empty)."""

    queue: str
    waiting: int
    visible: int
    oldest_seconds: int | None


class Later(NamedTuple):
    """Messages that are not visible yet: how many, when the first becomes visible, and in
    how many seconds."""

    jobs: int
    due: dt.datetime | None
    seconds: float | None


async def status(database: Database) -> list[QueueStatus]:
    """Every queue's depth, by name."""
    rows = await queues.queue_metrics(await database.pool())
    return [QueueStatus(*r) for r in rows]


async def later(database: Database, names: Sequence[str]) -> Later:
    """What waits for later in these queues."""
    return Later(*await queues.messages_later(await database.pool(), names))
