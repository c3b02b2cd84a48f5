"""Periodic jobs on a real database, in-process: the job knows its tick, racing schedulers
make one job per tick, the database refuses early ticks and never moves a watermark back,
catch-up after downtime under each policy, pause and resume, trigger, orphaned schedules, a
rolling deploy's two definitions, the built-in prune schedule, and the checks at
decoration."""

from __future__ import annotations

import ast
import datetime as dt
import inspect
import itertools
import zoneinfo
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import orjson
import pytest

import pgtasks
from pgtasks import ConfigurationError, ScheduleNotFound
from pgtasks.admin import schedules as admin
from pgtasks.db import schedules as sql
from pgtasks.periodic.schedule import Schedule
from pgtasks.periodic.timing import Every
from pgtasks.worker import scheduler as scheduler_module
from pgtasks.worker.scheduler import Scheduler

from ..helpers import Events

UTC = dt.timezone.utc
SECOND = dt.timedelta(seconds=1)


async def run_for(scheduler: Scheduler, seconds: float) -> None:
    with anyio.move_on_after(seconds):
        await scheduler.run()


async def jobs_of(conn: asyncpg.Connection, queue: str) -> list[dict[str, Any]]:
    """Every message of a queue, waiting or archived: id, tick, key, body."""
    rows = await conn.fetch(
        f"""SELECT msg_id, headers::text, message::text FROM pgmq.q_{queue}
            UNION ALL SELECT msg_id, headers::text, message::text FROM pgmq.a_{queue}
            ORDER BY msg_id"""
    )
    found = []
    for r in rows:
        headers = orjson.loads(r[1])
        found.append(
            {
                "id": r[0],
                "tick": dt.datetime.fromisoformat(headers["x-pgtasks-scheduled-at"]),
                "key": headers["idempotency_key"],
                "schedule": headers["x-pgtasks-schedule"],
                "body": orjson.loads(r[2]),
            }
        )
    return found


async def db_now(conn: asyncpg.Connection) -> dt.datetime:
    now: dt.datetime = await conn.fetchval("SELECT clock_timestamp()")
    return now


async def test_a_scheduled_job_knows_its_tick(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    seen: list[pgtasks.JobContext] = []

    @app.periodic(every=SECOND)
    @app.task(queue="periodic_ticks")
    async def tick() -> None:
        seen.append(pgtasks.current_job())

    @app.task(queue="periodic_ticks")
    async def plain() -> None:
        seen.append(pgtasks.current_job())

    await app.migrate()
    await plain.defer()
    async with app.worker() as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] >= 4, timeout=10)
    assert seen[0].task == plain.name
    assert seen[0].scheduled_at is None
    scheduled = [c for c in seen if c.task == tick.name]
    for ctx in scheduled:
        assert ctx.scheduled_at is not None
        assert ctx.scheduled_at.microsecond == 0
        assert ctx.scheduled_at.tzinfo is not None
        assert ctx.idempotency_key == (
            f"pgtasks:schedule:{tick.name}:{ctx.scheduled_at:%Y-%m-%dT%H:%M:%S.%f}Z"
        )
        assert ctx.headers["x-pgtasks-schedule"] == tick.name
        assert ctx.enqueued_at >= ctx.scheduled_at  # never early, on the database clock
    ticks = [c.scheduled_at for c in scheduled]
    assert len(set(ticks)) == len(ticks)
    (row,) = await admin.list_schedules(app.database)
    assert row.state == "active"
    assert row.expression == "every 1s"
    assert row.last_job is not None


