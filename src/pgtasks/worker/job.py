"""A claimed message while this worker holds it: the job's state machine.

::

    CLAIMED --start--> RUNNING --finish(outcome)--> FINISHING --written--> DONE
       |                  |
       +------------------+--cancel(reason)--> (the run ends; the reason decides the outcome)

A job's state only moves forward. Every cancellation carries its reason, set before the
asyncio task is cancelled, so nothing downstream guesses from a bare `CancelledError`:

* ``STOP`` (the worker stops): the message is handed back, the attempt given back;
* ``LOST_LEASE`` (another worker may hold the message): nothing is written;
* ``TIMEOUT`` (the task's time limit): a failed attempt;
* ``REQUESTED`` (a user cancelled the job): recorded as cancelled.

The run sees every cancellation in its context (``current_job().cancel_requested`` and
``cancel_reason``), which is all a plain ``def`` task in a thread can see (`threads.py`).

A `CancelledError` that reaches the job boundary with no reason set was raised by the task
itself, and is a failed attempt like any other exception. Once a job is FINISHING its
outcome is decided: a cancellation is refused and lease events are ignored (the completer
drops extensions for it), which is what keeps a stale extension from overwriting a retry's
delay or a committed transactional job from being reported as lost.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import orjson

from ..context import JobControl
from ..db.jobs import Message, Token
from ..serialization.envelope import HEADER_RELEASED, HEADER_WORKFLOW
from ..tasks import RetryPolicy


class JobState(enum.IntEnum):
    CLAIMED = 0
    RUNNING = 1
    FINISHING = 2
    DONE = 3


class JobTimeout(TimeoutError):
    """A run exceeded its task's time limit (the failure a TIMEOUT cancellation becomes)."""


class CancelReason(enum.Enum):
    STOP = "the worker is stopping"
    LOST_LEASE = "the lease was lost"
    TIMEOUT = "the time limit was reached"
    REQUESTED = "cancellation was requested"


_RANK = {
    CancelReason.TIMEOUT: 0,
    CancelReason.REQUESTED: 0,
    CancelReason.STOP: 1,
    CancelReason.LOST_LEASE: 2,
}


@dataclass(eq=False, slots=True)
class Job:
    """One claimed message and its run. Identity is the object itself: the same message
    claimed again (after a lapsed lease) is another `Job` with another claim token.

    Each job runs as a plain asyncio task of its own (``task``): the worker starts
    thousands a second, and a task group member with a cancel scope of its own cost about
    half of the worker's CPU per job. A task cancelled before its first step would never
    run its coroutine (nor free its slot), so a job whose task has not ``began`` is not
    cancelled through asyncio: its run sees the reason as it begins.
    """

    queue: str
    message: Message
    lease: float
    attempt: int
    token: Token  # the ownership guard of every write (see `db.jobs.Message`)
    headers: dict[str, Any] = field(default_factory=dict)
    state: JobState = JobState.CLAIMED
    cancel_reason: CancelReason | None = None
    task: asyncio.Task[None] | None = None
    began: bool = False  # its task has taken its first step: a cancellation reaches the run
    extended_at: float = field(default_factory=time.monotonic)
    claimed_at: float = field(default_factory=time.monotonic)  # monotonic, never moves
    extension_pending: bool = False  # an extension is queued in the completer
    task_name: str | None = None  # once the body is decoded
    policy: RetryPolicy | None = None  # once the task is known
    transactional: bool = False
    control: JobControl = field(default_factory=JobControl)  # what the task can see change
    workflow: tuple[int, int] | None = None  # (workflow id, step), for a workflow's step

    @property
    def msg_id(self) -> int:
        return self.message.msg_id

    @property
    def unread(self) -> bool:
        """Whether its body and headers were left on the server (over the size limit)."""
        return self.message.body is None and self.message.headers is None

    @property
    def decided(self) -> bool:
        """Whether the outcome is decided (FINISHING or DONE)."""
        return self.state >= JobState.FINISHING

    def start(self) -> None:
        if self.state is JobState.CLAIMED:
            self.state = JobState.RUNNING

    def finish(self) -> bool:
        """Decide the outcome now; False if it was decided already."""
        if self.decided:
            return False
        self.state = JobState.FINISHING
        return True

    def done(self) -> None:
        self.state = JobState.DONE

    def cancel(self, reason: CancelReason) -> bool:
        """Cancel the run for ``reason``, unless its outcome is decided. A reason replaces
        a weaker one (a lost lease outranks a stop, which outranks a timeout or a request),
        and the task is cancelled again, also when it swallowed the first cancellation.
        Returns whether the run is now cancelled for ``reason``."""
        if self.decided:
            return False
        current = self.cancel_reason
        if current is not None and _RANK[current] > _RANK[reason]:
            return False
        self.cancel_reason = reason
        control = self.control  # what the task sees: a thread polls it
        control.cancel_requested = True
        control.cancel_reason = reason.name.lower()
        # else the run has not begun, and ends by the reason as it begins; or it is in its
        # first step, run by an eager task factory before its task was known, which the
        # worker cancels once it is (`Worker._launch`)
        if self.began and self.task is not None:
            self.task.cancel()
        return True

    def request_cancel(self) -> bool:
        """Someone asked to cancel this job: the task can see it (`cancel_requested`) and
        its run is cancelled. Returns whether the run was still undecided."""
        self.control.cancel_requested = True
        return self.cancel(CancelReason.REQUESTED)

    def __str__(self) -> str:
        """For logs (``%s`` formats it only when the line is emitted): task name
        (untrusted: repr), id, attempt, queue."""
        name = repr(self.task_name) if self.task_name is not None else "message"
        return f"{name} (id {self.msg_id}, attempt {self.attempt}, queue {self.queue})"


def claimed(queue: str, msg: Message, lease: float) -> Job:
    """The job of a message just claimed (see `attempt_of` for its attempt)."""
    if msg.headers is None:  # the common case
        return Job(queue, msg, lease, msg.read_ct, msg.token)
    headers = _headers(msg.headers)
    job = Job(queue, msg, lease, attempt_of(msg, headers), msg.token, headers)
    place = headers.get(HEADER_WORKFLOW)
    if isinstance(place, dict):
        workflow, step = place.get("id"), place.get("step")
        # only numbers the workflow tables can hold: a forged header must not fail the ack
        if _is_int(workflow, 1, 2**63) and _is_int(step, 0, 2**31):
            job.workflow = (workflow, step)
    return job


def _is_int(value: object, low: int, high: int) -> TypeGuard[int]:
    """An int (not a bool) in [low, high)."""
    return type(value) is int and low <= value < high


def attempt_of(msg: Message, headers: dict[str, Any]) -> int:
    """The attempt a claim is: claims made (``read_ct``) less the attempts worker stops gave
    back. The count given back is trusted only below ``read_ct`` (what pgtasks itself
    writes), so a forged header can neither make an attempt number below 1 nor buy a
    poison message endless runs (`db.jobs._released` is the same rule in SQL)."""
    given_back = headers.get(HEADER_RELEASED)
    if type(given_back) is not int or not 0 <= given_back < msg.read_ct:
        given_back = 0
    return msg.read_ct - given_back


def _headers(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
