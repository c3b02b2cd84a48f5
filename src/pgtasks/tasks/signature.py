"""A call of a task, not yet sent: its options (`CallOptions`) and the call itself
(`Signature`); a sent call becomes a `handle.JobRef`.

Options are checked where they are given (``task.options(...)``, ``apply_async``), so that
``defer`` raises only for what it sends: a queue name pgtasks accepts, a finite delay of at
most ten years, a timezone-aware eta, a non-empty idempotency key, headers that are a
mapping of names to JSON values and leave pgtasks' own names alone, an asyncpg connection.
"""

from __future__ import annotations

import datetime as dt
import inspect
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .._shared import MAX_DELAY, Connection
from ..exceptions import SerializationError
from ..queues import check_queue_name
from ..serialization import envelope
from ..serialization.envelope import RESERVED_HEADER_PREFIX
from ..serialization.shapes import describe

if TYPE_CHECKING:
    from .canvas import Workflow
    from .task import Task


@dataclass(frozen=True)
class CallOptions:
    """Per-call options; see `Task.options`."""

    queue: str | None = None
    delay: float = 0.0
    eta: dt.datetime | None = None
    idempotency_key: str | None = None
    headers: Mapping[str, Any] | None = None
    connection: Connection | None = None
    expires: float | str | None = None  # seconds after the enqueue, or an ISO time
    cursor: Any = None  # a DB-API cursor (or SQLAlchemy connection), for defer_sync

    def merge(
        self,
        *,
        queue: str | None = None,
        delay: float | dt.timedelta | None = None,
        eta: dt.datetime | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        connection: Connection | None = None,
        expires: float | dt.timedelta | dt.datetime | None = None,
        cursor: Any = None,
    ) -> CallOptions:
        if (connection is not None or self.connection is not None) and (
            cursor is not None or self.cursor is not None
        ):
            raise ValueError(
                "pass either connection= (an asyncpg connection, for defer) or cursor= (a "
                "DB-API cursor, for defer_sync), not both"
            )
        changes: dict[str, Any] = {}
        if queue is not None:
            changes["queue"] = check_queue_name(queue)
        if delay is not None:
            changes["delay"] = _delay_seconds(delay)
        if eta is not None:
            changes["eta"] = _checked_eta(eta)
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not idempotency_key:
                raise ValueError("idempotency_key must be a non-empty string")
            changes["idempotency_key"] = idempotency_key
        if headers is not None:
            changes["headers"] = _checked_headers(headers)
        if connection is not None:
            if not isinstance(connection, asyncpg.Connection | PoolConnectionProxy):
                raise TypeError(
                    "connection must be an asyncpg connection (asyncpg.connect(...) or one "
                    f"acquired from a pool), got {describe(connection)}"
                )
            changes["connection"] = connection
        if expires is not None:
            changes["expires"] = _checked_expires(expires)
        if cursor is not None:
            # both, or the statement would run and its answer could not be read (a psycopg
            # 3 Connection has execute() alone: the job sent, and an error all the same)
            run = getattr(cursor, "exec_driver_sql", None) or getattr(cursor, "execute", None)
            if inspect.iscoroutinefunction(run):  # psycopg's AsyncCursor, SQLAlchemy's async
                raise TypeError(
                    f"cursor must be a synchronous DB-API cursor (got {describe(cursor)}, whose "
                    "execute is async): in async code use `await defer()`, and for an asyncpg "
                    "connection use connection=... with defer()"
                )
            if not hasattr(cursor, "exec_driver_sql") and not (
                hasattr(cursor, "execute") and hasattr(cursor, "fetchall")
            ):
                raise TypeError(
                    "cursor must be a DB-API cursor, with execute() and fetchall() (psycopg's "
                    "conn.cursor(), Django's connection.cursor()), or a SQLAlchemy Connection "
                    f"(got {describe(cursor)}); for an asyncpg connection use connection=... "
                    "with defer()"
                )
            changes["cursor"] = cursor
        merged = replace(self, **changes)
        if merged.eta is not None and merged.delay:  # in either order, over chained options()
            raise ValueError("pass either delay (or countdown) or eta, not both")
        return merged


def _delay_seconds(delay: float | dt.timedelta, option: str = "delay") -> float:
    if isinstance(delay, dt.timedelta):
        seconds = delay.total_seconds()
    elif isinstance(delay, numbers.Real) and not isinstance(delay, bool):
        try:
            seconds = float(delay)
        except OverflowError:  # an int beyond a float's range
            seconds = math.inf
    else:
        raise TypeError(
            f"{option} must be a number of seconds or a timedelta (got {describe(delay)})"
        )
    if math.isnan(seconds):
        raise ValueError(f"{option} must be a number of seconds (got nan)")
    if seconds < 0:
        raise ValueError(f"{option} must not be negative (got {seconds} seconds)")
    if seconds > MAX_DELAY.total_seconds():
        raise ValueError(
            f"{option} must be at most {MAX_DELAY.days:,} days (ten years), got {seconds:g} seconds"
        )
    return seconds


