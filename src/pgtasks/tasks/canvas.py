"""Workflows, in Celery's vocabulary: `chain`, `group` and `chord` of signatures, and the
`WorkflowRef` a deferred workflow becomes.

A chain runs its steps one after another, each receiving the result of the one before as
its first positional argument (unless made with ``si``: immutable); ``a.s(1) | b.s()`` is
``chain(a.s(1), b.s())``. A group runs its members at once. A chord is a group followed by a
callback that receives the members' results, in order, once every member succeeded. A step
that fails for good (or is cancelled, or expires) ends the workflow as failed (cancelled),
and the optional ``on_error`` signature is deferred with the failed step and its error.

Every hand-off is written by the worker in the transaction that acknowledges the step
before (see `db/migrations/0005_workflows.sql`): no step is lost or sent twice, whatever
dies when, and nothing polls. Nothing here touches a database: a workflow is deferred
through the `Producer` of its first step's task.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeAlias

from .._shared import Connection
from .signature import Signature

if TYPE_CHECKING:
    from .task import Task, TaskCall

    ErrorCallback: TypeAlias = Signature | Task[Any, Any] | TaskCall[Any, Any]

WorkflowKind = Literal["chain", "group", "chord"]
WorkflowState = Literal["running", "succeeded", "failed", "cancelled"]


class StepStatus(NamedTuple):
    """One step of a workflow: its place, task, state (``pending`` until it is sent, then
    ``sent``, ``succeeded``, ``failed`` or ``cancelled``), its job once sent, and when."""

    step: int
    task: str
    queue: str
    state: str
    job_id: int | None
    sent_at: dt.datetime | None
    finished_at: dt.datetime | None


class WorkflowStatus(NamedTuple):
    """What `WorkflowRef.status` found.

    Attributes:
        state: ``running``, ``succeeded``, ``failed`` or ``cancelled``.
        kind: ``chain``, ``group`` or ``chord``.
        step: the step it is at (a chain's first not succeeded; the failed one, when it
            failed); None for a group or chord that runs.
        failed_step: the step that failed (or was cancelled or expired), if one did.
        error: that step's error (``type``, ``message``, ``reason``, ``outcome``).
        steps: every step's status.
    """

    state: WorkflowState
    kind: WorkflowKind
    step: int | None
    failed_step: int | None
    error: dict[str, Any] | None
    created_at: dt.datetime
    finished_at: dt.datetime | None
    steps: list[StepStatus]

    @property
    def final(self) -> bool:
        return self.state != "running"


class Workflows(Protocol):
    """What a `WorkflowRef` asks about its workflow (the app's workflow client)."""

    async def status(self, ref: WorkflowRef, /) -> WorkflowStatus: ...

    async def results(self, ref: WorkflowRef, /, *, timeout: float | None) -> list[Any]: ...

    async def cancel(self, ref: WorkflowRef, /) -> int: ...


class WorkflowRef:
    """A deferred workflow: its id, and what can be asked of it."""

    __slots__ = ("_client", "id", "kind")

    def __init__(self, id: int, kind: WorkflowKind, client: Workflows) -> None:
        self.id = id
        self.kind = kind
        self._client = client

    async def status(self) -> WorkflowStatus:
        """Where the workflow is: its state, the step it is at, every step's status."""
        return await self._client.status(self)

    async def result(self, timeout: float | None = None) -> Any:
        """Wait until the workflow is over; return the result of its last step (a chain's
        last, a chord's callback; a group: the list of its members' results). Raises
        `pgtasks.WorkflowFailed` (naming the step) or `pgtasks.JobCancelled`, or
        `TimeoutError` (the workflow goes on)."""
        results = await self._client.results(self, timeout=timeout)
        return results if self.kind == "group" else results[-1]

    async def results(self, timeout: float | None = None) -> list[Any]:
        """Wait until the workflow is over; every step's result, in order."""
        return await self._client.results(self, timeout=timeout)

    async def cancel(self) -> int:
        """Cancel the workflow: the steps not yet run never will be, the one running is
        cancelled. Returns how many step jobs were cancelled or asked to stop (0 when it
        was over)."""
        return await self._client.cancel(self)

    def __repr__(self) -> str:
        return f"WorkflowRef(id={self.id!r}, kind={self.kind!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkflowRef) and (self.id, self.kind) == (other.id, other.kind)

    def __hash__(self) -> int:
        return hash((self.id, self.kind))


@dataclass(frozen=True)
class Workflow:
    """A chain, group or chord, not yet deferred: its steps in order (a chord's callback
    last) and its error callback."""

    kind: WorkflowKind
    steps: tuple[Signature, ...]
    on_error: Signature | None = None

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError(f"a {self.kind} needs at least one signature")
        if self.kind == "chord" and len(self.steps) < 2:  # nothing would ever send its callback
            raise ValueError("a chord needs at least one member before its callback")
        if self.on_error is not None:  # it receives the failed step and its error first
            on_error = self.on_error
            on_error.task._arguments.bind_receiving(on_error.args, on_error.kwargs, count=2)
        for i, step in enumerate(self.steps):
            if not isinstance(step, Signature):
                raise TypeError(
                    f"step {i} of a {self.kind} is a {type(step).__name__}, not a signature: "
                    "build steps with task.s(...) or task.si(...)"
                )
            if step.receives is not None and not self._receives(i):
                step.body(0)  # raises: it is one argument short, and nothing passes one

    def _receives(self, i: int) -> bool:
        """Whether step ``i`` is given a result at run time."""
        if self.steps[i].immutable:
            return False
        if self.kind == "chain":
            return i > 0
        return self.kind == "chord" and i == len(self.steps) - 1

    def passes_result(self, i: int) -> bool:
        return self._receives(i)

    def with_error_callback(self, on_error: ErrorCallback) -> Workflow:
        """The same workflow with ``on_error`` deferred if it fails: it receives the failed
        step (``{"workflow", "step", "queue", "id", "task"}``) and its error (``{"type",
        "message", "reason", "outcome"}``) as its first two positional arguments."""
        return Workflow(self.kind, self.steps, _callback(on_error))

    async def defer(self, *, connection: Connection | None = None) -> WorkflowRef:
        """Send the workflow: a chain's first step, every member of a group or chord; on
        ``connection``, in its transaction (it exists only if that commits). From inside a
        task, a task that fans out."""
        return await self.steps[0].task.app.defer_workflow(self, connection=connection)

    def __or__(self, other: Signature | Workflow) -> Workflow:
        if self.kind == "chain":
            if isinstance(other, Signature):
                return Workflow("chain", (*self.steps, other), self.on_error)
            if other.kind == "chain":
                return Workflow("chain", (*self.steps, *other.steps), self.on_error)
        if self.kind == "group" and isinstance(other, Signature):
            return Workflow("chord", (*self.steps, other), self.on_error)
        raise TypeError(
            f"cannot follow a {self.kind} with a {getattr(other, 'kind', type(other).__name__)}:"
            " chains take signatures and chains; a group followed by a signature is a chord"
        )


def _callback(on_error: ErrorCallback | None) -> Signature | None:
    """A task (or ``task.options(...)``) given as an error callback: a signature of it with
    no arguments of its own."""
    if on_error is None or isinstance(on_error, Signature):
        return on_error
    task = on_error._task
    return Signature(
        task, (), {}, on_error._options, receives=f"task {task.name!r} is an error callback"
    )


def chain(*steps: Signature | Workflow, on_error: ErrorCallback | None = None) -> Workflow:
    """Steps run one after another, each receiving the result of the one before as its
    first positional argument (unless made with ``task.si(...)``)."""
    flat: list[Signature] = []
    for step in steps:
        if isinstance(step, Workflow):
            if step.kind != "chain":
                raise TypeError(f"a chain's step cannot be a {step.kind}")
            flat.extend(step.steps)
        else:
            flat.append(step)
    return Workflow("chain", tuple(flat), _callback(on_error))


def group(
    *members: Signature | Iterable[Signature],
    on_error: ErrorCallback | None = None,
) -> Workflow:
    """Members run at once (sent as one batch); ``results()`` returns theirs in order.
    Takes signatures, or one iterable of them: ``group(t.s(i) for i in range(10))``."""
    given: Iterable[object] = members
    if len(members) == 1 and not isinstance(members[0], Signature | Workflow):
        given = members[0]
    flat: list[Signature] = []
    for i, member in enumerate(given):
        if not isinstance(member, Signature):
            what = f"a {member.kind}" if isinstance(member, Workflow) else type(member).__name__
            raise TypeError(
                f"group() takes signatures (task.s(...)), or one iterable of them; member {i} "
                f"is not a signature but {what} (workflows do not nest in a group)"
            )
        flat.append(member)
    return Workflow("group", tuple(flat), _callback(on_error))


def chord(
    header: Workflow | Iterable[Signature],
    body: Signature,
    *,
    on_error: ErrorCallback | None = None,
) -> Workflow:
    """A group, then ``body`` once every member succeeded, with the list of their results
    (in order) as its first positional argument."""
    members = header if isinstance(header, Workflow) else group(header)
    if members.kind != "group":
        raise TypeError(f"a chord's header is a group, not a {members.kind}")
    return Workflow("chord", (*members.steps, body), _callback(on_error) or members.on_error)
