"""pgtasks: an asyncio task queue with a Celery-like API on pgmq, inside the Postgres you
already run. See https://pgtasks.readthedocs.io (docs/ in the repository)."""

from ._version import __version__
from .app import App
from .context import JobContext, current_job
from .exceptions import (
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailable,
    EnvelopeError,
    JobNotFound,
    MessageTooLarge,
    MigrationError,
    PermissionDenied,
    PgTasksError,
    QueueNameError,
    ScheduleNotFound,
    SchemaMissing,
    SerializationError,
    UnknownTask,
)
from .hooks import EnqueueCall, EnqueueHook, EnqueueNext, ExecuteHook, ExecuteNext, Hooks
from .periodic.schedule import Schedule
from .tasks import Fail, JobRef, Retry, RetryPolicy, Signature, Task, TaskCall
from .tasks.registry import task
from .worker import JobEvent, Worker
from .worker.scheduler import Scheduler

__all__ = [
    "App",
    "ConfigurationError",
    "DatabaseError",
    "DatabaseUnavailable",
    "EnqueueCall",
    "EnqueueHook",
    "EnqueueNext",
    "EnvelopeError",
    "ExecuteHook",
    "ExecuteNext",
    "Fail",
    "Hooks",
    "JobContext",
    "JobEvent",
    "JobNotFound",
    "JobRef",
    "MessageTooLarge",
    "MigrationError",
    "PermissionDenied",
    "PgTasksError",
    "QueueNameError",
    "Retry",
    "RetryPolicy",
    "Schedule",
    "ScheduleNotFound",
    "Scheduler",
    "SchemaMissing",
    "SerializationError",
    "Signature",
    "Task",
    "TaskCall",
    "UnknownTask",
    "Worker",
    "__version__",
    "current_job",
    "task",
]
