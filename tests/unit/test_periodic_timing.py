"""When schedules tick: cron expressions in time zones (the daylight-saving days above
all), six-field expressions, intervals, and the errors at decoration. Pure computation:
the "database time" of each case is a fixed instant."""

from __future__ import annotations

import builtins
import datetime as dt
import itertools
import sys
import zoneinfo
from typing import Any

import pytest
from cronsim import CronSim
from hypothesis import given, settings
from hypothesis import strategies as st

from pgtasks import ConfigurationError
from pgtasks.periodic import timing
from pgtasks.periodic.timing import Cron, Every

UTC = dt.timezone.utc
PARIS = zoneinfo.ZoneInfo("Europe/Paris")
NEW_YORK = zoneinfo.ZoneInfo("America/New_York")


def local(tz: zoneinfo.ZoneInfo, *args: int, fold: int = 0) -> dt.datetime:
    """The instant of a local time (year, month, day[, hour[, minute]])."""
    year, month, day, hour, minute = (*args, 0, 0)[:5]
    return dt.datetime(year, month, day, hour, minute, tzinfo=tz, fold=fold).astimezone(UTC)


def ticks(c: Cron | Every, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """Every tick in (start, end], walking forward."""
    found: list[dt.datetime] = []
    t = start
    while True:
        nxt = c.next_after(t)
        if nxt is None or nxt > end:
            return found
        found.append(nxt)
        t = nxt


def wall(tz: zoneinfo.ZoneInfo, instants: list[dt.datetime]) -> list[str]:
    return [f"{t.astimezone(tz):%m-%d %H:%M:%S%z}" for t in instants]


# --- the daylight-saving days ------------------------------------------------------------

# Europe/Paris 2025: spring forward on March 30 at 02:00 (to 03:00), fall back on October 26
# at 03:00 (to 02:00).
SPRING = (local(PARIS, 2025, 3, 29, 12), local(PARIS, 2025, 3, 31, 12))
FALL = (local(PARIS, 2025, 10, 25, 12), local(PARIS, 2025, 10, 27, 12))


@pytest.mark.parametrize("expression", ["30 2 * * *", "0 30 2 * * *"])
def test_a_skipped_time_runs_once_at_the_end_of_the_jump(expression: str) -> None:
    c = Cron(expression, "Europe/Paris")
    assert wall(PARIS, ticks(c, *SPRING)) == ["03-30 03:00:00+0200", "03-31 02:30:00+0200"]


@pytest.mark.parametrize("expression", ["30 2 * * *", "0 30 2 * * *"])
def test_a_repeated_time_runs_once_at_its_first_occurrence(expression: str) -> None:
    c = Cron(expression, "Europe/Paris")
    assert wall(PARIS, ticks(c, *FALL)) == ["10-26 02:30:00+0200", "10-27 02:30:00+0100"]


def test_the_repeated_time_is_not_enqueued_again_after_its_first_occurrence() -> None:
    # a schedule created (or a scheduler starting) between the two 02:30s: the first one
    # happened already, so the next tick is the next day's
    c = Cron("30 2 * * *", "Europe/Paris")
    between = local(PARIS, 2025, 10, 26, 2, 15, fold=1)  # 02:15, the second time
    assert wall(PARIS, [c.next_after(between)]) == ["10-27 02:30:00+0100"]  # type: ignore[list-item]
    assert c.latest(between, SPRING[0], 1) == [local(PARIS, 2025, 10, 26, 2, 30)]


def test_several_times_in_the_jump_become_one_tick() -> None:
    c = Cron("0,15,30,45 2 * * *", "Europe/Paris")
    day = wall(PARIS, ticks(c, local(PARIS, 2025, 3, 30, 0), local(PARIS, 2025, 3, 30, 12)))
    assert day == ["03-30 03:00:00+0200"]


def test_hourly_and_finer_expressions_follow_real_time() -> None:
    hourly = Cron("0 * * * *", "Europe/Paris")
    spring = ticks(hourly, local(PARIS, 2025, 3, 30, 0), local(PARIS, 2025, 3, 31, 0))
    fall = ticks(hourly, local(PARIS, 2025, 10, 26, 0), local(PARIS, 2025, 10, 27, 0))
    assert len(spring) == 23
    assert len(fall) == 25
    assert wall(PARIS, fall[1:5]) == [
        "10-26 02:00:00+0200",
        "10-26 02:00:00+0100",  # the hour shown twice is two real hours
        "10-26 03:00:00+0100",
        "10-26 04:00:00+0100",
    ]
    every_30s = Cron("*/30 * * * * *", "Europe/Paris")
    jump = ticks(every_30s, local(PARIS, 2025, 3, 30, 1, 59), local(PARIS, 2025, 3, 30, 3, 1))
    assert wall(PARIS, jump) == [
        "03-30 01:59:30+0100",
        "03-30 03:00:00+0200",
        "03-30 03:00:30+0200",
        "03-30 03:01:00+0200",
    ]


def test_new_york_and_the_southern_hemisphere() -> None:
    # America/New_York 2025: spring forward March 9 at 02:00, fall back November 2 at 02:00
    c = Cron("30 1 * * *", "America/New_York")
    nov = ticks(c, local(NEW_YORK, 2025, 11, 1, 12), local(NEW_YORK, 2025, 11, 3, 12))
    assert wall(NEW_YORK, nov) == ["11-02 01:30:00-0400", "11-03 01:30:00-0500"]
    sydney = zoneinfo.ZoneInfo("Australia/Sydney")  # forward on October 5 2025 at 02:00
    c = Cron("15 2 * * *", "Australia/Sydney")
    oct5 = ticks(c, local(sydney, 2025, 10, 4, 12), local(sydney, 2025, 10, 6, 12))
    assert wall(sydney, oct5) == ["10-05 03:00:00+1100", "10-06 02:15:00+1100"]
    lord_howe = zoneinfo.ZoneInfo("Australia/Lord_Howe")  # a 30-minute jump, 02:00 -> 02:30
    c = Cron("10 2 * * *", "Australia/Lord_Howe")
    jump = ticks(c, local(lord_howe, 2025, 10, 4, 12), local(lord_howe, 2025, 10, 6, 12))
    assert wall(lord_howe, jump) == ["10-05 02:30:00+1100", "10-06 02:10:00+1100"]


def test_five_field_wall_clock_ticks_match_cronsims_debian_rule() -> None:
    # for five-field expressions cronsim applies Debian's rule itself: ours must agree
    for expression in ("30 2 * * *", "0 3 * * *", "45 1 * * 0", "5 2 1-31 3,10 *"):
        c = Cron(expression, "Europe/Paris")
        for start, end in (SPRING, FALL):
            it = CronSim(expression, start.astimezone(PARIS))
            theirs = []
            while (t := next(it).astimezone(UTC)) <= end:
                theirs.append(t)
            assert ticks(c, start, end) == theirs, expression


def test_utc_and_a_fixed_zone() -> None:
    c = Cron("0 12 * * *")
    assert c.timezone == "UTC"
    assert c.next_after(dt.datetime(2025, 1, 1, 12, tzinfo=UTC)) == dt.datetime(
        2025, 1, 2, 12, tzinfo=UTC
    )
    assert Cron("0 12 * * *", zoneinfo.ZoneInfo("Asia/Tokyo")).next_after(  # type: ignore[arg-type]
        dt.datetime(2025, 1, 1, tzinfo=UTC)
    ) == dt.datetime(2025, 1, 1, 3, tzinfo=UTC)


# --- forward and backward agree ----------------------------------------------------------

EXPRESSIONS = [
    "30 2 * * *",
    "0 * * * *",
    "*/20 * * * *",
    "0 2 * * *",
    "15 1,2,3 * * *",
    "*/15 2 * * *",
    "0 30 2 * * *",
    "*/20 * 1-3 * * *",
    "0 0 L * *",
    "0 9 * * MON#1",
]
ZONES = ["Europe/Paris", "America/New_York", "Australia/Lord_Howe", "UTC"]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(EXPRESSIONS),
    st.sampled_from(ZONES),
    st.sampled_from(
        [
            dt.datetime(2025, 3, 9),
            dt.datetime(2025, 3, 30),
            dt.datetime(2025, 10, 5),
            dt.datetime(2025, 10, 26),
            dt.datetime(2025, 11, 2),
            dt.datetime(2025, 6, 1),
        ]
    ),
    st.integers(min_value=-6 * 3600, max_value=30 * 3600),
    st.integers(min_value=1, max_value=40),
)
def test_latest_is_the_forward_walk_read_backwards(
    expression: str, zone: str, day: dt.datetime, offset: int, limit: int
) -> None:
    c = Cron(expression, zone)
    until = day.replace(tzinfo=UTC) + dt.timedelta(seconds=offset, microseconds=offset % 7)
    after = until - dt.timedelta(hours=30)
    walked = ticks(c, after, until)
    assert c.latest(until, after, limit) == walked[-limit:]
    assert all(a < b for a, b in itertools.pairwise(walked))


