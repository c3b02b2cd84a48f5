"""pgtasks: an asyncio task queue with a Celery-like API on pgmq, inside the Postgres you
already run. See https://pgtasks.readthedocs.io (docs/ in the repository)."""

from ._version import __version__
from .app import App
from .context import JobContext, JobControl, current_job
from .exceptions import (
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailable,
    EnvelopeError,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobNotFound,
    MessageTooLarge,
    MigrationError,
    PermissionDenied,
    PgTasksError,
    QueueNameError,
    ResultUnavailable,
    SchemaMissing,
    SerializationError,
    UnknownTask,
)
from .hooks import EnqueueCall, EnqueueHook, EnqueueNext, ExecuteHook, ExecuteNext, Hooks
from .tasks import (
    CancelOutcome,
    Fail,
    JobRef,
    JobState,
    JobStatus,
    Retry,
    RetryPolicy,
    Signature,
    Task,
    TaskCall,
)
from .tasks.registry import task
from .worker import JobEvent, Worker

__all__ = [
    "App",
    "CancelOutcome",
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
    "JobCancelled",
    "JobContext",
    "JobControl",
    "JobEvent",
    "JobExpired",
    "JobFailed",
    "JobNotFound",
    "JobRef",
    "JobState",
    "JobStatus",
    "MessageTooLarge",
    "MigrationError",
    "PermissionDenied",
    "PgTasksError",
    "QueueNameError",
    "ResultUnavailable",
    "Retry",
    "RetryPolicy",
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
