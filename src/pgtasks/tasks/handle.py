"""A job that was deferred: `JobRef`, the handle a ``defer`` returns, typed by what the task
returns, and what it can tell about its job (`JobStatus`).

A ref is an id and a queue, plus the `Jobs` client it asks: the app that deferred it (or
``app.job(queue, id)`` for ids stored elsewhere). ``await ref.status()`` says where the job
is; ``await ref.result()`` waits for it to end and returns what the task returned, typed as
its return annotation; ``await ref.cancel()`` cancels it. None of them holds a connection
while it waits.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple, Protocol, TypeVar

if TYPE_CHECKING:
    from typing_extensions import Self

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

JobState = Literal[
    "scheduled",
    "waiting",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "cancelled",
    "expired",
    "unknown",
]
"""Where a job is, or what it became:

* ``scheduled``: in its queue, not visible yet (a delay or an eta), never claimed;
* ``waiting``: in its queue, visible, to be claimed;
* ``running``: claimed by a worker, its current attempt not over;
* ``retrying``: waiting for its next attempt after a failed one;
* ``succeeded``, ``failed`` (in the dead letters, or retried from there as a new job:
  see `JobStatus.retried_as`), ``cancelled``, ``expired`` (not started before its
  ``expires``): over;
* ``unknown``: no job has this id in this queue, or its record was pruned.
"""

MAX_JOB_ID = 2**63 - 1
"""The largest job id: pgmq's message ids are PostgreSQL ``bigint``s, from 1."""

FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "expired"})

CancelOutcome = Literal["cancelled", "requested", "finished", "unknown"]
"""What ``cancel`` did: ``cancelled`` (it had not started, or waited for a retry: removed
and recorded as cancelled), ``requested`` (it runs: its worker cancels the run, which then
ends as cancelled unless it finished first), ``finished`` (it had ended already: nothing to
do), ``unknown`` (no such job)."""


class JobStatus(NamedTuple):
    """What `JobRef.status` found.

    Attributes:
        state: where the job is, or what it became (see `JobState`).
        task: the task's name, when known.
        attempts: attempts used so far (claims, less those given back at shutdowns).
        enqueued_at: when it was sent.
        finished_at: when it ended, for a job that did.
        error: for a failed job, its last error (``type``, ``message``, ``traceback``);
            for a cancelled or expired one, why (``reason``); for a succeeded one whose
            result could not be kept, why (``type``, ``message``).
        cancel_requested: whether someone asked to cancel it while it ran.
        retried_as: for a failed job whose dead letter was retried, the id of the job
            (in the same queue) it was sent again as: ``app.job(queue, retried_as)``.
    """

    state: JobState
    task: str | None = None
    attempts: int | None = None
    enqueued_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    retried_as: int | None = None

    @property
    def final(self) -> bool:
        """Whether the job is over (succeeded, failed, cancelled or expired)."""
        return self.state in FINAL_STATES


class Jobs(Protocol):
    """What a `JobRef` asks about its job (the app's job client implements it)."""

    async def status(self, ref: JobRef[Any], /) -> JobStatus: ...

    async def result(self, ref: JobRef[R], /, *, timeout: float | None) -> R: ...

    async def cancel(self, refs: Sequence[JobRef[Any]], /) -> list[CancelOutcome]: ...


class JobRef(Generic[R_co]):
    """A job that was deferred: its pgmq message id and queue, and the task's name.

    ``deduplicated`` is true when the idempotency key was already held, so nothing was sent
    and ``id`` is the message of the job that holds the key. Typed by what the task returns
    (``JobRef[int]`` for ``-> int``), so that ``await ref.result()`` is typed too. Compares
    and hashes by ``(id, queue, task, deduplicated)``, and unpacks as that tuple. An id no
    job can have (below 1, or beyond a ``bigint``: 2**63 and up) raises `ValueError`.
    """

    # _sent_after: for a job this process sent (not a deduplicated one), the monotonic time
    # before it was sent; its end comes after, which spares a waiter that was listening
    # already the look-up of a job that cannot have ended (`client.jobs`)
    __slots__ = ("_jobs", "_sent_after", "deduplicated", "id", "queue", "task")

    def __init__(
        self,
        id: int,
        queue: str,
        task: str,
        deduplicated: bool = False,
        *,
        jobs: Jobs | None = None,
    ) -> None:
        if type(id) is not int or not 1 <= id <= MAX_JOB_ID:
            raise ValueError(
                f"job id {id!r} is not one: a job id is an integer from 1 to 2**63 - 1 "
                "(pgmq's message ids)"
            )
        self.id = id
        self.queue = queue
        self.task = task
        self.deduplicated = deduplicated
        self._jobs = jobs
        self._sent_after: float | None = None

    async def status(self) -> JobStatus:
        """Where the job is now, or what it became (one query)."""
        return await self._client().status(self)

    async def result(self, timeout: float | None = None) -> R_co:
        """Wait until the job is over and return what the task returned, restored to the
        task's return annotation (as arguments are).

        Waiting is pushed (LISTEN), not polled: one listening connection per app serves
        every waiter, and a safety poll covers a missed notification.

        Raises:
            JobFailed: the job is in the dead letters (with its last error).
            JobCancelled: it was cancelled (`JobExpired`, a subclass: it expired).
            ResultUnavailable: it succeeded, and no result was kept (the task keeps none,
                the result was too large or could not be encoded, or its record expired).
            JobNotFound: no job has this id in this queue (or its record was pruned).
            TimeoutError: ``timeout`` seconds passed first; the job is not cancelled.
        """
        return await self._client().result(self, timeout=timeout)

    async def cancel(self) -> CancelOutcome:
        """Cancel the job (see `CancelOutcome`); a no-op that says so for a finished one."""
        (outcome,) = await self._client().cancel([self])
        return outcome

    def _client(self) -> Jobs:
        if self._jobs is None:
            raise RuntimeError(
                f"this JobRef (job {self.id} in queue {self.queue!r}) is not bound to an app; "
                "get one from defer() or app.job(queue, id)"
            )
        return self._jobs

    # --- a value ---------------------------------------------------------------------------

    def _key(self) -> tuple[int, str, str, bool]:
        return (self.id, self.queue, self.task, self.deduplicated)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, JobRef):
            return self._key() == other._key()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __iter__(self) -> Iterator[Any]:
        return iter(self._key())

    def __repr__(self) -> str:
        return (
            f"JobRef(id={self.id!r}, queue={self.queue!r}, task={self.task!r}, "
            f"deduplicated={self.deduplicated!r})"
        )

    def _replace(
        self,
        *,
        id: int | None = None,
        queue: str | None = None,
        task: str | None = None,
        deduplicated: bool | None = None,
    ) -> Self:
        """A copy with some fields changed (as a named tuple's ``_replace``)."""
        return type(self)(
            self.id if id is None else id,
            self.queue if queue is None else queue,
            self.task if task is None else task,
            self.deduplicated if deduplicated is None else deduplicated,
            jobs=self._jobs,
        )
