"""Retry policy, and the signals a task raises to steer its own retries.

The attempt number is pgmq's ``read_ct`` (1 on the first run). ``max_retries`` keeps
Celery's meaning: retries after the first attempt, so at most ``max_retries + 1`` runs. The
delay before retry n is exponential with a cap and, by default, full jitter:
``uniform(0, min(retry_backoff_max, retry_backoff * 2 ** (n - 1)))``. It is applied with a
visibility timeout on the database clock.

`Retry` and `Fail` are control flow, not errors, so they do not derive from `PgTasksError`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TypeVar

from .config import BUILTIN_DEFAULTS, TaskConfig

T = TypeVar("T")


def _first(*values: T | None) -> T:
    for value in values:
        if value is not None:
            return value
    raise AssertionError("the last value is a default and never None")


class Retry(Exception):
    """Raise in a task to retry it after ``delay`` seconds (the policy's backoff if None).
    Counts as an attempt."""

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        super().__init__(reason or "retry requested")
        self.delay = delay


class Fail(Exception):
    """Raise in a task to fail it now, with no further attempts: it goes to the dead
    letters with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3
    retry_backoff: float = 2.0
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dont_retry_on: tuple[type[BaseException], ...] = ()

    @classmethod
    def from_config(cls, task: TaskConfig, app: TaskConfig) -> RetryPolicy:
        """The task's settings, else the app's, else pgtasks' defaults (`TASK_DEFAULTS`)."""
        d = BUILTIN_DEFAULTS
        return cls(
            max_retries=_first(task.max_retries, app.max_retries, d.max_retries),
            retry_backoff=_first(task.retry_backoff, app.retry_backoff, d.retry_backoff),
            retry_backoff_max=_first(
                task.retry_backoff_max, app.retry_backoff_max, d.retry_backoff_max
            ),
            retry_jitter=_first(task.retry_jitter, app.retry_jitter, d.retry_jitter),
            retry_on=_first(task.retry_on, app.retry_on, d.retry_on),
            dont_retry_on=_first(task.dont_retry_on, app.dont_retry_on, d.dont_retry_on),
        )

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Whether a run that failed with ``exc`` on ``attempt`` (1-based) gets another."""
        if isinstance(exc, Fail) or attempt > self.max_retries:
            return False
        if isinstance(exc, Retry):
            return True
        if self.dont_retry_on and isinstance(exc, self.dont_retry_on):
            return False
        return isinstance(exc, self.retry_on)

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed ``attempt`` (1-based) before the next one."""
        exponent = min(max(attempt - 1, 0), 62)
        ceiling = min(self.retry_backoff_max, self.retry_backoff * 2.0**exponent)
        if not self.retry_jitter:
            return ceiling
        return (rng or random).uniform(0, ceiling)
