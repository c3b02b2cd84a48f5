"""Static checks of the periodic API, run by mypy (``warn_unused_ignores``): ``@app.periodic``
keeps the task's type, ``app.schedule`` takes a signature and returns a `Schedule`,
``scheduled_at`` is an optional datetime. Each ``# type: ignore[code]`` marks a line that
must be an error. pytest runs the one trivial test; the checks are never called."""

from __future__ import annotations

import datetime as dt

from typing_extensions import assert_type

import pgtasks
from pgtasks import Schedule, Scheduler, Task


async def _checks(app: pgtasks.App) -> None:
    @app.periodic("*/5 * * * *", tz="Europe/Paris", catch_up=3)
    @app.task(queue="reports")
    async def report(day: str = "today") -> int:
        return 1

    exact: Task[[str], int] = report  # the decorator keeps the task's type
    wrong: Task[[int], int] = report  # type: ignore[assignment]
    assert_type(await report("x"), int)

    schedule = app.schedule(report.s("yesterday"), every=dt.timedelta(hours=1), name="r")
    assert_type(schedule, Schedule)
    assert_type(app.schedules, dict[str, Schedule])
    assert_type(app.scheduler(), Scheduler)
    assert_type(app.schedule_prune("0 3 * * *"), Schedule)
    app.schedule(report, cron="* * * * *")  # type: ignore[arg-type]
    app.periodic("* * * * *", catch_up="all")  # type: ignore[arg-type]
    app.periodic(every=5)  # type: ignore[arg-type]

    assert_type(pgtasks.current_job().scheduled_at, dt.datetime | None)


def test_the_checks_are_static() -> None:
    assert callable(_checks)
