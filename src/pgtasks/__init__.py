"""pgtasks: an asyncio task queue with a Celery-like API on pgmq, inside the Postgres you
already run. See https://pgtasks.readthedocs.io (docs/ in the repository)."""

from ._version import __version__
from .app import App
from .context import JobContext, JobEvent, current_job
from .exceptions import (
    ConfigurationError,
    DatabaseUnavailable,
    EnvelopeError,
    JobNotFound,
    MessageTooLarge,
    MigrationError,
    PgTasksError,
    QueueNameError,
    SerializationError,
    UnknownTask,
)
from .registry import task
from .retry import Fail, Retry, RetryPolicy
from .tasks import JobRef, Signature, Task, TaskCall
from .worker import Worker

__all__ = [
    "App",
    "ConfigurationError",
    "DatabaseUnavailable",
    "EnvelopeError",
    "Fail",
    "JobContext",
    "JobEvent",
    "JobNotFound",
    "JobRef",
    "MessageTooLarge",
    "MigrationError",
    "PgTasksError",
    "QueueNameError",
    "Retry",
    "RetryPolicy",
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
