"""What the executor decides for a job, in the form the completer writes, and the cleaning of
what a task hands back before it goes near the database.

Text that comes from a task or a producer (exception messages, tracebacks, type names,
reasons) may hold anything: NUL characters (PostgreSQL's text refuses them), lone surrogates
(not encodable as UTF-8), megabytes. Delays may be NaN, infinite or astronomically large.
Every such value is cleaned here, once, so that one poison job cannot make a write fail.
"""

from __future__ import annotations

import datetime as dt
import math
import numbers
import traceback
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

import orjson

from .._shared import MAX_DELAY as _MAX_DELAY
from ..db.attempt_errors import AttemptError
from ..db.workflows import StepEnd
from .events import JobEvent
from .job import Job

OutcomeKind = Literal["ack", "retry", "release", "dead", "extend", "cancel", "expire"]

MAX_DELAY = _MAX_DELAY.total_seconds()  # a retry further ahead than this is clamped
MAX_MESSAGE = 2_000  # characters of an exception message or reason kept
MAX_TRACEBACK = 8_000  # characters of a traceback kept (its end)


@dataclass(slots=True)
class Outcome:
    """One write for one job: its end (ack, retry, release, dead, cancel, expire) or a
    lease extension."""

    kind: OutcomeKind
    job: Job
    archive: bool = True  # ack: archive, else delete
    delay: float = 0.0  # retry: seconds until visible again; extend: the lease
    give_back: bool = True  # release: the attempt did not count
    reason: str = ""  # dead
    error: str | None = None  # dead: the last error; cancel/expire: why (JSON text)
    result: str | None = None  # ack: the result kept (JSON text)
    result_error: str | None = None  # ack: why no result was kept (JSON text)
    ttl: float = 0.0  # ack with a result, cancel, expire: seconds the record is kept
    cancel_requested: bool = False  # extend: the write found a request to cancel the job
    step_end: StepEnd | None = None  # a workflow's step: how it ended, for the workflow
    attempt_error: AttemptError | None = None  # retry / dead: the failure to record
    event: JobEvent | None = None  # emitted once written
    tries: int = 0  # earlier flushes that failed with it (one may have written it)

    @property
    def queue(self) -> str:
        return self.job.queue

    def reduced(self) -> Outcome | None:
        """The same outcome without the task's data, for when the database refused the
        full one; None when there is nothing to leave out."""
        if self.kind == "dead":
            return Outcome(
                "dead",
                self.job,
                reason="(the reason could not be stored; see the worker's log)",
                event=self.event,
                step_end=self.step_end,
            )
        if self.kind == "retry" and self.attempt_error is not None:
            return Outcome("retry", self.job, delay=self.delay, event=self.event)
        if self.kind == "release" and self.give_back:
            return Outcome("release", self.job, give_back=False, event=self.event)
        end = self.step_end
        if self.kind == "ack" and (self.result is not None or (end and end.result is not None)):
            note = orjson.dumps(
                {"type": "ResultNotStored", "message": "the database refused it"}
            ).decode()
            return Outcome(
                "ack",
                self.job,
                self.archive,
                result_error=note if self.keeps_result else None,
                ttl=self.ttl,
                event=self.event,
                step_end=end._replace(result=None, error=note) if end is not None else None,
            )
        return None

    @property
    def keeps_result(self) -> bool:
        return self.result is not None or self.result_error is not None


def clean_text(text: object, limit: int = MAX_MESSAGE, *, keep_end: bool = False) -> str:
    """``text`` as something PostgreSQL's text accepts: no NUL (shown as ``\\x00``), no
    lone surrogate (shown escaped), at most ``limit`` characters (the start, or the end)."""
    try:
        value = text if isinstance(text, str) else str(text)
    except Exception as exc:  # a __str__ that raises
        value = f"<unprintable {type(text).__name__}: {type(exc).__name__}>"
    if len(value) > limit:
        value = "..." + value[-(limit - 3) :] if keep_end else value[: limit - 3] + "..."
    if "\x00" in value:
        value = value.replace("\x00", "\\x00")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def clean_delay(value: object) -> float | None:
    """A delay a task asked for (seconds as any real number, or a timedelta), as finite
    seconds within [0, MAX_DELAY]; None when it is not a number at all, or NaN (the
    policy's backoff applies)."""
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, numbers.Real | Decimal):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond a double
        return MAX_DELAY if str(value)[:1] != "-" else 0.0
    except (TypeError, ValueError, ArithmeticError):  # a Real whose __float__ misbehaves
        return None
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_DELAY)


def describe_error(error: BaseException) -> str:
    """``Type: message``, cleaned (for logs and reasons)."""
    name = clean_text(type(error).__qualname__, 200)
    text = clean_text(error)
    return f"{name}: {text}" if text else name


def attempt_error(job: Job, task_name: str | None, error: BaseException) -> AttemptError:
    """The record of a failed attempt, cleaned."""
    try:
        tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    except Exception:  # formatting calls the exception's own code
        tb = ""
    return AttemptError(
        job.msg_id,
        task_name,
        job.attempt,
        clean_text(type(error).__qualname__, 200),
        clean_text(error),
        clean_text(tb, MAX_TRACEBACK, keep_end=True) or None,
    )


def missing_body(size: int | None, limit: int) -> str:
    """The reason a message without a loaded body is dead-lettered."""
    if size is None:
        return "malformed message: the message body is NULL"
    return (
        f"the message body is {size:,} bytes, over the limit of {limit:,} bytes "
        "(App(max_message_size=...)); it was not loaded"
    )


def error_json(record: AttemptError | None) -> str | None:
    if record is None:
        return None
    return orjson.dumps(
        {"type": record.error_type, "message": record.message, "traceback": record.traceback}
    ).decode()
