"""Which ticks a scheduler pass enqueues (`periodic.schedule.plan`), with fixed database
times: on-time ticks, missed ticks under each catch-up policy, a scheduler that just started
or was blocked, and the daylight-saving days through a day of passes."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any

import pytest

import pgtasks
from pgtasks import ConfigurationError
from pgtasks.periodic.schedule import (
    STALL_LIMIT,
    TOLERANCE,
    CatchUp,
    Schedule,
    check_catch_up,
    plan,
    scheduled_at,
    tick_key,
)
from pgtasks.periodic.timing import Cron, Every

UTC = dt.timezone.utc
NOW = dt.datetime(2025, 6, 1, 12, 0, 0, 300_000, tzinfo=UTC)
MINUTE = Every(dt.timedelta(minutes=1))


def at(minutes: float) -> dt.datetime:
    """NOW's minute plus ``minutes``."""
    return NOW.replace(microsecond=0, second=0) + dt.timedelta(minutes=minutes)


def test_nothing_due() -> None:
    p = plan(MINUTE, "latest", NOW, NOW + dt.timedelta(seconds=10), NOW)
    assert p.ticks == ()
    assert p.advance_to is None


def test_a_running_scheduler_enqueues_the_tick_that_came_due() -> None:
    # previous pass at 11:59:59.5, watermark at the 11:59 tick; now 12:00:00.3
    p = plan(MINUTE, "none", at(-1), NOW, NOW - dt.timedelta(seconds=0.8))
    assert p.ticks == (at(0),)
    assert p.advance_to == at(0)
    assert not p.missed


def test_a_late_pass_still_counts_what_came_due_while_watching_as_on_time() -> None:
    # blocked for 45 seconds, under the stall limit: every tick since the last pass
    ten = Every(dt.timedelta(seconds=10))
    p = plan(ten, "none", at(-50 / 60), NOW, NOW - dt.timedelta(seconds=45))
    assert p.ticks == tuple(at(-s / 60) for s in (40, 30, 20, 10, 0))
    assert not p.missed


def test_a_blocked_scheduler_catches_up_by_the_policy_beyond_the_stall_limit() -> None:
    p = plan(MINUTE, "latest", at(-10), NOW, NOW - dt.timedelta(minutes=9))
    assert at(0) > NOW - STALL_LIMIT
    assert p.ticks == (at(-1), at(0))  # the latest missed one, and the on-time one
    assert p.missed
    assert p.advance_to == at(0)


@pytest.mark.parametrize(
    ("catch_up", "enqueued"),
    [
        ("none", []),
        ("latest", [-1]),
        (0, []),
        (1, [-1]),
        (3, [-3, -2, -1]),
        (50, [-5, -4, -3, -2, -1]),  # at most N: there are only five
    ],
)
def test_after_downtime_each_policy(catch_up: CatchUp, enqueued: list[int]) -> None:
    # every scheduler down for five minutes; one starts at 12:00:30 (no tick within the
    # last second): the ticks 11:56 .. 12:00 were missed
    now = at(0.5)
    p = plan(MINUTE, catch_up, at(-5), now, None)
    assert p.ticks == tuple(at(m + 1) for m in enqueued)
    assert p.advance_to == at(0)  # skipped ticks are done with too
    assert p.missed


def test_a_tick_within_the_tolerance_is_on_time_for_a_starting_scheduler() -> None:
    # another scheduler may be about to send it: "none" must not skip it
    now = at(0) + TOLERANCE / 2
    p = plan(MINUTE, "none", at(-5), now, None)
    assert p.ticks == (at(0),)
    assert p.advance_to == at(0)


def test_never_a_flood() -> None:
    second = Every(dt.timedelta(seconds=1))
    year_ago = NOW - dt.timedelta(days=365)
    assert len(plan(second, "latest", year_ago, NOW, None).ticks) <= 2
    assert len(plan(second, 10, year_ago, NOW, None).ticks) <= 11
    # a scheduler blocked for an hour sends at most the stall limit's worth on time
    p = plan(second, "none", NOW - dt.timedelta(hours=1), NOW, NOW - dt.timedelta(hours=1))
    assert len(p.ticks) == STALL_LIMIT.total_seconds()


