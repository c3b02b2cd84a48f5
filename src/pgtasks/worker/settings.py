"""What a worker is configured with, and the checks of its options.

`WorkerSettings` are the app-wide settings a worker needs besides its database and its tasks
(an `App` makes them from its own); the pool's size and statement cache size are the
database's (`db.Database`). The options of one worker (concurrency, timeouts, intervals) are
checked here, each against the range it may take, so that a wrong one fails when the worker
is made, naming the option.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..exceptions import ConfigurationError
from ..queues import check_queue_name
from ..tasks import Task, TaskConfig


@dataclass(frozen=True)
class WorkerSettings:
    """The app-wide settings a worker runs its jobs with.

    Args:
        defaults: every task's settings where the task has none of its own.
        key_retention: how long an idempotency key keeps deduplicating after its job
            succeeded.
        max_message_size: largest message body a claim loads, in bytes.
        max_result_size: largest result kept, in bytes (encoded).
    """

    defaults: TaskConfig
    key_retention: dt.timedelta = dt.timedelta(days=7)
    max_message_size: int = 1024 * 1024
    max_result_size: int = 1024 * 1024


def check_number(
    name: str, value: object, low: float, high: float, *, integer: bool = False
) -> None:
    """Refuse a worker option outside [low, high] (or not a number), naming it."""
    kind = int if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kind)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        expected = "a whole number" if integer else "a number"
        raise ConfigurationError(
            f"worker option {name} must be {expected} from {low:g} to {high:g} (got {value!r})"
        )


def checked_queues(queues: Sequence[str] | None, tasks: Mapping[str, Task[Any, Any]]) -> list[str]:
    """The queues a worker serves: those given, else every one of its tasks' queues."""
    names = [check_queue_name(q) for q in (queues or sorted({t.queue for t in tasks.values()}))]
    if not names:
        raise ConfigurationError(
            "the worker has no queues: register a task with @app.task or pass queues=[...]"
        )
    return names


def transactional_slots(
    tasks: Mapping[str, Task[Any, Any]], queues: Iterable[str], pool_max_size: int
) -> asyncio.Semaphore | None:
    """At most pool_max_size - 1 transactional jobs at once: each holds a pooled
    connection for its whole run, and one must stay free for everything else."""
    served_queues = set(queues)
    served = [t.name for t in tasks.values() if t.config.transactional and t.queue in served_queues]
    if not served:
        return None
    limit = pool_max_size - 1
    if limit < 1:
        raise ConfigurationError(
            f"transactional tasks ({', '.join(sorted(served))}) need App(pool_max_size=...) "
            f"of at least 2 (got {pool_max_size}): each running one holds a "
            "pooled connection, and one must stay free for the rest"
        )
    return asyncio.Semaphore(limit)
