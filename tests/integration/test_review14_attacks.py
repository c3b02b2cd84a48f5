"""Attacks on periodic jobs (issue 14's review), in-process against a real database: the
scheduler's connections killed while it runs, host clocks hours off, definitions that change
between deploys or that two apps share, an old scheduler left alone with a schedule whose
newer definer is gone, ticks whose keys were pruned, a tick job that retries or dies, the
daylight-saving days walked pass by pass, and expressions at the edges (intervals too long
for a date, second-resolution wall-clock expressions that cost a pass seconds)."""

from __future__ import annotations

import datetime as dt
import itertools
import random
import time
from collections import Counter

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks import ConfigurationError
from pgtasks.periodic.schedule import CatchUp, Schedule, plan
from pgtasks.periodic.timing import Cron, Every, Timing
from pgtasks.worker import scheduler as scheduler_module
from pgtasks.worker.scheduler import Scheduler

from ..helpers import Events
from .test_periodic import db_now, jobs_of, run_for

UTC = dt.timezone.utc
SECOND = dt.timedelta(seconds=1)

KILL_OTHERS = """
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


def consecutive(ticks: list[dt.datetime], step: dt.timedelta = SECOND) -> bool:
    return all(b - a == step for a, b in itertools.pairwise(ticks))


# --- racing schedulers under connection loss and wrong host clocks -------------------------


async def test_killed_connections_make_no_duplicate_and_no_gap(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="attack_kill")
    async def tick() -> None:
        pass

    app.schedule(tick.s(), every=SECOND, name="kill")
    schedulers = [app.scheduler() for _ in range(3)]
    kills = 0

    async def killer() -> None:
        nonlocal kills
        rng = random.Random()
        await anyio.sleep(1.0)
        while True:
            # at a tick, when the schedulers fire, and between ticks
            now = await db_now(conn)
            await anyio.sleep(1 - now.timestamp() % 1 + rng.choice([0.0, 0.002, 0.01, 0.4]))
            kills += await conn.fetchval(KILL_OTHERS)

    start = await db_now(conn)
    async with anyio.create_task_group() as tg:
        tg.start_soon(killer)
        for s in schedulers:
            tg.start_soon(run_for, s, 8.5)
        await anyio.sleep(8.5)
        tg.cancel_scope.cancel()
    end = await db_now(conn)
    assert kills >= 5
    assert sum(s.stats["failed"] for s in schedulers) >= 3  # the kills reached them
    ticks = [j["tick"] for j in await jobs_of(conn, "attack_kill")]
    assert len(ticks) == len(set(ticks)), Counter(ticks).most_common(3)
    assert ticks == sorted(ticks)
    assert consecutive(ticks), ticks  # the reconnects were quick: nothing counted as missed
    expected = int((end - start).total_seconds())
    assert expected - 2 <= len(ticks) <= expected + 1


async def test_host_clocks_hours_off_or_jumping_change_nothing(
    app: pgtasks.App, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    @app.task(queue="attack_clock")
    async def tick() -> None:
        pass

    app.schedule(tick.s(), every=SECOND, name="clock")
    # the scheduler's only host clock, three hours ahead, and jumping an hour forward
    # every two seconds (a host suspended and resumed)
    real = time.monotonic
    began = real()

    def jumping() -> float:
        now = real()
        return now + 3 * 3600.0 + 3600.0 * ((now - began) // 2)

    monkeypatch.setattr(scheduler_module, "host_clock", jumping)
    schedulers = [app.scheduler() for _ in range(3)]
    start = await db_now(conn)
    async with anyio.create_task_group() as tg:
        for s in schedulers:
            tg.start_soon(run_for, s, 5.5)
    end = await db_now(conn)
    jobs = await jobs_of(conn, "attack_clock")
    ticks = [j["tick"] for j in jobs]
    assert len(ticks) == len(set(ticks))
    assert consecutive(ticks)
    assert all(t <= end for t in ticks)  # nothing early
    expected = int((end - start).total_seconds())
    assert expected - 1 <= len(ticks) <= expected + 1
    # a pass per tick or so, and one more at a jump: not a busy loop
    assert sum(s.stats["passes"] for s in schedulers) < 3 * 6 * 3


@pytest.mark.parametrize("what", ["row", "queue"])
async def test_a_schedule_locked_by_another_transaction_stops_no_other(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection, what: str
) -> None:
    """An operator's transaction left open on one schedule's row, or a VACUUM FULL of its
    queue: that schedule waits, and the others go on (the lock timeout is 2 s)."""

    @app.task(queue="attack_locked")
    async def held() -> None:
        pass

    @app.task(queue="attack_free")
    async def free() -> None:
        pass

    app.schedule(held.s(), every=SECOND, name="a-held")  # first in every loop and sort
    app.schedule(free.s(), every=SECOND, name="b-free", catch_up="none")  # on time only
    await run_for(app.scheduler(), 1.5)  # the rows and queues exist
    locker = await asyncpg.connect(db_dsn)
    scheduler = app.scheduler()  # starts while the lock is held: its first writes wait too
    try:
        async with anyio.create_task_group() as tg:
            tx = locker.transaction()
            await tx.start()
            if what == "row":
                await locker.execute(
                    "SELECT 1 FROM pgtasks.schedules WHERE name = 'a-held' FOR UPDATE"
                )
            else:
                await locker.execute("LOCK TABLE pgmq.q_attack_locked IN ACCESS EXCLUSIVE MODE")
            locked_at = await db_now(conn)
            tg.start_soon(scheduler.run)
            await anyio.sleep(8.0)
            await tx.rollback()
            released_at = await db_now(conn)
            await anyio.sleep(3.0)
            tg.cancel_scope.cancel()
    finally:
        await locker.close()
    jobs = await jobs_of(conn, "attack_free")
    free_ticks = [j["tick"] for j in jobs if locked_at < j["tick"] <= released_at - SECOND]
    assert len(free_ticks) >= 3, (free_ticks, scheduler.stats)  # it went on
    held_ticks = [j["tick"] for j in await jobs_of(conn, "attack_locked")]
    assert any(t > released_at for t in held_ticks)  # and the held one resumed
    for ticks in ([j["tick"] for j in jobs], held_ticks):
        assert len(ticks) == len(set(ticks))


# --- definitions that change, or that two apps share --------------------------------------


async def test_a_changed_timing_never_sends_a_tick_twice_nor_an_old_one(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="attack_change")
    async def tick(version: str) -> None:
        pass

    before = Scheduler(app.database, [Schedule("change", tick.s("v1"), Every(SECOND))])
    await run_for(before, 2.5)
    switched = await db_now(conn)
    # the next deploy: another interval, another task argument, then a time zone change of
    # a cron expression, then back to the first definition (a rollback)
    after = Scheduler(app.database, [Schedule("change", tick.s("v2"), Every(2 * SECOND))])
    await run_for(after, 3.5)
    zoned = Scheduler(
        app.database,
        [Schedule("change", tick.s("v3"), Cron("* * * * * *", "America/New_York"))],
    )
    await run_for(zoned, 1.5)
    rolled_back_at = await db_now(conn)
    await run_for(Scheduler(app.database, [Schedule("change", tick.s("v1"), Every(SECOND))]), 1.5)
    jobs = await jobs_of(conn, "attack_change")
    ticks = [j["tick"] for j in jobs]
    assert len(ticks) == len(set(ticks)), Counter(ticks).most_common(3)
    assert ticks == sorted(ticks)  # nothing from before a change came after it
    v2 = [j["tick"] for j in jobs if j["body"]["kwargs"]["version"] == "v2"]
    assert v2
    assert all(t > switched and t.timestamp() % 2 == 0 for t in v2)
    v1 = [j["tick"] for j in jobs if j["body"]["kwargs"]["version"] == "v1"]
    assert any(t > rolled_back_at for t in v1)  # the rollback fires again, from then on
    assert all(t <= switched or t > rolled_back_at - SECOND for t in v1)


async def test_two_apps_sharing_a_schedule_name_send_one_job_per_tick(
    app: pgtasks.App, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(queue="attack_shared")
    async def tick(which: str) -> None:
        pass

    first = Scheduler(app.database, [Schedule("shared", tick.s("a"), Cron("* * * * * *"))])
    second = Scheduler(app.database, [Schedule("shared", tick.s("b"), Every(2 * SECOND))])
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)
        await anyio.sleep(1.2)
        tg.start_soon(second.run)
        await anyio.sleep(0.3)
        switched = await db_now(conn)
        await anyio.sleep(3.0)
        tg.cancel_scope.cancel()
    jobs = await jobs_of(conn, "attack_shared")
    ticks = [j["tick"] for j in jobs]
    assert len(ticks) == len(set(ticks))
    assert {j["body"]["kwargs"]["which"] for j in jobs if j["tick"] > switched} == {"b"}
    assert "defined differently by a scheduler that started later" in caplog.text


async def test_an_old_scheduler_takes_back_a_schedule_whose_newer_definer_is_gone(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    """A rolling deploy rolled back (or two apps sharing a name, one of them stopped): the
    scheduler still running with the other definition must not leave the schedule dead."""

    @app.task(queue="attack_takeback")
    async def tick(version: str) -> None:
        pass

    def make(version: str) -> Scheduler:
        return Scheduler(
            app.database,
            [Schedule("takeback", tick.s(version), Every(SECOND))],
            sync_interval=0.3,
            orphan_after=1.0,
        )

    old, new = make("old"), make("new")
    async with anyio.create_task_group() as tg:
        tg.start_soon(old.run)
        await anyio.sleep(1.2)
        async with anyio.create_task_group() as new_tg:  # the new code, for a while
            new_tg.start_soon(new.run)
            await anyio.sleep(2.0)
            new_tg.cancel_scope.cancel()
        gone = await db_now(conn)
        await anyio.sleep(4.5)  # orphaned after a second, then taken back by the old one
        tg.cancel_scope.cancel()
    jobs = await jobs_of(conn, "attack_takeback")
    ticks = [j["tick"] for j in jobs]
    assert len(ticks) == len(set(ticks))
    later = [j for j in jobs if j["tick"] > gone]
    assert len(later) >= 2, jobs
    assert {j["body"]["kwargs"]["version"] for j in later} == {"old"}
    assert await conn.fetchval("SELECT orphaned_at IS NULL FROM pgtasks.schedules")


# --- keys, retries and dead letters --------------------------------------------------------


async def test_a_pruned_key_never_lets_an_old_tick_be_enqueued_again(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="attack_prune")
    async def tick() -> None:
        pass

    app.schedule(tick.s(), every=SECOND, name="prune", catch_up=100)
    async with app.worker() as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] >= 3, timeout=10)
    first = [j["tick"] for j in await jobs_of(conn, "attack_prune")]
    # their keys expire and are pruned; the operator even deletes the schedule's row
    await conn.execute("UPDATE pgtasks.idempotency_keys SET expires_at = now() - interval '1s'")
    assert (await app.prune())["keys"] >= 3
    assert not await conn.fetchval(
        "SELECT count(*) FROM pgtasks.idempotency_keys WHERE key LIKE 'pgtasks:schedule:prune:%'"
    )
    await run_for(app.scheduler(), 1.5)  # a scheduler that just started: catch_up=100
    await conn.execute("DELETE FROM pgtasks.schedules")
    await run_for(app.scheduler(), 1.5)
    ticks = [j["tick"] for j in await jobs_of(conn, "attack_prune")]
    assert len(ticks) == len(set(ticks)), Counter(ticks).most_common(3)
    assert ticks[: len(first)] == first


async def test_a_retried_tick_job_keeps_its_tick_and_a_dead_one_stops_no_later_tick(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    seen: list[tuple[str, dt.datetime | None, int]] = []

    @app.task(queue="attack_retry", max_retries=1, retry_backoff=0.5, retry_jitter=False)
    async def flaky() -> None:
        job = pgtasks.current_job()
        seen.append(("flaky", job.scheduled_at, job.attempt))
        if job.attempt == 1:
            raise RuntimeError("first attempt fails")

    @app.task(queue="attack_retry", max_retries=0)
    async def doomed() -> None:
        job = pgtasks.current_job()
        seen.append(("doomed", job.scheduled_at, job.attempt))
        raise RuntimeError("always fails")

    app.schedule(flaky.s(), every=SECOND, name="flaky")
    app.schedule(doomed.s(), every=SECOND, name="doomed")
    async with app.worker() as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] >= 3, timeout=15)
        await events.until(lambda: events.counts["dead"] >= 3, timeout=15)
    retried = [(tick, attempt) for name, tick, attempt in seen if name == "flaky"]
    by_tick: dict[dt.datetime | None, list[int]] = {}
    for tick, attempt in retried:
        by_tick.setdefault(tick, []).append(attempt)
    done = [t for t, attempts in by_tick.items() if attempts == [1, 2]]
    assert len(done) >= 3, by_tick  # both attempts saw the same tick
    assert None not in by_tick
    dead = await conn.fetch(
        "SELECT headers ->> 'x-pgtasks-scheduled-at' AS tick FROM pgtasks.dead_letters "
        "WHERE headers ->> 'x-pgtasks-schedule' = 'doomed' ORDER BY msg_id"
    )
    dead_ticks = [dt.datetime.fromisoformat(r["tick"]) for r in dead]
    assert len(dead_ticks) >= 3
    assert len(set(dead_ticks)) == len(dead_ticks)
    assert consecutive(dead_ticks)  # each later tick ran, and died, in its turn


# --- catch-up after a long downtime --------------------------------------------------------


@pytest.mark.parametrize(("catch_up", "count"), [("none", 0), ("latest", 1), (1000, 1000)])
async def test_a_week_down_never_floods(
    app: pgtasks.App, conn: asyncpg.Connection, catch_up: CatchUp, count: int
) -> None:
    @app.task(queue="attack_week")
    async def tick() -> None:
        pass

    app.schedule(tick.s(), cron="* * * * * *", tz="Europe/Paris", name="week", catch_up=catch_up)
    await run_for(app.scheduler(), 0.2)  # defines the row
    week_ago = await db_now(conn) - dt.timedelta(days=7)
    await conn.execute("SELECT pgtasks.ensure_queue('attack_week')")
    await conn.execute("DELETE FROM pgmq.q_attack_week")
    await conn.execute("UPDATE pgtasks.schedules SET watermark = $1", week_ago)
    started = time.monotonic()
    await run_for(app.scheduler(), 1.0)
    assert time.monotonic() - started < 5
    ticks = [j["tick"] for j in await jobs_of(conn, "attack_week")]
    assert len(ticks) == len(set(ticks))
    assert count <= len(ticks) <= count + 2  # the policy's, and the seconds of the run
    assert consecutive(ticks)


# --- expressions and time zones at the edges -----------------------------------------------


def test_an_interval_too_long_for_a_date_is_refused_at_declaration() -> None:
    app = pgtasks.App("postgresql://unused")

    @app.task
    async def tick() -> None:
        pass

    for days in (999_999_999, 3_000_000):
        with pytest.raises(ConfigurationError, match="every must be at most 50 years"):
            app.schedule(tick.s(), every=dt.timedelta(days=days), name=f"long-{days}")
    app.schedule(tick.s(), every=dt.timedelta(days=365 * 40), name="forty-years")


@pytest.mark.parametrize(
    ("cron", "tz", "message"),
    [
        ("0 0 31 2 *", "UTC", "invalid cron expression '0 0 31 2 \\*': bad day-of-month"),
        ("0 0 30 2 *", "UTC", "'0 0 30 2 \\*'"),
        ("*/0 * * * *", "UTC", "'\\*/0 \\* \\* \\* \\*': bad minute"),
        ("5-1 * * * *", "UTC", "'5-1 \\* \\* \\* \\*': bad minute"),
        ("@daily", "UTC", "'@daily': it has 1 field"),
        ("0 3 * * *", "Europe/Pariss", "unknown time zone 'Europe/Pariss'"),
        ("0 3 * * *", "europe/paris", "unknown time zone 'europe/paris'"),
        ("0 3 * * *", "../../etc/passwd", "unknown time zone '../../etc/passwd'"),
    ],
)
def test_invalid_expressions_and_zones_fail_at_declaration_naming_them(
    cron: str, tz: str, message: str
) -> None:
    app = pgtasks.App("postgresql://unused")

    @app.task
    async def tick() -> None:
        pass

    with pytest.raises(ConfigurationError, match=message):
        app.periodic(cron, tz=tz)(tick)
    assert app.schedules == {}


@pytest.mark.parametrize("cron", ["5-50/15 * * * *", "0-59/7 * * * *", "0 9-17/2 * * MON-FRI"])
def test_step_and_range_syntax(cron: str) -> None:
    timing = Cron(cron, "Europe/Paris")
    start = dt.datetime(2025, 6, 2, 0, 0, tzinfo=UTC)  # a Monday
    ticks = timing.latest(start + dt.timedelta(days=1), start, 100)
    local = [t.astimezone(timing._zone) for t in ticks]
    if cron.startswith("5-50"):
        assert {t.minute for t in local} == {5, 20, 35, 50}
    elif cron.startswith("0-59/7"):
        assert {t.minute for t in local} == set(range(0, 60, 7))
    else:
        assert {t.hour for t in local} == {9, 11, 13, 15, 17}
        assert len(ticks) == 5


def test_a_second_resolution_wall_clock_expression_costs_little_per_pass() -> None:
    # ranges rather than '*' make it a wall-clock expression (Debian's rule); a pass must
    # not walk hours of its ticks
    timing = Cron("* 0-59 0-23 * * *", "Europe/Paris")
    assert timing.wall_clock
    now = dt.datetime(2025, 6, 1, 12, 0, 0, 400_000, tzinfo=UTC)
    started = time.perf_counter()
    for i in range(20):
        at = now + i * SECOND
        todo = plan(timing, "latest", at - SECOND, at, at - SECOND)
        assert todo.ticks == (at.replace(microsecond=0),)
        assert timing.next_after(at) == at.replace(microsecond=0) + SECOND
    assert time.perf_counter() - started < 2.0


DST_DAYS = [
    ("Europe/Paris", dt.date(2025, 3, 30)),
    ("Europe/Paris", dt.date(2025, 10, 26)),
    ("America/New_York", dt.date(2025, 3, 9)),
    ("America/New_York", dt.date(2025, 11, 2)),
    ("Australia/Sydney", dt.date(2025, 4, 6)),
    ("Australia/Sydney", dt.date(2025, 10, 5)),
    ("Australia/Lord_Howe", dt.date(2025, 4, 6)),
    ("America/Santiago", dt.date(2025, 4, 5)),  # midnight back to 23:00
    ("America/Santiago", dt.date(2025, 9, 7)),  # midnight skipped
]
DST_EXPRESSIONS = [
    "30 2 * * *",
    "0,30 1,2,3 * * *",
    "0 * * * *",
    "*/20 * * * *",
    "15 1-3 * * *",
    "0-59/10 2 * * *",
    "30 1 * * *",
    "*/30 0-59 2 * * *",
    "0 0 * * *",
    "30 23 * * *",
]
DAILY = ("30 2 * * *", "0 0 * * *", "30 23 * * *")


def walk_passes(timing: Timing, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """A scheduler's passes at random moments from start to end: the ticks it enqueues."""
    rng = random.Random(f"{timing!r}{start}")
    watermark, watching, now = start, start, start
    sent: list[dt.datetime] = []
    while now < end:
        now += dt.timedelta(seconds=rng.choice([1, 7, 59, 600, 1799]), microseconds=1000)
        todo = plan(timing, 1000, watermark, now, watching)
        sent.extend(todo.ticks)
        if todo.advance_to is not None:
            watermark = max(watermark, todo.advance_to)
        watching = now
    return sent