def test_latest_includes_a_tick_exactly_at_until() -> None:
    c = Cron("*/5 * * * *")
    until = dt.datetime(2025, 1, 1, 12, 5, tzinfo=UTC)
    assert c.latest(until, until - dt.timedelta(minutes=11), 5) == [
        dt.datetime(2025, 1, 1, 11, 55, tzinfo=UTC),
        dt.datetime(2025, 1, 1, 12, 0, tzinfo=UTC),
        until,
    ]
    assert c.latest(until, until, 5) == []


def test_a_long_downtime_is_computed_without_walking_it() -> None:
    # a second-resolution schedule down for a year: the latest ticks come from the end
    c = Cron("* * * * * *", "Europe/Paris")
    now = dt.datetime(2025, 6, 1, 12, 0, 0, 500_000, tzinfo=UTC)
    last = c.latest(now, now - dt.timedelta(days=365), 3)
    assert last == [now.replace(microsecond=0) - dt.timedelta(seconds=s) for s in (2, 1, 0)]


# --- every ---------------------------------------------------------------------------------


def test_every_ticks_at_multiples_of_the_interval_since_the_epoch() -> None:
    five = Every(dt.timedelta(minutes=5))
    now = dt.datetime(2025, 1, 1, 12, 7, 30, tzinfo=UTC)
    assert five.next_after(now) == dt.datetime(2025, 1, 1, 12, 10, tzinfo=UTC)
    assert five.next_after(dt.datetime(2025, 1, 1, 12, 10, tzinfo=UTC)) == dt.datetime(
        2025, 1, 1, 12, 15, tzinfo=UTC
    )
    assert five.latest(now, now - dt.timedelta(hours=1), 2) == [
        dt.datetime(2025, 1, 1, 12, 0, tzinfo=UTC),
        dt.datetime(2025, 1, 1, 12, 5, tzinfo=UTC),
    ]
    assert five.describe() == "every 5m"
    assert Every(dt.timedelta(seconds=1.5)).describe() == "every 1.5s"
    assert Every(dt.timedelta(days=1)).describe() == "every 1d"
    # a time zone's jumps do not exist for it
    assert len(ticks(Every(dt.timedelta(hours=1)), *FALL)) == 49


