"""Declaring work (internal; the public names are re-exported from `pgtasks`): what
``@app.task`` returns, the calls built from it, and how they are checked and retried.

`task` holds `Task` and `TaskCall`, and the `Producer` a task defers through; `signature`
a call not yet sent (`Signature`, `CallOptions`) and the `JobRef` it becomes; `binding` the
check of a call against the function's parameters and hints; `config` the task options'
one definition and a task's settings; `registry` the shared tasks and the default app;
`retry` the retry policy and the `Retry`/`Fail` signals. Nothing here touches a database:
a task defers through the `Producer` (the app) it was registered with.
"""

from .._shared import MAX_DELAY, OnSuccess
from .canvas import (
    StepStatus,
    Workflow,
    WorkflowRef,
    Workflows,
    WorkflowStatus,
    chain,
    chord,
    group,
)
from .config import TASK_DEFAULTS, TASK_OPTIONS, TaskConfig, TaskDefaults, TaskOptions
from .handle import CancelOutcome, JobRef, Jobs, JobState, JobStatus
from .registry import make_task, shared_tasks
from .retry import Fail, Retry, RetryPolicy
from .signature import CallOptions, Signature
from .task import Producer, SyncTask, Task, TaskCall, TaskDecorator

__all__ = [
    "TASK_DEFAULTS",
    "TASK_OPTIONS",
    "CallOptions",
    "CancelOutcome",
    "Fail",
    "JobRef",
    "JobState",
    "JobStatus",
    "Jobs",
    "MAX_DELAY",
    "OnSuccess",
    "Producer",
    "Retry",
    "RetryPolicy",
    "Signature",
    "SyncTask",
    "Task",
    "TaskCall",
    "TaskDecorator",
    "TaskConfig",
    "TaskDefaults",
    "TaskOptions",
    "make_task",
    "shared_tasks",
    "StepStatus",
    "Workflow",
    "WorkflowRef",
    "WorkflowStatus",
    "Workflows",
    "chain",
    "chord",
    "group",
]
