"""The events a worker emits about jobs, and the stream that delivers them.

`JobEvent`s go to the callbacks registered with ``worker.subscribe``: tests wait on them
instead of sleeping, the CLI logs one line per finished job, and metrics can count them.
Callbacks run on the event loop, in the order they subscribed; one that raises is logged,
and the others still run.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Literal, NamedTuple

logger = logging.getLogger("pgtasks")

EventKind = Literal[
    "started", "succeeded", "failed", "retried", "dead", "lost", "cancelled", "expired"
]


class JobEvent(NamedTuple):
    """Something that happened to a job in a worker.

    Kinds: ``started``; ``succeeded`` (acked); ``failed`` (an attempt raised; followed by
    ``retried`` or ``dead``); ``retried`` (visible again after ``retry_in`` seconds);
    ``dead`` (moved to the dead letters); ``lost`` (the lease was lost; another worker may
    hold the message, and this one will not ack it); ``cancelled`` (someone cancelled it
    while it ran); ``expired`` (its ``expires`` passed before it started: not run).
    Immutable (a named tuple).
    """

    kind: EventKind
    queue: str
    msg_id: int
    attempt: int
    task: str | None
    error: BaseException | None = None
    duration: float | None = None
    retry_in: float | None = None
    reason: str | None = None


class Events:
    """A worker's event stream: its subscribers, and how many events of each kind it saw
    (``stats``)."""

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()
        self._subscribers: list[Callable[[JobEvent], None]] = []

    def subscribe(self, callback: Callable[[JobEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns a function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def summary(self) -> str:
        """The counts, for the log line of a worker that stopped."""
        stats = self.stats
        return (
            f"{stats['succeeded']} succeeded, {stats['failed']} failed attempts, "
            f"{stats['retried']} retried, {stats['dead']} dead-lettered, "
            f"{stats['released']} released"
        )

    def emit(self, event: JobEvent) -> None:
        self.stats[event.kind] += 1
        if not self._subscribers:  # the common case: a job costs no copy of the list
            return
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                logger.exception("an event subscriber failed on %s", event.kind)
