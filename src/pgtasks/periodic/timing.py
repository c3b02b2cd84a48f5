"""When a schedule ticks: `Cron` (a cron expression in a time zone) and `Every` (a fixed
interval). Pure computation on instants: no clock is read here. The scheduler passes the
database's ``now()``; ticks are timezone-aware datetimes in UTC.

Cron expressions are parsed and matched by `cronsim` (the ``cron`` extra), imported on first
use: five fields (minute hour day month weekday), or six with the seconds first
(``*/10 * * * * *``: every ten seconds). What pgtasks adds is the rule for the days a time
zone's clock jumps, the same as Debian's cron:

- An expression whose minute and hour fields both start with something other than ``*``
  runs at a wall-clock time (``30 2 * * *``). On the spring-forward day, a time that the
  clock skips (02:30 in Paris) runs once, at the first instant after the jump (03:00 local
  time); on the fall-back day, a time that the clock shows twice runs once, at its first
  occurrence.
- Any other expression (``*/15 * * * *``, ``0 * * * *``, ``* 2 * * *``) follows real time:
  every instant whose local time matches is a tick, so the fall-back day has 25 hourly
  ticks and the spring-forward day 23.

`Every` ticks at the multiples of its interval counted from the Unix epoch (UTC), whatever
the time zone: ``every=timedelta(minutes=5)`` ticks at :00, :05, ... of every hour.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Iterator
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from cronsim import CronSim

UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
CRON_EXTRA = "pip install 'pgtasks[cron]'"
OVERLAP_LIMIT = dt.timedelta(hours=3)  # the longest fall-back overlap looked for
HORIZON = dt.timedelta(days=50 * 365)  # a schedule must fire within 50 years


class Timing(Protocol):
    """When a schedule ticks."""

    kind: str
    """``"cron"`` or ``"every"``."""
    expression: str
    """The cron expression, or ``every 5m`` for an interval."""
    timezone: str
    """The IANA name of the time zone the expression is read in (``"UTC"`` for `Every`)."""

    def next_after(self, instant: dt.datetime) -> dt.datetime | None:
        """The first tick strictly after ``instant`` (None: none within 50 years)."""
        ...

    def latest(self, until: dt.datetime, after: dt.datetime, limit: int) -> list[dt.datetime]:
        """The last ``limit`` ticks in ``(after, until]``, oldest first."""
        ...

    def describe(self) -> str:
        """How the schedule reads in a listing."""
        ...


# --- time zones ---------------------------------------------------------------------------


def zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone ``name``; `ConfigurationError` when it is unknown, or when this
    system has no time zone database at all."""
    if not isinstance(name, str) or not name:
        raise ConfigurationError(
            f"tz must be an IANA time zone name like 'Europe/Paris' ({name!r})"
        )
    return _zone(name)


@lru_cache(maxsize=64)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        if name != "UTC" and not zoneinfo.available_timezones():
            raise ConfigurationError(
                f"time zone {name!r}: this system has no IANA time zone database; install "
                f"one: the tzdata package ({CRON_EXTRA} includes it), or your system's tzdata"
            ) from None
        if name == "UTC":  # no database at all: UTC needs none
            return _UTC_ZONE
        raise ConfigurationError(
            f"unknown time zone {name!r}: use an IANA name like 'Europe/Paris', "
            "'America/New_York' or 'UTC'"
        ) from None


