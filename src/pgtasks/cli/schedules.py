"""``pgtasks scheduler`` (the scheduler alone, with its signal handlers) and ``pgtasks
schedules [list|pause|resume|trigger|delete]``, which read and change the schedules' rows
through `admin.schedules` and need no app code.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import signal

import anyio

from ..admin import schedules
from ..app import App
from ..db import schema
from ..exceptions import ConfigurationError
from .output import print_json
from .worker import connect

logger = logging.getLogger("pgtasks")


def run_scheduler(app: App, args: argparse.Namespace) -> int:
    if not app.schedules:
        raise ConfigurationError(
            f"the app {args.app} has no schedules: declare some with @app.periodic(...) or "
            "app.schedule(...)"
        )
    status: int = asyncio.run(_serve(app, args))
    return status


async def _serve(app: App, args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    scheduler = app.scheduler()
    with anyio.CancelScope() as scope:

        def on_signal(signum: int) -> None:
            logger.info("%s received, stopping", signal.Signals(signum).name)
            stopping.set()
            scope.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            if not await connect(app, args.connect_timeout, stopping):
                return 0
            await schema.check_installed(await app.pool())
            await scheduler.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await app.close()
    return 0


def _when(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    utc = value.astimezone(dt.timezone.utc)
    return f"{utc:%Y-%m-%d %H:%M:%S}" + (
        f".{utc.microsecond // 1000:03d}" if utc.microsecond else ""
    )


async def command(app: App, args: argparse.Namespace) -> int:
    """``schedules`` and its actions."""
    action = args.schedules_command or "list"
    database = app.database
    if action == "list":
        infos = await schedules.list_schedules(database)
        if args.json:
            print_json({"schedules": [i.as_json() for i in infos]})
            return 0
        if not infos:
            print("no schedules (a worker or scheduler writes its app's at start)")
            return 0
        header = (
            "name",
            "task",
            "schedule",
            "tz",
            "state",
            "next tick (UTC)",
            "last tick (UTC)",
            "last job",
        )
        rows = [
            (
                i.name,
                i.task,
                i.expression,
                i.timezone,
                i.state,
                _when(i.next_tick),
                _when(i.last_tick),
                f"{i.last_job or '-'}" + (f" ({i.last_job_id})" if i.last_job_id else ""),
            )
            for i in infos
        ]
        widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
        for r in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        return 0
    name = args.name
    if action == "trigger":
        ref = await schedules.trigger(database, name)
        if args.json:
            print_json(
                {
                    "schedule": name,
                    "id": ref.id,
                    "queue": ref.queue,
                    "task": ref.task,
                    "deduplicated": ref.deduplicated,
                }
            )
        elif ref.deduplicated:
            print(
                f"pgtasks: schedule {name!r}: job {ref.id} in {ref.queue} already holds this tick"
            )
        else:
            print(f"pgtasks: schedule {name!r}: enqueued job {ref.id} in {ref.queue}")
        return 0
    act = {"pause": schedules.pause, "resume": schedules.resume, "delete": schedules.delete}
    await act[action](database, name)
    done = {"pause": "paused", "resume": "resumed", "delete": "deleted"}[action]
    if args.json:
        print_json({"schedule": name, "action": done})
    else:
        print(f"pgtasks: schedule {name!r} {done}")
    return 0
