"""What a schedule is (`Schedule`), its catch-up policy, and which ticks a scheduler pass
enqueues (`plan`).

A scheduler pass sees the schedule's watermark (ticks at or before it are done with) and
the database's ``now``. The ticks due are those in ``(watermark, now]``. They are split at
the pass's *horizon*:

- **on time**: ticks after the horizon, all enqueued. For a scheduler that has been running,
  the horizon is its previous successful pass (ticks that came due while it was watching),
  but at most ``STALL_LIMIT`` back: a scheduler whose loop was blocked for minutes does not
  send every tick of those minutes;
- **missed**: ticks at or before the horizon, that no scheduler enqueued in time (every
  worker was down, the database was unreachable). The catch-up policy decides:
  ``"none"`` enqueues none of them, ``"latest"`` (the default) the latest one, and a number
  ``N`` the latest N at most. Never a flood.

A scheduler that has just started (or whose last pass failed) has seen nothing: its
horizon is ``TOLERANCE`` before now, so a tick due within the last second counts as on
time for it too (another scheduler may be about to send it), and everything older is
missed. The watermark moves to the latest tick due either way, so missed ticks that were
skipped are not looked at again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import orjson

from ..exceptions import ConfigurationError
from ..serialization.envelope import HEADER_SCHEDULED_AT
from ..tasks import Signature
from .timing import Cron, Every, Timing

CatchUp = Union[Literal["none", "latest"], int]  # noqa: UP007 (a runtime alias on 3.10)
"""What a scheduler does with ticks that were missed: ``"none"``, ``"latest"`` (the
default), or a number N (at most the latest N)."""

TOLERANCE = dt.timedelta(seconds=1)
STALL_LIMIT = dt.timedelta(seconds=60)
MAX_CATCH_UP = 1000
ON_TIME_LIMIT = 1000  # ticks of one pass; at most STALL_LIMIT of second-resolution ticks
MAX_NAME = 200
KEY_PREFIX = "pgtasks:schedule:"


def check_catch_up(catch_up: object) -> CatchUp:
    if catch_up == "none" or catch_up == "latest":
        return catch_up
    if (
        isinstance(catch_up, int)
        and not isinstance(catch_up, bool)
        and 0 <= catch_up <= MAX_CATCH_UP
    ):
        return catch_up
    raise ConfigurationError(
        f"catch_up must be 'none', 'latest' or a number of ticks from 0 to {MAX_CATCH_UP} "
        f"(got {catch_up!r})"
    )


def missed_count(catch_up: CatchUp) -> int:
    """How many missed ticks a policy enqueues at most."""
    if catch_up == "none":
        return 0
    if catch_up == "latest":
        return 1
    return int(catch_up)


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise ConfigurationError(
            f"a schedule's name must be a non-empty string of at most {MAX_NAME} characters "
            f"(got {name!r})"
        )
    if not name.isprintable():
        raise ConfigurationError(f"a schedule's name must be printable (got {name!r})")
    return name


def tick_key(name: str, tick: dt.datetime) -> str:
    """The idempotency key of a tick (as ``pgtasks.schedule_key`` makes it in SQL)."""
    utc = tick.astimezone(dt.timezone.utc)
    return f"{KEY_PREFIX}{name}:{utc:%Y-%m-%dT%H:%M:%S.%f}Z"


@dataclass(frozen=True)
class Schedule:
    """A schedule: a call of a task (``signature``) enqueued at every tick of ``timing``.

    Made by ``@app.periodic`` and ``app.schedule``; its row in ``pgtasks.schedules`` is
    written by the schedulers that define it.
    """

    name: str
    signature: Signature
    timing: Timing
    catch_up: CatchUp = "latest"

    def __post_init__(self) -> None:
        check_name(self.name)
        check_catch_up(self.catch_up)
        opts = self.signature.options
        if opts.delay or opts.eta is not None:
            raise ConfigurationError(
                f"schedule {self.name!r}: a scheduled call cannot have a delay or an eta "
                "(the schedule decides when it runs)"
            )
        if opts.idempotency_key is not None:
            raise ConfigurationError(
                f"schedule {self.name!r}: a scheduled call cannot have an idempotency key; "
                "every tick gets its own (the schedule's name and the tick's instant)"
            )
        if opts.connection is not None:
            raise ConfigurationError(
                f"schedule {self.name!r}: a scheduled call cannot be bound to a connection"
            )

    @property
    def task(self) -> str:
        return self.signature.task.name

    @property
    def queue(self) -> str:
        return self.signature.queue

    def describe(self) -> str:
        tz = f" ({self.timing.timezone})" if self.timing.kind == "cron" else ""
        return f"{self.timing.describe()}{tz}"

    def definition(self, max_message_size: int) -> Definition:
        """What the schedule's row holds, encoded, with its fingerprint."""
        body = self.signature.body(max_message_size)
        headers = dict(self.signature.options.headers or {})
        fields: dict[str, Any] = {
            "task": self.task,
            "queue": self.queue,
            "kind": self.timing.kind,
            "expression": self.timing.expression,
            "timezone": self.timing.timezone,
            "catch_up": str(self.catch_up),
            "message": orjson.loads(body),
            "headers": headers or None,
        }
        if isinstance(self.timing, Every):  # its exact interval, which the text may round
            fields["interval_us"] = self.timing.interval // dt.timedelta(microseconds=1)
        digest = hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()
        return Definition(
            name=self.name,
            task=self.task,
            queue=self.queue,
            kind=self.timing.kind,
            expression=self.timing.expression,
            timezone=self.timing.timezone,
            catch_up=str(self.catch_up),
            message=body,
            headers=orjson.dumps(headers).decode() if headers else None,
            fingerprint=digest[:32],
        )


