"""The periodic side of `App` (``app.periodic``, ``app.schedule``, ``app.schedule_prune``,
``app.schedules``, ``app.scheduler``): declaring schedules on the app's tasks, checked when
declared, and the scheduler that runs them. A base class of `App`, which supplies the
registry, the database and the size limit it uses."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from typing_extensions import ParamSpec

from ..admin import maintenance
from ..admin import schedules as admin_schedules
from ..db.database import Database
from ..exceptions import ConfigurationError
from ..periodic.schedule import CatchUp, Schedule, check_catch_up, make_timing
from ..tasks import Signature, Task
from ..worker.scheduler import Scheduler

P = ParamSpec("P")
R = TypeVar("R")


class PeriodicApp:
    """Schedules of an app's tasks (see `App`)."""

    _database: Database
    _tasks: dict[str, Task[Any, Any]]
    _schedules: dict[str, Schedule]
    max_message_size: int
    prune: Callable[..., Awaitable[dict[str, int]]]  # App's

    def _register(self, task: Task[Any, Any]) -> None:
        raise NotImplementedError  # App's

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
            every: an interval instead (a ``timedelta`` from one second to 50 years): ticks at
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
        errors_older_than: dt.timedelta = maintenance.ERRORS_OLDER_THAN,
        archive_older_than: dt.timedelta | None = None,
        workers_older_than: dt.timedelta = maintenance.WORKERS_OLDER_THAN,
        workflows_older_than: dt.timedelta = maintenance.WORKFLOWS_OLDER_THAN,
        queue: str = "default",
        catch_up: CatchUp = "latest",
    ) -> Schedule:
        """Run `prune` on a schedule (default: daily at 03:00 UTC), as the job
        ``pgtasks.prune`` on ``queue``, so that retention needs no external cron."""
        task = self._tasks.get(admin_schedules.PRUNE_TASK)
        if task is None:
            task = admin_schedules.prune_task(self.prune, queue)
            self._register(task)
        ages: dict[str, float] = {}  # only those not the default (see prune_task)
        if workers_older_than != maintenance.WORKERS_OLDER_THAN:
            ages["workers_older_than"] = workers_older_than.total_seconds()
        if workflows_older_than != maintenance.WORKFLOWS_OLDER_THAN:
            ages["workflows_older_than"] = workflows_older_than.total_seconds()
        signature = task.options(queue=queue).s(
            errors_older_than.total_seconds(),
            archive_older_than.total_seconds() if archive_older_than is not None else None,
            **ages,
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