class _UtcZone(dt.tzinfo):
    """UTC as a zone, for systems without any time zone database."""

    def utcoffset(self, d: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def dst(self, d: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def tzname(self, d: dt.datetime | None) -> str:
        return "UTC"


_UTC_ZONE: zoneinfo.ZoneInfo = _UtcZone()  # type: ignore[assignment]


# --- cron ---------------------------------------------------------------------------------


def _cronsim() -> tuple[type[CronSim], type[Exception]]:
    try:
        from cronsim import CronSim, CronSimError
    except ImportError:
        raise ConfigurationError(
            "cron expressions need the cronsim package, which pgtasks[cron] installs: "
            f"{CRON_EXTRA} (every=timedelta(...) schedules work without it)"
        ) from None
    return CronSim, CronSimError


class Cron:
    """A cron expression read in an IANA time zone.

    Raises `ConfigurationError` naming the expression and what is wrong with it (the field,
    the number of fields, a time zone, or a schedule that never fires), or naming the
    ``cron`` extra when cronsim is not installed.
    """

    kind = "cron"

    def __init__(self, expression: str, tz: str = "UTC") -> None:
        if not isinstance(expression, str):
            raise ConfigurationError(f"a cron expression must be a string (got {expression!r})")
        self.expression = " ".join(expression.split())
        self.timezone = getattr(tz, "key", tz)  # a ZoneInfo is accepted for its name
        self._zone = zone(self.timezone)
        fields = self.expression.split()
        if len(fields) not in (5, 6):
            raise ConfigurationError(
                f"invalid cron expression {expression!r}: it has {len(fields)} field(s); "
                "use 5 (minute hour day-of-month month day-of-week) or 6 (second first)"
            )
        cronsim, error = _cronsim()
        try:
            cronsim(self.expression, dt.datetime(2000, 1, 1))
        except error as exc:
            names = ("second " if len(fields) == 6 else "") + (
                "minute hour day-of-month month day-of-week"
            )
            raise ConfigurationError(
                f"invalid cron expression {expression!r}: {str(exc).lower() or 'not understood'}"
                f" (the fields are: {names})"
            ) from None
        self._cronsim = cronsim
        minute, hour = fields[-5], fields[-4]
        # Debian's rule (see the module): a wall-clock time when neither field is a wildcard
        self.wall_clock = not minute.startswith("*") and not hour.startswith("*")
        # a zone without daylight-saving time is iterated in UTC: nothing to map
        self._utc = self.timezone in ("UTC", "Etc/UTC", "Etc/UCT", "UCT", "GMT", "Etc/GMT", "Zulu")
        self._iter_zone: dt.tzinfo = UTC if self._utc else self._zone
        first = self.next_after(dt.datetime(2000, 1, 1, tzinfo=UTC))
        if first is None:
            raise ConfigurationError(
                f"cron expression {expression!r} never fires (no match within 50 years)"
            )

    def __repr__(self) -> str:
        return f"Cron({self.expression!r}, tz={self.timezone!r})"

    def describe(self) -> str:
        return self.expression

    # Wall-clock expressions are iterated in naive local time and mapped to instants with
    # the rule above; the others in real time, which cronsim does itself when given an
    # aware datetime (and an expression it does not treat as wall-clock: it never does so
    # for expressions with a wildcard minute or hour, which are exactly ours).

    def next_after(self, instant: dt.datetime) -> dt.datetime | None:
        for tick in self._forward(instant):
            return tick
        return None

    def latest(self, until: dt.datetime, after: dt.datetime, limit: int) -> list[dt.datetime]:
        found: list[dt.datetime] = []
        if limit <= 0 or until <= after:
            return found
        for tick in self._backward(until):
            if tick <= after:
                break
            found.append(tick)
            if len(found) >= limit:
                break
        found.reverse()
        return found

    def _forward(self, instant: dt.datetime) -> Iterator[dt.datetime]:
        """Ticks strictly after ``instant``, in order."""
        if self.wall_clock and not self._utc:
            last = instant
            # every wall time after instant's local time maps at or after ... except in a
            # fall-back overlap, where a later wall time's first occurrence can be earlier:
            # those are skipped as not after the instant
            start = instant.astimezone(self._zone).replace(tzinfo=None)
            for wall in self._iterate(start, reverse=False):
                tick = self._instant(wall)
                if tick > last:
                    last = tick
                    yield tick
        else:
            start_aware = instant.astimezone(self._iter_zone)
            for local in self._iterate(start_aware, reverse=False):
                tick = local.astimezone(UTC)
                if tick > instant:
                    yield tick

    def _backward(self, instant: dt.datetime) -> Iterator[dt.datetime]:
        """Ticks at or before ``instant``, newest first."""
        # cronsim's reverse iteration yields times strictly before its start (for a start
        # without microseconds, in every version): starting at the next whole second
        # includes ``instant`` itself, ticks being whole seconds
        if self.wall_clock and not self._utc:
            # in the second pass of a fall-back overlap, a wall time later than instant's
            # may map before it: start from a wall time past the overlap (and from instant's
            # own otherwise: starting hours ahead walks thousands of ticks of a
            # second-resolution expression at every pass)
            local = instant.astimezone(self._zone).replace(tzinfo=None)
            start = local + self._overlap(instant)
            last: dt.datetime | None = None
            for wall in self._iterate(_next_second(start), reverse=True):
                tick = self._instant(wall)
                if tick > instant or (last is not None and tick >= last):
                    continue
                last = tick
                yield tick
        else:
            # the second added in UTC: a local time plus a second may be a skipped one
            start_aware = _next_second(instant.astimezone(UTC)).astimezone(self._iter_zone)
            for local in self._iterate(start_aware, reverse=True):
                tick = local.astimezone(UTC)
                if tick <= instant:
                    yield tick

    def _overlap(self, instant: dt.datetime) -> dt.timedelta:
        """When ``instant`` is in the second pass of a fall-back overlap, how far the clock
        fell back (wall times up to that much later than instant's first occurred at or
        before it); zero at any other time. Overlaps last at most a few hours."""
        after = instant.astimezone(self._zone).utcoffset()
        before = (instant - OVERLAP_LIMIT).astimezone(self._zone).utcoffset()
        assert after is not None
        assert before is not None
        drop = before - after
        if drop <= dt.timedelta(0):
            return dt.timedelta(0)
        # still within ``drop`` of the jump: the offset then was the one before it
        earlier = (instant - drop).astimezone(self._zone).utcoffset()
        assert earlier is not None
        return drop if earlier > after else dt.timedelta(0)

    def _iterate(self, start: dt.datetime, *, reverse: bool) -> Iterator[dt.datetime]:
        it = self._cronsim(self.expression, start, reverse=reverse)
        while True:
            try:
                yield next(it)
            except StopIteration:  # nothing within 50 years
                return

    def _instant(self, wall: dt.datetime) -> dt.datetime:
        """The instant of a naive local wall time: its first occurrence when the clock shows
        it twice; the end of the jump when the clock skips it."""
        first = wall.replace(tzinfo=self._zone, fold=0).astimezone(UTC)
        if first.astimezone(self._zone).replace(tzinfo=None) == wall:
            return first
        return _gap_end(self._zone, wall)


def _next_second(moment: dt.datetime) -> dt.datetime:
    """The first whole second after ``moment``."""
    return moment.replace(microsecond=0) + dt.timedelta(seconds=1)


@lru_cache(maxsize=256)
def _gap_end(tz: dt.tzinfo, wall: dt.datetime) -> dt.datetime:
    """The instant the clock jumped over ``wall`` (a local time it skips): the first
    instant whose local time is later than ``wall``, to the microsecond."""
    # fold=1 reads the skipped time with the offset after the jump, which lands before it;
    # fold=0 with the offset before, which lands after it
    low = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    high = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if low > high:
        low, high = high, low
    lo, hi = 0, int((high - low) / dt.timedelta(microseconds=1))
    while lo < hi:  # the first offset (in microseconds past low) whose local time is > wall
        mid = (lo + hi) // 2
        local = (low + dt.timedelta(microseconds=mid)).astimezone(tz).replace(tzinfo=None)
        if local > wall:
            hi = mid
        else:
            lo = mid + 1
    return low + dt.timedelta(microseconds=lo)


# --- every --------------------------------------------------------------------------------


class Every:
    """A fixed interval: ticks at the multiples of ``interval`` since the Unix epoch (UTC).
    From one second to 50 years; any number of whole microseconds."""

    kind = "every"
    timezone = "UTC"

    def __init__(self, interval: dt.timedelta) -> None:
        if not isinstance(interval, dt.timedelta):
            raise ConfigurationError(
                f"every must be a datetime.timedelta, like timedelta(minutes=5) (got {interval!r})"
            )
        if interval < dt.timedelta(seconds=1):
            raise ConfigurationError(f"every must be at least one second (got {interval})")
        if interval > HORIZON:  # its ticks would soon be past the last date Python has
            raise ConfigurationError(f"every must be at most 50 years (got {interval})")
        self.interval = interval
        self._us = interval // dt.timedelta(microseconds=1)
        self.expression = "every " + _human(interval)

    def __repr__(self) -> str:
        return f"Every({self.interval!r})"

    def describe(self) -> str:
        return self.expression

    def _index(self, instant: dt.datetime) -> int:
        """The number of the last tick at or before ``instant``."""
        return ((instant - EPOCH) // dt.timedelta(microseconds=1)) // self._us

    def _tick(self, index: int) -> dt.datetime:
        return EPOCH + dt.timedelta(microseconds=index * self._us)

    def next_after(self, instant: dt.datetime) -> dt.datetime | None:
        return self._tick(self._index(instant) + 1)

    def latest(self, until: dt.datetime, after: dt.datetime, limit: int) -> list[dt.datetime]:
        if limit <= 0 or until <= after:
            return []
        high = self._index(until)
        low = max(self._index(after) + 1, high - limit + 1)
        return [self._tick(i) for i in range(low, high + 1)]


def _human(interval: dt.timedelta) -> str:
    seconds = interval.total_seconds()
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return format(seconds, "f").rstrip("0").rstrip(".") + "s"