async def test_racing_schedulers_make_exactly_one_job_per_tick(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="periodic_race")
    async def tick() -> None:
        pass

    app.schedule(tick.s(), every=SECOND, name="race")
    schedulers = [app.scheduler() for _ in range(8)]
    start = await db_now(conn)
    async with anyio.create_task_group() as tg:
        for s in schedulers:
            tg.start_soon(run_for, s, 4.5)
    end = await db_now(conn)
    jobs = await jobs_of(conn, "periodic_race")
    ticks = [j["tick"] for j in jobs]
    assert len(ticks) == len(set(ticks)), Counter(ticks).most_common(3)
    # every tick of the run, none skipped: consecutive seconds
    assert ticks == sorted(ticks)
    assert all(b - a == SECOND for a, b in itertools.pairwise(ticks))
    expected = int((end - start).total_seconds())
    # the first scheduler's first pass may come a second late on a loaded machine (its
    # catch-up sends only the latest tick missed): the ticks stay consecutive
    assert expected - 2 <= len(ticks) <= expected + 1
    assert sum(s.stats["enqueued"] for s in schedulers) == len(ticks)


async def test_the_database_refuses_early_ticks_and_keeps_the_watermark_moving_forward(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="periodic_guard")
    async def tick() -> None:
        pass

    schedule = app.schedule(tick.s(), every=dt.timedelta(minutes=1), name="guard")
    definition = schedule.definition(app.max_message_size)
    await sql.schedules_define(conn, [definition])
    now = await db_now(conn)
    watermark = await conn.fetchval("SELECT watermark FROM pgtasks.schedules")
    fp = definition.fingerprint
    # a host ten minutes ahead would compute these: refused, and the watermark stays
    future = [now + dt.timedelta(minutes=m) for m in (5, 10)]
    fired = await sql.schedule_fire(conn, "guard", fp, future, future[-1], None)
    assert fired.state == "early"
    fired = await sql.schedule_fire(conn, "guard", fp, [], future[-1], None)
    assert fired.state == "early"
    assert await conn.fetchval("SELECT watermark FROM pgtasks.schedules") == watermark
    # a tick that is due is sent once, however often it is fired
    due = watermark + dt.timedelta(microseconds=1)
    for _ in range(3):
        fired = await sql.schedule_fire(conn, "guard", fp, [due], due, None)
    assert len(await jobs_of(conn, "periodic_guard")) == 1
    # a slow scheduler's older plan never moves the watermark back
    later = await conn.fetchval("SELECT watermark FROM pgtasks.schedules")
    fired = await sql.schedule_fire(conn, "guard", fp, [watermark], watermark, None)
    assert fired.state == "nothing"
    assert await conn.fetchval("SELECT watermark FROM pgtasks.schedules") == later
    # a scheduler with another definition of it is left out
    fired = await sql.schedule_fire(conn, "guard", "other", [due], due, None)
    assert fired.state == "changed"


async def wait_for_phase(conn: asyncpg.Connection, period: int, low: float, high: float) -> None:
    """Until the database's clock is between ``low`` and ``high`` seconds past a multiple of
    ``period`` seconds, so that a test knows which ticks are close."""
    with anyio.fail_after(period + 2):
        while True:
            now = await db_now(conn)
            phase = now.timestamp() % period
            if low <= phase <= high:
                return
            await anyio.sleep(0.05)


POLICIES: dict[str, tuple[Any, int]] = {
    "none": ("none", 0),
    "latest": ("latest", 1),
    "three": (3, 3),
    "hundred": (100, 30),  # at most 100: the 30 there are
}


