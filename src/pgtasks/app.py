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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar, overload

import asyncpg
from typing_extensions import ParamSpec, Self

from ._shared import Connection, OnSuccess
from .admin import maintenance
from .admin import schedules as admin_schedules
from .admin.dead_letters import DeadLetters
from .client.enqueue import Enqueuer
from .client.jobs import wait_for
from .db import schema
from .db.connect import DsnSource
from .db.database import Database
from .exceptions import ConfigurationError
from .hooks import Hooks
from .periodic.schedule import CatchUp, Schedule, check_catch_up, make_timing
from .tasks import JobRef, Signature, Task, TaskConfig, registry
from .tasks.config import check_lease, check_on_success
from .worker import Worker, WorkerSettings
from .worker.scheduler import Scheduler

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

logger = logging.getLogger("pgtasks")


class App:
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
        default: make this the app that shared tasks (``@pgtasks.task``) defer through.
        max_retries: default retries after the first attempt, for every task.
        retry_backoff: default base of the exponential backoff, in seconds.
        retry_backoff_max: default cap of the backoff, in seconds.
        retry_jitter: default full jitter on the backoff.
        retry_on: default exception types that are retried.
        dont_retry_on: default exception types that fail at once.
        timeout: default seconds a run may take (None: no limit).
        lease: default visibility timeout kept while a job runs, in seconds.
        on_success: default ``"archive"`` or ``"delete"`` of a succeeded message.

    Each of the last nine can be overridden per task; see `App.task`.
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
        default: bool = False,
        max_retries: int = 3,
        retry_backoff: float = 2.0,
        retry_backoff_max: float = 600.0,
        retry_jitter: bool = True,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        dont_retry_on: tuple[type[BaseException], ...] = (),
        timeout: float | None = None,
        lease: float = 30.0,
        on_success: OnSuccess = "archive",
    ) -> None:
        self._database = Database(
            dsn,
            pool_min_size=pool_min_size,
            pool_max_size=pool_max_size,
            statement_cache_size=statement_cache_size,
        )
        self.max_message_size = max_message_size
        self.key_retention = key_retention
        self.defaults = TaskConfig(
            max_retries=max_retries,
            retry_backoff=retry_backoff,
            retry_backoff_max=retry_backoff_max,
            retry_jitter=retry_jitter,
            retry_on=retry_on,
            dont_retry_on=dont_retry_on,
            timeout=timeout,
            lease=check_lease(lease),
            on_success=check_on_success(on_success),
        )
        self._tasks: dict[str, Task[Any, Any]] = {}
        self.hooks = Hooks()
        """Hooks around every enqueue and every run of this app's jobs; see `Hooks`."""
        self._enqueuer = Enqueuer(
            self._database, max_message_size=max_message_size, hooks=self.hooks
        )
        registry.register_producer(self, default=default)
        self._schedules: dict[str, Schedule] = {}

    def __repr__(self) -> str:
        return f"<pgtasks.App tasks={len(self.tasks)}>"

    # --- registry -------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, Awaitable[R]], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        max_retries: int | None = None,
        retry_backoff: float | None = None,
        retry_backoff_max: float | None = None,
        retry_jitter: bool | None = None,
        retry_on: tuple[type[BaseException], ...] | None = None,
        dont_retry_on: tuple[type[BaseException], ...] | None = None,
        timeout: float | None = None,
        lease: float | None = None,
        on_success: OnSuccess | None = None,
        transactional: bool = False,
    ) -> Callable[[Callable[P, Awaitable[R]]], Task[P, R]]: ...

    def task(
        self, fn: Callable[P, Awaitable[R]] | None = None, /, **options: Any
    ) -> Task[P, R] | Callable[[Callable[P, Awaitable[R]]], Task[P, R]]:
        """Register an ``async def`` as a task; use bare or with options.

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
        """

        def register(f: Callable[P, Awaitable[R]]) -> Task[P, R]:
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
        """Close the pool (the embedded server, if any, stops when the process exits)."""
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
        return DeadLetters(self._database)

    async def prune(
        self,
        *,
        errors_older_than: dt.timedelta = dt.timedelta(days=7),
        archive_older_than: dt.timedelta | None = None,
    ) -> dict[str, int]:
        """Delete what has outlived its use: idempotency keys past their retention, the
        error history of attempts older than ``errors_older_than`` (dead letters keep
        theirs) and, when ``archive_older_than`` is given, archived messages older than
        that. Returns how many rows of each kind were deleted."""
        return await maintenance.prune(
            self._database,
            errors_older_than=errors_older_than,
            archive_older_than=archive_older_than,
        )

    async def wait_for(self, refs: Iterable[JobRef], *, poll: float = 0.05) -> None:
        """Wait until every one of these jobs has left its queue: acked after success, or
        moved to the dead letters, by any worker. Checks the queues every ``poll`` seconds;
        bound it with ``anyio.fail_after`` or ``asyncio.timeout``. Meant for scripts, tests
        and examples: a request handler should not wait on the jobs it defers."""
        await wait_for(self._database, refs, poll=poll)

    # --- enqueue --------------------------------------------------------------------------

    async def defer(self, signature: Signature, /) -> JobRef:
        """Enqueue one job from a signature (``task.s(...)``, ``task.options(...).s(...)``);
        what ``task.defer(...)`` does. This makes the app the `Producer` its tasks defer
        through."""
        return await self._enqueuer.defer_one(signature)

    async def defer_many(
        self, signatures: Iterable[Signature], *, connection: Connection | None = None
    ) -> list[JobRef]:
        """Enqueue many jobs in one transaction, with one ``send_batch`` per queue (and
        delay); returns their refs in input order. Built with ``task.s(...)`` or
        ``task.options(...).s(...)``; a per-item ``connection`` option is ignored in favour
        of ``connection`` here."""
        return await self._enqueuer.defer_many(signatures, connection)

    # --- worker ---------------------------------------------------------------------------

    def worker(
        self,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 10,
        burst: bool = False,
        shutdown_timeout: float = 20.0,
        listen: bool = True,
        poll_interval: float = 5.0,
        schedule: bool = True,
    ) -> Worker:
        """A worker for this app; see `pgtasks.Worker`. With ``schedule`` (the default) it
        also runs the scheduler of the app's schedules (not in ``burst`` mode)."""
        return Worker(
            self._database,
            self.tasks,
            WorkerSettings(
                defaults=self.defaults,
                key_retention=self.key_retention,
                max_message_size=self.max_message_size,
            ),
            queues=queues,
            concurrency=concurrency,
            burst=burst,
            shutdown_timeout=shutdown_timeout,
            listen=listen,
            poll_interval=poll_interval,
            hooks=self.hooks,
            schedules=list(self._schedules.values()) if schedule else (),
        )

    # --- periodic jobs ------------------------------------------------------------------

    def periodic(
        self,
        cron: str | None = None,
        /,
        *,
        every: dt.timedelta | None = None,
        tz: str | None = None,
        name: str | None = None,
        catch_up: CatchUp = "latest",
    ) -> Callable[[Task[P, R]], Task[P, R]]:
        """Run a task on a schedule; goes above ``@app.task`` (the task takes no
        arguments; see `schedule` for one that does)::

            @app.periodic("*/5 * * * *", tz="Europe/Paris")
            @app.task
            async def report() -> None: ...

        Args:
            cron: a cron expression: 5 fields (minute hour day month weekday), or 6 with
                the seconds first. Needs the ``cron`` extra.
            every: an interval instead (a ``timedelta`` of at least one second): ticks at
                its multiples since the Unix epoch.
            tz: the IANA time zone the cron expression is read in (default UTC).
            name: the schedule's name (default: the task's); unique in the app.
            catch_up: ticks missed while no scheduler ran: ``"none"``, ``"latest"``
                (enqueue the latest), or a number N (at most the latest N).

        An invalid expression, time zone or option fails here. See docs/periodic.md.
        """
        timing = make_timing(cron, every, tz)
        policy = check_catch_up(catch_up)

        def decorate(task: Task[P, R]) -> Task[P, R]:
            if not isinstance(task, Task):
                raise TypeError(
                    f"@app.periodic goes above @app.task, not on a plain function ({task!r})"
                )
            try:
                signature = task.s()  # type: ignore[call-arg]
            except TypeError as exc:
                raise ConfigurationError(
                    f"@app.periodic: task {task.name!r} needs arguments ({exc}); schedule a "
                    "call with them: app.schedule(task.s(...), cron=..., name=...)"
                ) from None
            self._add_schedule(Schedule(name or task.name, signature, timing, policy))
            return task

        return decorate

    def schedule(
        self,
        signature: Signature,
        /,
        *,
        cron: str | None = None,
        every: dt.timedelta | None = None,
        tz: str | None = None,
        name: str | None = None,
        catch_up: CatchUp = "latest",
    ) -> Schedule:
        """Enqueue this call (``task.s(...)``, or ``task.options(queue=...).s(...)``) on a
        schedule; the options are those of `periodic`. Returns the `Schedule`."""
        if not isinstance(signature, Signature):
            raise TypeError(
                f"app.schedule takes a call of a task, like task.s(42) (got {signature!r})"
            )
        timing = make_timing(cron, every, tz)
        return self._add_schedule(
            Schedule(name or signature.task.name, signature, timing, check_catch_up(catch_up))
        )

    def schedule_prune(
        self,
        cron: str | None = "0 3 * * *",
        /,
        *,
        every: dt.timedelta | None = None,
        tz: str | None = None,
        errors_older_than: dt.timedelta = dt.timedelta(days=7),
        archive_older_than: dt.timedelta | None = None,
        queue: str = "default",
        catch_up: CatchUp = "latest",
    ) -> Schedule:
        """Run `prune` on a schedule (default: daily at 03:00 UTC), as the job
        ``pgtasks.prune`` on ``queue``, so that retention needs no external cron."""
        task = self._tasks.get(admin_schedules.PRUNE_TASK)
        if task is None:
            task = admin_schedules.prune_task(self._database, queue)
            self._register(task)
        signature = task.options(queue=queue).s(
            errors_older_than.total_seconds(),
            archive_older_than.total_seconds() if archive_older_than is not None else None,
        )
        return self.schedule(
            signature,
            cron=cron if every is None else None,
            every=every,
            tz=tz,
            name=admin_schedules.PRUNE_TASK,
            catch_up=catch_up,
        )

    def _add_schedule(self, schedule: Schedule) -> Schedule:
        if schedule.name in self._schedules:
            raise ConfigurationError(
                f"two schedules are named {schedule.name!r}; give one another name=..."
            )
        schedule.definition(self.max_message_size)  # arguments that cannot be sent fail now
        self._schedules[schedule.name] = schedule
        return schedule

    @property
    def schedules(self) -> dict[str, Schedule]:
        """This app's schedules, by name."""
        return dict(self._schedules)

    def scheduler(self) -> Scheduler:
        """A scheduler of this app's schedules, to run alone (``await
        app.scheduler().run()``); workers run one of their own unless told not to."""
        return Scheduler(
            self._database,
            list(self._schedules.values()),
            max_message_size=self.max_message_size,
        )
