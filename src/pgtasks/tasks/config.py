"""A task's options: their one definition (`TaskOptions` and `TASK_OPTIONS`), and the
settings they become (`TaskConfig`).

Nine of them are also the app's defaults for every task (`TaskDefaults`, given to `App`):
in a task's config ``None`` means the app's default; the app fills what it is not given
from each option's default here. The checks are `TASK_OPTIONS`' and run where the options
are given (``@app.task(...)``, ``@pgtasks.task(...)``, ``App(...)``), never per job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from typing_extensions import TypedDict

from .._options import (
    Choice,
    ExceptionTypes,
    Flag,
    Number,
    Option,
    OptionSet,
    QueueName,
    Text,
)
from .._shared import OnSuccess
from ..exceptions import ConfigurationError

MAX_TASK_SECONDS = 30 * 86_400  # the longest timeout and retry backoff cap: 30 days


class TaskDefaults(TypedDict, total=False):
    """The task options an `App` takes as defaults for all its tasks (and every task may
    override); each one's meaning, default and range are in
    [Configuration](configuration.md#task-options). In a task, ``None`` (the default)
    means the app's value; given to the app, ``None`` means pgtasks' default."""

    max_retries: int | None
    retry_backoff: float | None
    retry_backoff_max: float | None
    retry_jitter: bool | None
    retry_on: tuple[type[BaseException], ...] | None
    dont_retry_on: tuple[type[BaseException], ...] | None
    timeout: float | None
    lease: float | None
    on_success: OnSuccess | None
    keep_result: bool | None
    result_ttl: float | None


class TaskOptions(TaskDefaults, total=False):
    """The options of ``@app.task(...)`` and ``@pgtasks.task(...)``: the `TaskDefaults`,
    plus ``name``, ``queue`` and ``transactional``, which only a task has; see
    [Configuration](configuration.md#task-options)."""

    name: str | None
    queue: str
    transactional: bool


def _backoff_cap(values: Mapping[str, Any], where: str) -> None:
    base, cap = values.get("retry_backoff"), values.get("retry_backoff_max")
    if base is not None and cap is not None and cap < base:
        raise ConfigurationError(
            f"{where}: retry_backoff_max must be at least retry_backoff "
            f"(got retry_backoff_max={cap!r} and retry_backoff={base!r})"
        )


TASK_DEFAULTS = OptionSet(
    Option(
        "max_retries",
        3,
        "retries after the first attempt (Celery's meaning): at most max_retries + 1 runs",
        Number(0, 10_000, integer=True),
    ),
    Option(
        "retry_backoff",
        2.0,
        "base of the exponential backoff: retry n waits up to retry_backoff * 2 ** (n - 1) s",
        Number(0, 86_400, unit="seconds"),
    ),
    Option(
        "retry_backoff_max",
        600.0,
        "cap of the backoff, in seconds; at least retry_backoff",
        Number(0, MAX_TASK_SECONDS, unit="seconds"),
    ),
    Option(
        "retry_jitter",
        True,
        "full jitter: wait a uniform draw below the backoff instead of the backoff itself",
        Flag(),
    ),
    Option(
        "retry_on",
        (Exception,),
        "exception types that are retried; others fail at once",
        ExceptionTypes(),
    ),
    Option(
        "dont_retry_on",
        (),
        "exception types that fail at once, even when retry_on matches them",
        ExceptionTypes(),
    ),
    Option(
        "timeout",
        None,
        "seconds a run may take before it is cancelled and counted as a failed attempt",
        Number(0, MAX_TASK_SECONDS, above=True, unit="seconds", none="no limit"),
        default_text="None (no limit)",
    ),
    Option(
        "lease",
        30.0,
        "visibility timeout kept (and extended) while a job runs; a crashed worker's job "
        "reappears after it",
        Number(1, 86_400, unit="seconds"),
    ),
    Option(
        "on_success",
        "archive",
        "what happens to a succeeded message: kept in pgmq's archive, or deleted",
        Choice("archive", "delete"),
    ),
    Option(
        "keep_result",
        None,
        "whether a job's return value is kept for ref.result()",
        Flag(
            none="by the return annotation: -> None keeps nothing, another annotation "
            "every result, none what is not None"
        ),
        default_text="None (by the return annotation)",
    ),
    Option(
        "result_ttl",
        7 * 86_400.0,
        "seconds a job's record (its result, or its cancellation or expiry) is kept after it ended",
        Number(1, 366 * 86_400, unit="seconds"),
        default_text="604800 (7 days)",
    ),
    relations=(_backoff_cap,),
)
"""The options an app sets for all its tasks, with pgtasks' defaults."""

TASK_OPTIONS = OptionSet(
    Option(
        "name",
        None,
        "the name messages carry",
        Text(none="the function's module.qualname"),
        default_text="module.qualname",
    ),
    Option(
        "queue",
        "default",
        "the queue it is deferred to (and a worker serves)",
        QueueName(),
    ),
    *TASK_DEFAULTS.values(),
    Option(
        "transactional",
        False,
        "run the task in a transaction that also acks the job; it writes through "
        "current_job().connection",
        Flag(),
    ),
    relations=TASK_DEFAULTS.relations,
)
"""The options of ``@app.task``: `TASK_DEFAULTS` (where ``None`` means the app's), plus
``name``, ``queue`` and ``transactional``."""


@dataclass(frozen=True)
class TaskConfig:
    """Per-task settings; ``None`` means the app's default."""

    max_retries: int | None = None
    retry_backoff: float | None = None
    retry_backoff_max: float | None = None
    retry_jitter: bool | None = None
    retry_on: tuple[type[BaseException], ...] | None = None
    dont_retry_on: tuple[type[BaseException], ...] | None = None
    timeout: float | None = None
    lease: float | None = None
    on_success: OnSuccess | None = None
    keep_result: bool | None = None  # None: by the return annotation
    result_ttl: float | None = None  # seconds a job's record (its result) is kept
    transactional: bool = False


def task_options(given: Mapping[str, Any], where: str) -> tuple[str | None, str, TaskConfig]:
    """A task's name, queue and config from its decorator's options, checked. ``None`` for
    one of the `TaskDefaults` is the app's default, and is not checked."""
    checked = TASK_OPTIONS.check({k: v for k, v in given.items() if v is not None}, where)
    name = checked.pop("name", None)
    queue = checked.pop("queue", TASK_OPTIONS["queue"].default)
    return name, queue, TaskConfig(**checked)


def app_defaults(given: Mapping[str, Any], where: str = "App") -> TaskConfig:
    """An app's task defaults, checked, with pgtasks' own where one is not given (or is
    ``None``)."""
    checked = TASK_DEFAULTS.resolve({k: v for k, v in given.items() if v is not None}, where)
    return TaskConfig(**checked)


BUILTIN_DEFAULTS = TaskConfig(**TASK_DEFAULTS.defaults())
"""pgtasks' own defaults, those of an `App` given none."""
