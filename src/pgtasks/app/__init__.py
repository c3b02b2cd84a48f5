"""`App`: the composition root. It holds the settings and builds the parts from them: a
`Database` (``db/``), the task registry (``tasks/``), the producer side (``client/``), the
operator side (``admin/``), the hooks, and workers (``worker/``) on demand; its methods
delegate to those parts.

The DSN comes from ``App(dsn=...)``, else ``PGTASKS_DSN``, else ``DATABASE_URL``, else the
embedded server (the ``embedded`` extra). The pool opens on first use, on the running event
loop; ``async with app:`` or ``await app.close()`` closes it. There is no global state
except the registry of shared tasks (bare ``@pgtasks.task``), which every `App` includes,
and the default app those tasks defer through (an app is the `Producer` its tasks defer
through).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar, get_args, overload

import asyncpg
from typing_extensions import ParamSpec, Self, Unpack

from .._shared import Connection
from ..admin import maintenance
from ..admin.dead_letters import DeadLetters
from ..client.enqueue import Enqueuer
from ..client.jobs import JobClient, wait_for
from ..client.sync import SyncClient
from ..client.workflows import WorkflowClient
from ..db import schema
from ..db.connect import DsnSource
from ..db.database import Database
from ..exceptions import ConfigurationError
from ..hooks import Hooks
from ..periodic.schedule import Schedule
from ..queues import check_queue_name
from ..serialization.shapes import describe
from ..tasks import CancelOutcome, JobRef, Signature, SyncTask, Task, registry
from ..tasks.canvas import Workflow, WorkflowKind, WorkflowRef
from ..tasks.config import TASK_DEFAULTS, TaskDefaults, TaskOptions, app_defaults
from ..tasks.task import TaskDecorator
from ..worker import Worker, WorkerOptions, WorkerSettings
from .options import APP_OPTIONS
from .periodic import PeriodicApp

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

logger = logging.getLogger("pgtasks")


class App(PeriodicApp):
    """A pgtasks application.

    Args:
        dsn: a ``postgresql://`` URL. Default: ``PGTASKS_DSN``, else ``DATABASE_URL``, else
            the embedded server.
        pool_min_size: connections the pool keeps open.
        pool_max_size: connections the pool opens at most.
        statement_cache_size: prepared statements asyncpg keeps per connection; 0 for
            PgBouncer in transaction mode before 1.21 (every statement is then planned
            per call, which costs some speed).
        max_message_size: largest encoded message body, in bytes.
        key_retention: how long an idempotency key keeps deduplicating after its job
            succeeded.
        archive_retention: how long a succeeded job's message stays in its queue's
            archive (7 days); None keeps every one. Every worker deletes the older ones
            from the queues it serves, hourly (``worker(retention_interval=...)``; a burst
            worker once it has drained them), and `prune` from the app's queues; see
            [Operations](operations.md#retention).
        create_queues: create a queue that does not exist when a job is deferred to it (if
            the database allows it too, see [Migrations](migrations.md#queue-creation));
            turn it off in production, so that a job for a queue nobody created (a typo)
            fails at once with `QueueNotFound` instead of waiting for a worker that never
            comes.
        default: make this the app that shared tasks (``@pgtasks.task``) defer through.
        max_result_size: largest result kept, in bytes (encoded); a larger one is not kept,
            and ``result()`` says why.
        **defaults: the task options' defaults for every task of this app (`TaskDefaults`:
            ``max_retries``, ``retry_backoff``, ``retry_backoff_max``, ``retry_jitter``,
            ``retry_on``, ``dont_retry_on``, ``timeout``, ``lease``, ``on_success``,
            ``keep_result``, ``result_ttl``); each task can override them, see `App.task`.

    Every option is checked here, against the range given in
    [Configuration](configuration.md), and a wrong one raises `ConfigurationError` naming
    it (an unknown name: `TypeError`).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        statement_cache_size: int = 100,
        max_message_size: int = 1024 * 1024,
        key_retention: dt.timedelta = dt.timedelta(days=7),
        archive_retention: dt.timedelta | None = dt.timedelta(days=7),
        create_queues: bool = True,
        default: bool = False,
        max_result_size: int = 1024 * 1024,
        **defaults: Unpack[TaskDefaults],
    ) -> None:
        APP_OPTIONS.check(
            {
                "max_message_size": max_message_size,
                "key_retention": key_retention,
                "archive_retention": archive_retention,
                "create_queues": create_queues,
                "default": default,
                "max_result_size": max_result_size,
            },
            "App",
        )
        self.defaults = app_defaults(defaults, "App")
        self._database = Database(
            dsn,
            pool_min_size=pool_min_size,
            pool_max_size=pool_max_size,
            statement_cache_size=statement_cache_size,
        )
        self.max_message_size = max_message_size
        self.key_retention = key_retention
        self.archive_retention = archive_retention
        self.create_queues = create_queues
        self.max_result_size = max_result_size
        # What cancel and expiry record lasts: the app's result_ttl (a task may keep its
        # results longer or shorter; see worker/decisions.py).
        self._record_ttl: float = self.defaults.result_ttl or TASK_DEFAULTS["result_ttl"].default
        self._tasks: dict[str, Task[Any, Any]] = {}
        self.hooks = Hooks()
        """Hooks around every enqueue and every run of this app's jobs; see `Hooks`."""
        self._jobs = JobClient(self._database, lambda: self.tasks, record_ttl=self._record_ttl)
        self._workflows = WorkflowClient(
            self._database,
            self._jobs,
            lambda: self.tasks,
            max_message_size=max_message_size,
            record_ttl=self._record_ttl,
        )
        self._enqueuer = Enqueuer(
            self._database,
            max_message_size=max_message_size,
            create_queues=create_queues,
            hooks=self.hooks,
            jobs=self._jobs,
        )
        self._sync = SyncClient(
            self._database.sibling,
            max_message_size=max_message_size,
            create_queues=create_queues,
            hooks=self.hooks,
            jobs=self._jobs,
        )
        registry.register_producer(self, default=default)
        self._schedules: dict[str, Schedule] = {}

    def __repr__(self) -> str:
        return f"<pgtasks.App tasks={len(self.tasks)}>"

    # --- registry -------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, Awaitable[R]], /) -> Task[P, R]: ...  # type: ignore[overload-overlap]  # a coroutine function is this

    @overload
    def task(self, fn: Callable[P, R], /) -> SyncTask[P, R]: ...

    @overload
    def task(self, /, **options: Unpack[TaskOptions]) -> TaskDecorator: ...

    def task(self, fn: Callable[P, Any] | None = None, /, **options: Unpack[TaskOptions]) -> Any:
        """Register a function as a task; use bare or with options. An ``async def`` runs
        on the worker's event loop (a `Task`); a plain ``def`` runs in one of the worker's
        threads (a `SyncTask`; see ``worker(threads=...)``).

        Args:
            name: the name messages carry; default ``module.qualname``.
            queue: the pgmq queue it is deferred to; default ``"default"``.
            max_retries: retries after the first attempt (Celery's meaning).
            retry_backoff: base of the exponential backoff, in seconds.
            retry_backoff_max: cap of the backoff, in seconds.
            retry_jitter: full jitter (a uniform draw below the backoff).
            retry_on: exception types that are retried (default: every ``Exception``).
            dont_retry_on: exception types that fail at once.
            timeout: seconds a run may take before it is cancelled and counted as failed.
            lease: the visibility timeout, in seconds, that the worker keeps extending
                while the job runs; a crashed worker's job reappears after it.
            on_success: ``"archive"`` (keep the message in pgmq's archive) or ``"delete"``.
            transactional: run the task inside a transaction that also acks the job (and
                marks its idempotency key): the task writes through
                ``current_job().connection``, and its writes and the ack commit together
                or not at all. Each running transactional job holds a pool connection.

        The options are `TaskOptions`; ``None`` (the default) for any of the retry, timeout,
        lease and on_success options means the app's. Each is checked here, against the
        range given in [Configuration](configuration.md#task-options).
        """

        def register(f: Callable[P, Any]) -> Task[P, Any]:
            task = registry.make_task(f, self, options)
            self._register(task)
            return task

        return register(fn) if fn is not None else register

    def _register(self, task: Task[Any, Any]) -> None:
        existing = self._tasks.get(task.name) or registry.shared_tasks.get(task.name)
        if existing is not None and existing.fn is not task.fn:
            raise ConfigurationError(
                f"two tasks are named {task.name!r} ({existing.fn!r} and {task.fn!r}); "
                "give one of them another name with @app.task(name=...)"
            )
        self._tasks[task.name] = task

    @property
    def tasks(self) -> dict[str, Task[Any, Any]]:
        """Every task this app runs: its own and the shared ones, by name."""
        return {**registry.shared_tasks, **self._tasks}

    @property
    def queues(self) -> list[str]:
        """The queues of the registered tasks."""
        return sorted({t.queue for t in self.tasks.values()})

    def set_default(self) -> None:
        """Make this the app that shared tasks (``@pgtasks.task``) defer through."""
        registry.set_default(self)

    # --- the database -------------------------------------------------------------------

    @property
    def database(self) -> Database:
        """The app's database handle: the DSN, the pool, dedicated connections."""
        return self._database

    @property
    def pool_min_size(self) -> int:
        return self._database.pool_min_size

    @property
    def pool_max_size(self) -> int:
        return self._database.pool_max_size

    @property
    def statement_cache_size(self) -> int:
        return self._database.statement_cache_size

    @property
    def dsn_source(self) -> DsnSource:
        return self._database.dsn_source

    async def dsn(self) -> str:
        """The DSN in use (starting the embedded server if that is the source)."""
        return await self._database.dsn()

    async def pool(self) -> asyncpg.Pool:
        """The connection pool, opened on first use on the running event loop."""
        return await self._database.pool()

    async def close(self) -> None:
        """Close the pool and the connection that waits for results (the embedded server,
        if any, stops when the process exits)."""
        await self._jobs.close()
        await self._database.close()

    async def __aenter__(self) -> Self:
        await self.pool()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- schema ---------------------------------------------------------------------------

    async def migrate(self) -> list[schema.Step]:
        """Install pgmq and the pgtasks schema, and create every registered task's queue.
        Idempotent, and safe to run from several processes at once."""
        pool = await self.pool()
        async with pool.acquire() as conn:
            steps = await schema.migrate(conn, self.queues)
        for step in steps:
            logger.info("migrate: %s", step.description)
        return steps

    async def migration_plan(self) -> list[schema.Step]:
        """What `migrate` would run now, without running it."""
        pool = await self.pool()
        async with pool.acquire() as conn:
            return await schema.plan(conn, self.queues)

    @property
    def dead_letters(self) -> DeadLetters:
        """Jobs that failed for good: list, inspect, retry, purge."""
        return DeadLetters(self._database, self._jobs, record_ttl=self._record_ttl)

    async def prune(
        self,
        *,
        errors_older_than: dt.timedelta = maintenance.ERRORS_OLDER_THAN,
        archive_older_than: dt.timedelta | None = None,
        workers_older_than: dt.timedelta = maintenance.WORKERS_OLDER_THAN,
        workflows_older_than: dt.timedelta = maintenance.WORKFLOWS_OLDER_THAN,
    ) -> dict[str, int]:
        """Delete what has outlived its use: idempotency keys past their retention, the
        error history of attempts older than ``errors_older_than`` (dead letters keep
        theirs), the records (results, cancellations, expiries) of jobs past their
        ``result_ttl``, requests to cancel jobs that ended meanwhile, the rows of workers
        stopped or gone and last seen more than ``workers_older_than`` ago, the workflows
        (with their steps) finished more than ``workflows_older_than`` ago (a running one
        is kept), and archived messages: those older than ``archive_older_than`` in every
        queue when it is given, else those older than the app's ``archive_retention`` in
        the app's queues (none when that is None). The archive and the workflows are
        deleted a batch of 10,000 per transaction. Returns how many rows of each kind were
        deleted."""
        older_than: dt.timedelta | None = archive_older_than
        archive_queues: list[str] | None = None  # every queue
        if older_than is None:
            older_than, archive_queues = self.archive_retention, self.queues
        return await maintenance.prune(
            self._database,
            errors_older_than=errors_older_than,
            archive_older_than=older_than,
            archive_queues=archive_queues,
            workers_older_than=workers_older_than,
            workflows_older_than=workflows_older_than,
        )

    async def wait_for(self, refs: Iterable[JobRef[Any]], *, poll: float = 0.05) -> None:
        """Wait until every one of these jobs has left its queue: acked after success, or
        moved to the dead letters, by any worker. Checks the queues every ``poll`` seconds;
        bound it with ``anyio.fail_after`` or ``asyncio.timeout``. Meant for scripts, tests
        and examples: a request handler should not wait on the jobs it defers."""
        await wait_for(self._database, refs, poll=poll)

    def job(self, queue: str, id: int) -> JobRef[Any]:
        """A handle on a job from its stored queue and id (a later request, another
        process): ``await app.job(queue, id).status()``, ``.result()``, ``.cancel()``.
        Raises `ValueError` for an id no job can have (below 1, or 2**63 and up)."""
        return self._jobs.ref(check_queue_name(queue), id)

    async def cancel(self, refs: Iterable[JobRef[Any]]) -> list[CancelOutcome]:
        """Cancel many jobs (see `JobRef.cancel`); the outcomes in the order given."""
        return await self._jobs.cancel(list(refs))

    # --- enqueue --------------------------------------------------------------------------

    async def defer(self, signature: Signature, /) -> JobRef[Any]:
        """Enqueue one job from a signature (``task.s(...)``, ``task.options(...).s(...)``);
        what ``task.defer(...)`` does. This makes the app the `Producer` its tasks defer
        through."""
        return await self._enqueuer.defer_one(signature)

    async def defer_workflow(
        self, workflow: Workflow, /, *, connection: Connection | None = None
    ) -> WorkflowRef:
        """Send a workflow (``chain(...)``, ``group(...)``, ``chord(...)``); what its
        ``defer()`` does. On ``connection``, in that transaction."""
        return await self._workflows.defer(workflow, connection)

    def workflow(self, id: int, kind: WorkflowKind) -> WorkflowRef:
        """A handle on a workflow from its stored id (and kind)."""
        if type(id) is not int or not 0 < id < 2**63:
            raise ValueError(f"a workflow's id is a positive 64-bit integer (got {describe(id)})")
        if kind not in get_args(WorkflowKind):
            raise ValueError(
                f"a workflow's kind is 'chain', 'group' or 'chord' (got {describe(kind)})"
            )
        return WorkflowRef(id, kind, self._workflows)

    async def defer_many(
        self, signatures: Iterable[Signature], *, connection: Connection | None = None
    ) -> list[JobRef[Any]]:
        """Enqueue many jobs in one transaction, with one ``send_batch`` per queue (and
        delay); returns their refs in input order. Built with ``task.s(...)`` or
        ``task.options(...).s(...)``; a per-item ``connection`` option is ignored in favour
        of ``connection`` here."""
        return await self._enqueuer.defer_many(signatures, connection)

    def defer_sync(self, signature: Signature, /) -> JobRef[Any]:
        """`defer` for code without an event loop; what ``task.defer_sync(...)`` does.

        With ``options(cursor=...)`` the job is sent on that DB-API cursor (psycopg 2 or 3,
        Django's ``connection.cursor()``) or SQLAlchemy ``Connection``, in its current
        transaction, in the calling thread. Otherwise it is sent on the app's background
        event loop (a daemon thread with a pool of its own, started on first use, stopped
        at exit or by `close_sync`), which any number of threads may share; that path
        raises `RuntimeError` on a running event loop, which it would block."""
        return self._sync.defer(signature)

    def defer_many_sync(
        self, signatures: Iterable[Signature], *, cursor: Any = None
    ) -> list[JobRef[Any]]:
        """`defer_many` for code without an event loop: on ``cursor`` in its transaction
        (one ``send_batch`` per queue and delay), else on the background loop (see
        `defer_sync`). Returns the refs in input order."""
        return self._sync.defer_many(signatures, cursor)

    def close_sync(self) -> None:
        """Close the pool and stop the thread that `defer_sync` uses (a later call starts
        them again). Done at interpreter exit anyway."""
        self._sync.close()

    # --- worker ---------------------------------------------------------------------------

    def worker(self, **options: Unpack[WorkerOptions]) -> Worker:
        """A worker for this app; see `pgtasks.Worker`. The options (`WorkerOptions`):
        ``queues``, ``concurrency``, ``threads`` (plain ``def`` tasks run at once, in
        threads), ``burst``, ``shutdown_timeout``, ``listen``, ``poll_interval``,
        ``schedule`` (also run the scheduler of the app's schedules; not in ``burst``
        mode), ``retention_interval`` (how often it deletes archived messages past the
        app's ``archive_retention`` from its queues); each one's meaning, default and range are in
        [Configuration](configuration.md#worker-options)."""
        return Worker(
            self._database,
            self.tasks,
            WorkerSettings(
                defaults=self.defaults,
                key_retention=self.key_retention,
                max_message_size=self.max_message_size,
                max_result_size=self.max_result_size,
                archive_retention=self.archive_retention,
            ),
            hooks=self.hooks,
            schedules=list(self._schedules.values()),
            **options,
        )