async def test_catch_up_after_five_minutes_down_under_each_policy(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="periodic_catch_up")
    async def tick() -> None:
        pass

    for name, (catch_up, _) in POLICIES.items():
        app.schedule(tick.s(), every=dt.timedelta(seconds=10), name=name, catch_up=catch_up)
    definitions = [s.definition(app.max_message_size) for s in app.schedules.values()]
    await sql.schedules_define(conn, definitions)
    await conn.execute("SELECT pgtasks.ensure_queue('periodic_catch_up')")
    # the last tick enqueued five minutes ago, every scheduler down since; restart at 1 to
    # 5 s past a tick, so that no tick is within a second of the restart nor during the run
    await wait_for_phase(conn, 10, 1.0, 5.0)
    restart = await db_now(conn)
    latest = dt.datetime.fromtimestamp(restart.timestamp() // 10 * 10, UTC)
    await conn.execute(
        "UPDATE pgtasks.schedules SET watermark = $1, last_tick = $1",
        latest - dt.timedelta(minutes=5),
    )
    await run_for(app.scheduler(), 2.0)
    jobs = await jobs_of(conn, "periodic_catch_up")
    for name, (_, count) in POLICIES.items():
        ticks = [j["tick"] for j in jobs if j["schedule"] == name]
        expected = [latest - dt.timedelta(seconds=10 * k) for k in reversed(range(count))]
        assert ticks == expected, name
    rows = await conn.fetch("SELECT name, watermark, next_tick FROM pgtasks.schedules")
    assert len(rows) == len(POLICIES)
    for row in rows:
        assert row["watermark"] == latest, row  # the skipped ticks are done with too
        assert row["next_tick"] == latest + dt.timedelta(seconds=10), row


async def test_pause_resume_trigger_and_delete(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    @app.task(queue="periodic_ops")
    async def tick(label: str) -> None:
        pass

    app.schedule(tick.s("x"), every=SECOND, name="ops")
    scheduler = app.scheduler()
    async with anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        await anyio.sleep(1.5)
        await admin.pause(app.database, "ops")
        await anyio.sleep(0.2)  # a pass that read the row before the pause may still fire
        paused_count = len(await jobs_of(conn, "periodic_ops"))
        assert paused_count >= 1
        await anyio.sleep(2.5)
        assert len(await jobs_of(conn, "periodic_ops")) == paused_count
        (info,) = await admin.list_schedules(app.database)
        assert info.state == "paused"
        # triggered while paused: one job now, and the ticks stay paused
        ref = await admin.trigger(app.database, "ops")
        assert ref.task == tick.name
        assert ref.queue == "periodic_ops"
        assert not ref.deduplicated
        jobs = await jobs_of(conn, "periodic_ops")
        assert len(jobs) == paused_count + 1
        assert jobs[-1]["id"] == ref.id
        assert jobs[-1]["body"] == {"v": 1, "task": tick.name, "kwargs": {"label": "x"}}
        resumed_at = await db_now(conn)
        await admin.resume(app.database, "ops")
        await anyio.sleep(2.3)
        tg.cancel_scope.cancel()
    jobs = await jobs_of(conn, "periodic_ops")
    after = [j["tick"] for j in jobs[paused_count + 1 :]]
    # the ticks of the pause were not caught up: only those after the resume
    assert 1 <= len(after) <= 3
    assert all(t > resumed_at for t in after)
    with pytest.raises(ScheduleNotFound, match="no schedule named 'nope'"):
        await admin.pause(app.database, "nope")
    with pytest.raises(ScheduleNotFound):
        await admin.trigger(app.database, "nope")
    await admin.delete(app.database, "ops")
    assert await admin.list_schedules(app.database) == []


async def test_a_schedule_not_due_yet_lists_its_next_tick(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.periodic("0 6 * * 1", tz="Europe/Paris")
    @app.task(queue="periodic_weekly")
    async def weekly() -> None:
        pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(app.scheduler().run)
        with anyio.fail_after(10):  # its first pass fires nothing, and says when it will
            while not (infos := await admin.list_schedules(app.database)) or (
                infos[0].next_tick is None
            ):
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    (info,) = infos
    assert info.next_tick is not None
    now = await db_now(conn)
    assert now < info.next_tick <= now + dt.timedelta(days=7)
    paris = info.next_tick.astimezone(zoneinfo.ZoneInfo("Europe/Paris"))
    assert (paris.weekday(), paris.hour, paris.minute, paris.second) == (0, 6, 0, 0)
    assert (info.last_tick, info.last_job, info.last_job_id) == (None, None, None)


async def test_a_schedule_removed_from_the_code_is_orphaned(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    @app.task(queue="periodic_orphans")
    async def tick(which: str) -> None:
        pass

    app.schedule(tick.s("kept"), every=SECOND, name="kept")
    app.schedule(tick.s("removed"), every=SECOND, name="removed")
    await run_for(app.scheduler(), 1.2)  # the old code defined both
    # the new code defines one; its scheduler marks the other, quickly in this test
    new = Scheduler(
        app.database,
        [app.schedules["kept"]],
        max_message_size=app.max_message_size,
        sync_interval=0.3,
        orphan_after=1.0,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(new.run)
        await anyio.sleep(2.0)
        removed_jobs = [
            j for j in await jobs_of(conn, "periodic_orphans") if j["schedule"] == "removed"
        ]
        await anyio.sleep(1.5)
        tg.cancel_scope.cancel()
    after = [j for j in await jobs_of(conn, "periodic_orphans") if j["schedule"] == "removed"]
    assert after == removed_jobs  # no longer fired
    states = {i.name: i for i in await admin.list_schedules(app.database)}
    assert states["removed"].state == "orphaned"
    assert states["removed"].orphaned_at is not None
    assert states["removed"].next_tick is None
    assert states["kept"].state == "active"
    with pytest.raises(ScheduleNotFound, match="orphaned"):
        await admin.trigger(app.database, "removed")
    # the old code back (a rollback): its scheduler takes the schedule up again
    await run_for(app.scheduler(), 0.5)
    states = {i.name: i for i in await admin.list_schedules(app.database)}
    assert states["removed"].state == "active"


async def test_a_rolling_deploy_leaves_a_schedule_to_the_newest_definition(
    app: pgtasks.App, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(queue="periodic_deploy")
    async def tick(version: str) -> None:
        pass

    old = Scheduler(app.database, [Schedule("report", tick.s("old"), Every(SECOND))])
    new = Scheduler(app.database, [Schedule("report", tick.s("new"), Every(SECOND))])
    async with anyio.create_task_group() as tg:
        tg.start_soon(old.run)
        await anyio.sleep(1.5)
        tg.start_soon(new.run)
        await anyio.sleep(0.3)
        switched = await db_now(conn)
        await anyio.sleep(2.0)
        tg.cancel_scope.cancel()
    jobs = await jobs_of(conn, "periodic_deploy")
    assert {j["body"]["kwargs"]["version"] for j in jobs if j["tick"] > switched} == {"new"}
    assert len({j["tick"] for j in jobs}) == len(jobs)
    assert "defined differently by a scheduler that started later" in caplog.text


async def test_the_built_in_prune_schedule(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    schedule = app.schedule_prune(every=SECOND, archive_older_than=dt.timedelta(days=30))
    assert schedule.name == "pgtasks.prune"
    assert "pgtasks.prune" in app.tasks
    await conn.execute(
        "INSERT INTO pgtasks.idempotency_keys (key, queue, msg_id, expires_at) "
        "VALUES ('old', 'default', 1, now() - interval '1 day')"
    )
    await app.migrate()
    async with app.worker() as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] >= 1, timeout=10)
    assert events.of("succeeded")[0].task == "pgtasks.prune"
    assert not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pgtasks.idempotency_keys WHERE key = 'old')"
    )
    with pytest.raises(ConfigurationError, match=r"two schedules are named 'pgtasks\.prune'"):
        app.schedule_prune()


async def test_workers_without_a_scheduler(app: pgtasks.App) -> None:
    @app.periodic(every=SECOND)
    @app.task(queue="periodic_off")
    async def tick() -> None:
        pass

    assert app.worker().scheduler is not None
    assert app.worker(schedule=False).scheduler is None
    assert app.worker(burst=True).scheduler is None


def test_errors_at_decoration() -> None:
    app = pgtasks.App("postgresql://unused@127.0.0.1:1/unused")

    @app.task(queue="periodic_decl")
    async def needs(n: int) -> None:
        pass

    @app.task(queue="periodic_decl")
    async def free() -> None:
        pass

    async def plain() -> None:
        pass

    with pytest.raises(ConfigurationError, match=r"invalid cron expression '\*/5 \* \* \*'"):
        app.periodic("*/5 * * *")
    with pytest.raises(ConfigurationError, match="unknown time zone 'Mars/Olympus'"):
        app.periodic("0 3 * * *", tz="Mars/Olympus")
    with pytest.raises(ConfigurationError, match="either a cron expression"):
        app.periodic()
    with pytest.raises(ConfigurationError, match="either a cron expression"):
        app.periodic("* * * * *", every=SECOND)
    with pytest.raises(ConfigurationError, match="tz applies to cron"):
        app.periodic(every=SECOND, tz="Europe/Paris")
    with pytest.raises(ConfigurationError, match="catch_up must be"):
        app.periodic("* * * * *", catch_up="all")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"goes above @app\.task"):
        app.periodic("* * * * *")(plain)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"needs arguments .*app.schedule\(task.s"):
        app.periodic("* * * * *")(needs)
    app.periodic("0 3 * * *", tz="Europe/Paris")(free)
    with pytest.raises(ConfigurationError, match="two schedules are named"):
        app.periodic("0 4 * * *")(free)
    app.schedule(needs.s(1), cron="0 4 * * *", name="needs-1")
    with pytest.raises(TypeError, match="a call of a task"):
        app.schedule(needs, cron="0 4 * * *")  # type: ignore[arg-type]
    assert sorted(app.schedules) == sorted([free.name, "needs-1"])
    assert app.schedules[free.name].describe() == "0 3 * * * (Europe/Paris)"


def test_the_scheduler_reads_instants_only_from_the_database() -> None:
    # the host's wall clock is never read where ticks are computed or sent: only the
    # database's now(), and a monotonic clock for durations
    sources = [inspect.getsource(scheduler_module)]
    sources += [Path(p).read_text() for p in Path(pgtasks.__file__).parent.glob("periodic/*.py")]
    wall_clock = {"now", "utcnow", "today", "time", "time_ns", "localtime", "gmtime"}
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr in wall_clock:
                owner = ast.unparse(node.value)
                assert owner not in ("dt.datetime", "datetime", "time", "dt.date"), ast.unparse(
                    node
                )


def _ticks(jobs: Sequence[dict[str, Any]]) -> list[dt.datetime]:
    return [j["tick"] for j in jobs]


async def test_the_worker_role_may_run_schedulers_and_producers_may_not(
    conn: asyncpg.Connection,
) -> None:
    if not await conn.fetchval("SELECT to_regrole('pgtasks_worker') IS NOT NULL"):
        pytest.skip("the group roles do not exist on this server")
    checks = {
        "SELECT has_table_privilege('pgtasks_worker', 'pgtasks.schedules', 'UPDATE')": True,
        "SELECT has_function_privilege('pgtasks_worker', "
        "'pgtasks.schedule_fire(text, text, timestamptz[], timestamptz, timestamptz)', "
        "'EXECUTE')": True,
        "SELECT has_table_privilege('pgtasks_producer', 'pgtasks.schedules', 'SELECT')": False,
    }
    for query, expected in checks.items():
        assert await conn.fetchval(query) is expected, query


async def test_no_error_stops_the_scheduler_and_one_bad_schedule_stops_no_other(
    app: pgtasks.App,
    conn: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    @app.task(queue="periodic_errors")
    async def tick(which: str) -> None:
        pass

    app.schedule(tick.s("good"), every=SECOND, name="good")
    app.schedule(tick.s("bad"), every=SECOND, name="bad")
    real_fire = sql.schedule_fire
    calls = Counter[str]()

    async def flaky_fire(conn: Any, name: str, *args: Any) -> sql.Fired:
        calls[name] += 1
        if name == "bad":
            raise asyncpg.InvalidParameterValueError("refused for this test")
        if calls[name] == 2:
            raise ConnectionResetError("the connection broke, for this test")
        return await real_fire(conn, name, *args)

    monkeypatch.setattr(sql, "schedule_fire", flaky_fire)
    scheduler = app.scheduler()
    await run_for(scheduler, 4.5)
    jobs = await jobs_of(conn, "periodic_errors")
    assert {j["schedule"] for j in jobs} == {"good"}
    assert len(jobs) >= 2  # before and after the broken connection
    assert scheduler.stats["failed"] >= 1
    assert caplog.text.count("the database refused its ticks") == 1  # said once
    assert "a pass failed (the connection broke, for this test); retrying" in caplog.text