def test_the_watermark_bounds_everything() -> None:
    # the watermark past the horizon (another scheduler was there): only after it
    p = plan(MINUTE, 5, at(-1), NOW, None)
    assert p.ticks == (at(0),)


def day_of_passes(c: Cron, start: dt.datetime, hours: int) -> list[dt.datetime]:
    """A running scheduler's passes, once a second for ``hours`` of database time, the
    watermark moving as the database function moves it; returns every tick enqueued."""
    sent: list[dt.datetime] = []
    watermark = start
    now = start
    previous: dt.datetime | None = None
    end = start + dt.timedelta(hours=hours)
    while now < end:
        p = plan(c, "latest", watermark, now, previous)
        fresh = [t for t in p.ticks if t > watermark and t <= now]
        sent += fresh
        if p.advance_to is not None:
            watermark = max([watermark, p.advance_to, *fresh])
        previous = now
        nxt = c.next_after(now)
        now = min(nxt, now + dt.timedelta(minutes=7)) if nxt else end  # sleep until then
    return sent


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        (dt.datetime(2025, 3, 29, 23, 0), ["03-30 03:00:00+0200"]),  # spring forward
        (dt.datetime(2025, 10, 25, 23, 0), ["10-26 02:30:00+0200"]),  # fall back
        (dt.datetime(2025, 6, 1, 0, 0), ["06-01 02:30:00+0200"]),  # an ordinary day
    ],
)
def test_a_daily_0230_job_runs_once_on_each_daylight_saving_day(
    start: dt.datetime, expected: list[str]
) -> None:
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    c = Cron("30 2 * * *", "Europe/Paris")
    sent = day_of_passes(c, start.replace(tzinfo=paris).astimezone(UTC), hours=20)
    assert [f"{t.astimezone(paris):%m-%d %H:%M:%S%z}" for t in sent] == expected


# --- schedule definitions -----------------------------------------------------------------


app = pgtasks.App("postgresql://unused@127.0.0.1:1/unused")


@app.task(queue="periodic_unit")
async def nightly(day: str = "today") -> None:
    pass


def test_check_catch_up() -> None:
    assert check_catch_up("none") == "none"
    assert check_catch_up(3) == 3
    for bad in ("all", -1, 1001, True, 2.5, None):
        with pytest.raises(ConfigurationError, match="catch_up must be"):
            check_catch_up(bad)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delay": 5}, "cannot have a delay"),
        ({"idempotency_key": "k"}, "cannot have an idempotency key"),
    ],
)
def test_a_scheduled_call_leaves_timing_and_keys_to_the_schedule(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Schedule("n", nightly.options(**options).s(), MINUTE)


def test_the_fingerprint_follows_the_definition() -> None:
    a = Schedule("n", nightly.s(), MINUTE).definition(1000)
    assert a == Schedule("n", nightly.s(), MINUTE).definition(1000)
    assert a.fingerprint != Schedule("n", nightly.s("x"), MINUTE).definition(1000).fingerprint
    assert a.fingerprint != Schedule("n", nightly.s(), MINUTE, 3).definition(1000).fingerprint
    other = Every(dt.timedelta(minutes=1, microseconds=1))
    assert a.fingerprint != Schedule("n", nightly.s(), other).definition(1000).fingerprint
    assert a.queue == "periodic_unit"
    assert a.kind == "every"
    assert a.expression == "every 1m"


def test_tick_keys_and_the_scheduled_at_header() -> None:
    tick = dt.datetime(2025, 3, 30, 1, 0, tzinfo=UTC)
    assert tick_key("nightly", tick) == "pgtasks:schedule:nightly:2025-03-30T01:00:00.000000Z"
    header = {"x-pgtasks-scheduled-at": "2025-03-30T01:00:00.000000+00:00"}
    assert scheduled_at(header) == tick
    assert scheduled_at({}) is None
    assert scheduled_at({"x-pgtasks-scheduled-at": "soon"}) is None
    assert scheduled_at({"x-pgtasks-scheduled-at": "2025-03-30T01:00:00"}) is None  # naive
