"""The consumer: claims messages, runs jobs, writes their outcomes.

The parts, one module each: `worker` wires them together and owns the two shutdown scopes;
`settings` what it is configured with: the worker options' one definition, and the
app-wide settings; `fetcher` claims (never
more than the free slots); `executor` runs one job and decides its outcome; `job` is a
claimed message's state machine and cancel reasons; `completer` is the one writer of the
worker's message rows; `leases` decides which leases to extend; `listener` holds the LISTEN
connection; `connection` the loops' own connections; `outcome` the outcomes and the
cleaning of what a task hands back; `events` the events it emits about jobs.
"""

from .events import JobEvent
from .settings import WORKER_OPTIONS, WorkerOptions, WorkerSettings
from .worker import Worker

__all__ = ["WORKER_OPTIONS", "JobEvent", "Worker", "WorkerOptions", "WorkerSettings"]