def _checked_expires(expires: float | dt.timedelta | dt.datetime) -> float | str:
    """``expires`` as a header holds it: seconds after the enqueue (counted on the
    database's clock), or a timezone-aware time in ISO form."""
    if isinstance(expires, dt.datetime):
        return _checked_eta(expires, "expires").isoformat()
    seconds = _delay_seconds(expires, "expires")
    if seconds <= 0:
        raise ValueError(f"expires must be after the enqueue (got {seconds:g} seconds)")
    return seconds


def _checked_eta(eta: dt.datetime, option: str = "eta") -> dt.datetime:
    if not isinstance(eta, dt.datetime) or eta.utcoffset() is None:
        raise ValueError(
            f"{option} must be a timezone-aware datetime (got {eta!r}); "
            "use e.g. datetime.now(timezone.utc) + timedelta(minutes=5)"
        )
    try:
        eta.astimezone(dt.timezone.utc)  # year 1 or 9999 at an offset: beyond datetime in UTC
    except OverflowError:
        raise ValueError(f"{option} {eta.isoformat()} is out of range in UTC") from None
    if eta - dt.datetime.now(dt.timezone.utc) > MAX_DELAY:
        raise ValueError(
            f"{option} must be at most {MAX_DELAY.days:,} days (ten years) ahead, got "
            f"{eta.isoformat()}"
        )
    return eta


def _checked_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(headers, Mapping):
        raise TypeError(
            "headers must be a mapping of names (strings) to JSON values, like "
            f"{{'trace_id': 'abc'}} (got {describe(headers)})"
        )
    checked = dict(headers)
    for name in checked:
        if not isinstance(name, str):
            raise TypeError(f"header names must be strings (got {describe(name)})")
        if name == envelope.HEADER_IDEMPOTENCY_KEY:
            raise ValueError(
                "pass an idempotency key as options(idempotency_key=...), not as a header: "
                "only then is it claimed, so that it deduplicates on every path"
            )
        if name.lower().startswith(RESERVED_HEADER_PREFIX):
            raise ValueError(
                f"header {name!r}: names starting with {RESERVED_HEADER_PREFIX!r} are reserved "
                "for pgtasks' own metadata; choose another name"
            )
    return checked


@dataclass(slots=True)
class Signature:
    """One call of a task, not yet sent: arguments bound and options fixed. Treat it as
    immutable (it is not frozen only because ``defer_many`` builds one per job, and a frozen
    dataclass costs four times as much to create)."""

    task: Task[Any, Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: CallOptions = field(default_factory=CallOptions)
    immutable: bool = False  # in a workflow: takes no result from the step before
    receives: str | None = None  # one argument short (why): a result is to go in front

    @property
    def queue(self) -> str:
        return self.options.queue or self.task.queue

    def __or__(self, other: Signature | Workflow) -> Workflow:
        """``a.s() | b.s()``: a chain, ``b`` receiving ``a``'s result (see `pgtasks.chain`)."""
        from .canvas import chain

        return chain(self, other)

    def body(self, max_size: int) -> str:
        if self.receives is not None:
            raise TypeError(
                f"{self.receives} (a signature one argument short receives the result of "
                "the step before it: it can only follow another step in a chain, or be a "
                "chord's callback)"
            )
        return envelope.encode(self.task.name, self.args, self.kwargs, max_size=max_size)

    def headers(self) -> str | None:
        options = self.options
        if options.headers is None and options.idempotency_key is None and not options.expires:
            return None
        headers = dict(options.headers or {})
        if options.idempotency_key is not None:
            headers[envelope.HEADER_IDEMPOTENCY_KEY] = options.idempotency_key
        if options.expires is not None:
            headers[envelope.HEADER_EXPIRES] = options.expires
        if not headers:
            return None
        try:
            return envelope.dumps(headers).decode()
        except TypeError as exc:
            raise SerializationError(
                f"cannot encode the headers of a {self.task.name!r} job: {exc}"
            ) from None

    def with_headers(self, headers: Mapping[str, Any]) -> Signature:
        """The same call with these headers added to its own (replacing a header of the
        same name), checked as ``options(headers=...)`` checks them: what an enqueue hook
        uses to attach metadata (a trace context, a request id) to a job."""
        added = _checked_headers(headers)
        merged = self.options.merge(headers={**(self.options.headers or {}), **added})
        return Signature(self.task, self.args, self.kwargs, merged, self.immutable, self.receives)
