"""A task's settings (`TaskConfig`) and the checks of the options that are not plain
numbers; ``None`` in a task's config means the app's default.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._shared import OnSuccess
from ..exceptions import ConfigurationError

TASK_OPTIONS = frozenset(
    {
        "max_retries",
        "retry_backoff",
        "retry_backoff_max",
        "retry_jitter",
        "retry_on",
        "dont_retry_on",
        "timeout",
        "lease",
        "on_success",
        "transactional",
        "keep_result",
        "result_ttl",
    }
)
"""The decorator's options that are a task's settings (`TaskConfig`'s fields)."""


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
    transactional: bool = False
    keep_result: bool | None = None  # None: keep what is not None
    result_ttl: float | None = None  # seconds a job's record (its result) is kept


def check_lease(lease: float) -> float:
    if lease < 1:
        raise ConfigurationError(f"lease must be at least 1 second (got {lease})")
    return lease


def check_on_success(value: str) -> OnSuccess:
    if value not in ("archive", "delete"):
        raise ConfigurationError(f"on_success must be 'archive' or 'delete' (got {value!r})")
    return value  # type: ignore[return-value]