@pytest.mark.parametrize(
    ("interval", "message"),
    [
        (dt.timedelta(milliseconds=500), "at least one second"),
        (dt.timedelta(0), "at least one second"),
        (5, "must be a datetime.timedelta"),
    ],
)
def test_every_refuses_what_is_not_an_interval(interval: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Every(interval)


# --- errors at decoration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("61 * * * *", r"invalid cron expression '61 \* \* \* \*': bad minute"),
        ("* 24 * * *", "bad hour"),
        ("0 0 30 2 *", "bad day-of-month"),
        ("0 0 * 13 *", "bad month"),
        ("0 0 * * MON#6", "bad day-of-week"),
        ("61 0 0 * * *", r"bad second \(the fields are: second minute"),
        ("* * * *", "it has 4 field"),
        ("* * * * * * *", "it has 7 field"),
        ("", "it has 0 field"),
        ("every day", "it has 2 field"),
    ],
)
def test_an_invalid_expression_names_itself_and_the_problem(expression: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Cron(expression)


def test_an_expression_that_never_fires_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="never fires"):
        Cron("0 0 */20 * 1L")  # the 1st or 21st that is also the last Monday: never


def test_an_unknown_time_zone_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="unknown time zone 'Europe/Pariss'"):
        Cron("* * * * *", "Europe/Pariss")
    with pytest.raises(ConfigurationError, match="IANA time zone name"):
        Cron("* * * * *", "")


def test_no_time_zone_database_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> zoneinfo.ZoneInfo:
        raise zoneinfo.ZoneInfoNotFoundError(name)

    timing._zone.cache_clear()
    monkeypatch.setattr(zoneinfo, "ZoneInfo", missing)
    monkeypatch.setattr(zoneinfo, "available_timezones", set)
    try:
        with pytest.raises(ConfigurationError, match=r"no IANA time zone database.*tzdata"):
            Cron("* * * * *", "Europe/Paris")
        assert Cron("0 3 * * *", "UTC").next_after(dt.datetime(2025, 1, 1, tzinfo=UTC)) == (
            dt.datetime(2025, 1, 1, 3, tzinfo=UTC)
        )
    finally:
        timing._zone.cache_clear()


@pytest.fixture
def no_cronsim(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def blocked(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "cronsim" or name.startswith("cronsim."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for name in [n for n in sys.modules if n == "cronsim" or n.startswith("cronsim.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", blocked)


@pytest.mark.usefixtures("no_cronsim")
def test_without_the_cron_extra_cron_fails_naming_it_and_every_works() -> None:
    with pytest.raises(ConfigurationError, match=r"pip install 'pgtasks\[cron\]'"):
        Cron("*/5 * * * *")
    assert Every(dt.timedelta(seconds=5)).next_after(
        dt.datetime(2025, 1, 1, tzinfo=UTC)
    ) == dt.datetime(2025, 1, 1, 0, 0, 5, tzinfo=UTC)
