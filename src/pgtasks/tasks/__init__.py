"""Declaring work (internal; the public names are re-exported from `pgtasks`): what
``@app.task`` returns, the calls built from it, and how they are checked and retried.

`task` holds `Task` and `TaskCall`; `registry` the shared tasks and the default app; `retry`
the retry policy and the `Retry`/`Fail` signals. Nothing here touches a database: a task
defers through the app it was registered with.
"""

from .registry import make_task, shared_tasks
from .retry import Fail, Retry, RetryPolicy
from .task import CallOptions, JobRef, Signature, Task, TaskCall, TaskConfig

__all__ = [
    "CallOptions",
    "Fail",
    "JobRef",
    "Retry",
    "RetryPolicy",
    "Signature",
    "Task",
    "TaskCall",
    "TaskConfig",
    "make_task",
    "shared_tasks",
]