@pytest.mark.parametrize(("tz", "day"), DST_DAYS)
def test_daylight_saving_days_walked_pass_by_pass(tz: str, day: dt.date) -> None:
    zone = Cron("0 0 * * *", tz)._zone
    start = dt.datetime.combine(day, dt.time(0), zone).astimezone(UTC) - dt.timedelta(hours=2)
    end = start + dt.timedelta(hours=28)
    for expression in DST_EXPRESSIONS:
        timing = Cron(expression, tz)
        expected: list[dt.datetime] = []
        tick = timing.next_after(start)
        while tick is not None and tick <= end:
            expected.append(tick)
            tick = timing.next_after(tick)
        sent = [t for t in walk_passes(timing, start, end + dt.timedelta(hours=1)) if t <= end]
        assert sent == expected, (tz, day, expression)
        assert len(set(sent)) == len(sent)
        # and the backward walk a pass makes, from every moment of the day
        for minutes in range(0, 28 * 60, 7):
            until = start + dt.timedelta(minutes=minutes, seconds=minutes % 60)
            after = until - dt.timedelta(hours=4)
            window = [t for t in expected if after < t <= until]
            if after >= start and until <= end:
                assert timing.latest(until, after, 1000) == window, (expression, until)
        if expression in DAILY:  # once a day, whatever the clock does
            days = Counter(t.astimezone(zone).date() for t in sent)
            assert set(days.values()) == {1}, (tz, day, expression, sent)
            assert day in days


def test_every_and_its_ticks_ignore_time_zones_entirely() -> None:
    timing = Every(dt.timedelta(minutes=90))
    start = dt.datetime(2025, 10, 25, 20, tzinfo=UTC)
    sent = walk_passes(timing, start, start + dt.timedelta(hours=12))
    assert consecutive(sent, dt.timedelta(minutes=90))
