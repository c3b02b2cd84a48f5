"""What a worker is configured with: the worker options (their one definition,
`WorkerOptions` and `WORKER_OPTIONS`, which `App.worker`, `Worker`, the FastAPI helper and
the command line's ``worker`` flags all take), and the app-wide `WorkerSettings`.

`WorkerSettings` are the app-wide settings a worker needs besides its database and its tasks
(an `App` makes them from its own); the pool's size and statement cache size are the
database's (`db.Database`). The worker options are checked when the worker is made (or the
FastAPI lifespan built, or the command line read), each against the range it may take,
naming the option.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from typing_extensions import TypedDict

from .._options import Flag, Number, Option, OptionSet, QueueNames
from ..exceptions import ConfigurationError
from ..tasks import Task, TaskConfig


@dataclass(frozen=True)
class WorkerSettings:
    """The app-wide settings a worker runs its jobs with (an `App`'s).

    Args:
        defaults: every task's settings where the task has none of its own.
        key_retention: how long an idempotency key keeps deduplicating after its job
            succeeded.
        max_message_size: largest message body a claim loads, in bytes.
        max_result_size: largest result kept, in bytes (encoded).
        archive_retention: how long an archived message is kept: the worker deletes older
            ones from its queues every ``retention_interval``; None keeps them all.
    """

    defaults: TaskConfig
    key_retention: dt.timedelta
    max_message_size: int
    max_result_size: int
    archive_retention: dt.timedelta | None = None


class WorkerOptions(TypedDict, total=False):
    """The options of a worker: `App.worker`, `Worker`, the FastAPI helper
    (`worker_lifespan`) and, as flags, ``python -m pgtasks worker``. Each one's meaning,
    default and range are in [Configuration](configuration.md#worker-options)."""

    queues: Sequence[str] | None
    concurrency: int
    threads: int | None
    burst: bool
    shutdown_timeout: float
    listen: bool
    poll_interval: float
    schedule: bool
    retention_interval: float | None


WORKER_OPTIONS = OptionSet(
    Option(
        "queues",
        None,
        "the queues to serve",
        QueueNames(none="every registered task's queue"),
        default_text="every registered task's queue",
        flags=("-q", "--queues"),
        metavar="Q1,Q2",
    ),
    Option(
        "concurrency",
        10,
        "jobs run at once (and so messages claimed at most)",
        Number(1, 100_000, integer=True),
        flags=("-c", "--concurrency"),
        metavar="N",
    ),
    Option(
        "threads",
        None,
        "plain def tasks run at once, in threads; a run waits (claimed, its lease kept) for "
        "a free one",
        Number(1, 10_000, integer=True, none="min(concurrency, 40)"),
        default_text="min(concurrency, 40)",
        flags=("--threads",),
        metavar="N",
    ),
    Option(
        "burst",
        False,
        "stop once the queues have no visible jobs and nothing runs (the command line "
        "exits 0); off: run until stopped",
        Flag(),
        flags=("--burst",),
    ),
    Option(
        "shutdown_timeout",
        20.0,
        "seconds running jobs get to finish after a stop (SIGTERM); with the final flush "
        "(at most 10 s) the default fits Kubernetes' 30 s grace period",
        Number(0, 86_400, unit="seconds"),
        flags=("--shutdown-timeout",),
        metavar="SECONDS",
    ),
    Option(
        "listen",
        True,
        "wake on NOTIFY; off: poll only (e.g. behind PgBouncer in transaction mode)",
        Flag(),
        flags=("--listen",),
    ),
    Option(
        "poll_interval",
        5.0,
        "the safety poll, in seconds: how often an idle worker looks for delayed jobs, "
        "retries and expired leases",
        Number(0.01, 3_600, unit="seconds"),
        flags=("--poll-interval",),
        metavar="SECONDS",
    ),
    Option(
        "schedule",
        True,
        "also run the scheduler of the app's periodic jobs (never in burst mode); any "
        "number of workers may, each tick is enqueued once",
        Flag(),
        flags=("--schedule",),
    ),
    Option(
        "retention_interval",
        3600.0,
        "how often, in seconds, the worker deletes the archived messages of its queues older "
        "than the app's archive_retention (a batch of 10,000 per transaction); the first pass "
        "comes within a minute of the start; in burst mode, one pass once the queues are "
        "drained, starting no batch after 10 s and cut short at 20 s",
        Number(1, 7 * 86_400, unit="seconds", none="this worker does not prune"),
        flags=("--retention-interval",),
        metavar="SECONDS",
    ),
)
"""The worker options, with their defaults, ranges and command line flags."""


def checked_queues(queues: Sequence[str] | None, tasks: Mapping[str, Task[Any, Any]]) -> list[str]:
    """The queues a worker serves: those given (checked already), else every one of its
    tasks' queues."""
    names = list(queues or sorted({t.queue for t in tasks.values()}))
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