@dataclass(frozen=True)
class Definition:
    """A schedule as its row holds it (JSON as text)."""

    name: str
    task: str
    queue: str
    kind: str
    expression: str
    timezone: str
    catch_up: str
    message: str
    headers: str | None
    fingerprint: str


@dataclass(frozen=True)
class Plan:
    """What one pass does for one schedule: the ticks to enqueue (oldest first) and the
    latest tick due, to which the watermark moves (None: nothing is due)."""

    ticks: tuple[dt.datetime, ...]
    advance_to: dt.datetime | None
    missed: bool = False
    """Whether ticks were missed (enqueued or skipped by the catch-up policy)."""


NOTHING = Plan((), None)


def horizon(now: dt.datetime, watching_since: dt.datetime | None) -> dt.datetime:
    """Ticks at or before the horizon were missed; see the module."""
    if watching_since is None:
        return now - TOLERANCE
    return max(watching_since, now - STALL_LIMIT)


def plan(
    timing: Timing,
    catch_up: CatchUp,
    watermark: dt.datetime,
    now: dt.datetime,
    watching_since: dt.datetime | None,
) -> Plan:
    """Which ticks a pass at ``now`` enqueues; see the module."""
    last = timing.latest(now, watermark, 1)
    if not last:
        return NOTHING
    edge = horizon(now, watching_since)
    on_time = timing.latest(now, max(watermark, edge), ON_TIME_LIMIT)
    missed: list[dt.datetime] = []
    if edge > watermark:
        missed = timing.latest(min(edge, now), watermark, max(missed_count(catch_up), 1))
        late = bool(missed)
        if not missed_count(catch_up):
            missed = []
    else:
        late = False
    return Plan(tuple(missed + on_time), last[0], late)


def scheduled_at(headers: Mapping[str, Any]) -> dt.datetime | None:
    """The tick a job was enqueued for, from its headers (None: not a scheduled job, or a
    header that is not an ISO 8601 instant)."""
    value = headers.get(HEADER_SCHEDULED_AT)
    if not isinstance(value, str):
        return None
    try:
        tick = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return tick if tick.utcoffset() is not None else None


def make_timing(cron: str | None, every: dt.timedelta | None, tz: str | None) -> Cron | Every:
    """The timing of ``cron=`` or ``every=`` (exactly one of them)."""
    if (cron is None) == (every is None):
        raise ConfigurationError(
            "a schedule needs either a cron expression (cron='*/5 * * * *') or an interval "
            "(every=timedelta(minutes=5)), and not both"
        )
    if every is not None:
        if tz is not None:
            raise ConfigurationError(
                "tz applies to cron expressions; every=timedelta(...) counts real time"
            )
        return Every(every)
    assert cron is not None
    return Cron(cron, tz or "UTC")
