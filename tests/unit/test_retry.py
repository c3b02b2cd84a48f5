"""The retry policy: which failures get another attempt, and the backoff schedule."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgtasks import Fail, Retry, RetryPolicy
from pgtasks.tasks import TaskConfig

# --- should_retry -------------------------------------------------------------------------


def test_max_retries_counts_retries_after_the_first_attempt() -> None:
    policy = RetryPolicy(max_retries=2)
    error = RuntimeError("boom")
    assert [policy.should_retry(error, attempt) for attempt in (1, 2, 3, 4)] == [
        True,
        True,
        False,  # attempt 3 was the second retry: no more
        False,
    ]


def test_zero_retries_means_one_attempt() -> None:
    assert not RetryPolicy(max_retries=0).should_retry(ValueError(), 1)


def test_only_retry_on_exceptions_are_retried() -> None:
    policy = RetryPolicy(retry_on=(ConnectionError, TimeoutError))
    assert policy.should_retry(ConnectionResetError(), 1)  # a subclass counts
    assert policy.should_retry(TimeoutError(), 1)
    assert not policy.should_retry(ValueError(), 1)


def test_dont_retry_on_wins_over_retry_on() -> None:
    policy = RetryPolicy(retry_on=(Exception,), dont_retry_on=(KeyError,))
    assert not policy.should_retry(KeyError("k"), 1)
    assert policy.should_retry(IndexError(), 1)


def test_retry_signal_is_retried_even_when_not_in_retry_on() -> None:
    policy = RetryPolicy(max_retries=1, retry_on=(ConnectionError,), dont_retry_on=(Retry,))
    assert policy.should_retry(Retry(delay=5), 1)
    assert not policy.should_retry(Retry(delay=5), 2)  # but never past max_retries


def test_fail_signal_is_never_retried() -> None:
    policy = RetryPolicy(max_retries=10, retry_on=(Exception,))
    assert not policy.should_retry(Fail("bad input"), 1)


def test_base_exceptions_outside_retry_on_are_not_retried() -> None:
    assert not RetryPolicy().should_retry(KeyboardInterrupt(), 1)


def test_signals_carry_their_arguments() -> None:
    assert Retry(delay=2.5).delay == 2.5
    assert Retry().delay is None
    assert str(Retry()) == "retry requested"
    assert str(Retry(reason="rate limited")) == "rate limited"
    assert Fail("no such user").reason == "no such user"


def test_from_config_prefers_the_task_then_the_app_then_the_defaults() -> None:
    task = TaskConfig(max_retries=7)
    app = TaskConfig(max_retries=1, retry_backoff=0.5, retry_on=(OSError,))
    policy = RetryPolicy.from_config(task, app)
    assert policy == RetryPolicy(
        max_retries=7,
        retry_backoff=0.5,
        retry_backoff_max=RetryPolicy().retry_backoff_max,
        retry_jitter=RetryPolicy().retry_jitter,
        retry_on=(OSError,),
        dont_retry_on=(),
    )


def test_from_config_keeps_falsy_settings() -> None:
    policy = RetryPolicy.from_config(TaskConfig(max_retries=0, retry_jitter=False), TaskConfig())
    assert policy.max_retries == 0
    assert policy.retry_jitter is False


# --- backoff ------------------------------------------------------------------------------


def test_backoff_without_jitter_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(retry_backoff=2.0, retry_backoff_max=20.0, retry_jitter=False)
    assert [policy.backoff(n) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 20.0, 20.0]


def test_backoff_of_huge_attempt_numbers_is_the_cap() -> None:
    policy = RetryPolicy(retry_backoff=1.0, retry_backoff_max=600.0, retry_jitter=False)
    assert policy.backoff(10_000) == 600.0


def test_backoff_treats_attempt_zero_like_the_first() -> None:
    policy = RetryPolicy(retry_backoff=3.0, retry_jitter=False)
    assert policy.backoff(0) == policy.backoff(1) == 3.0


def test_jitter_spreads_over_the_whole_range() -> None:
    policy = RetryPolicy(retry_backoff=10.0, retry_backoff_max=10.0, retry_jitter=True)
    rng = random.Random(1234)
    draws = [policy.backoff(1, rng) for _ in range(2000)]
    assert min(draws) < 1.0  # full jitter: close to zero happens
    assert max(draws) > 9.0
    assert all(0.0 <= d <= 10.0 for d in draws)


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy()
    first = [policy.backoff(n, random.Random(7)) for n in range(1, 6)]
    again = [policy.backoff(n, random.Random(7)) for n in range(1, 6)]
    assert first == again


policies = st.builds(
    RetryPolicy,
    retry_backoff=st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
    retry_backoff_max=st.floats(min_value=0.0, max_value=1e7, allow_nan=False),
    retry_jitter=st.booleans(),
)
attempts = st.integers(min_value=-5, max_value=10_000)


@settings(max_examples=200, database=None)
@given(policy=policies, attempt=attempts, seed=st.integers())
def test_backoff_is_never_negative_and_never_above_the_cap(
    policy: RetryPolicy, attempt: int, seed: int
) -> None:
    delay = policy.backoff(attempt, random.Random(seed))
    assert 0.0 <= delay <= policy.retry_backoff_max


@settings(max_examples=200, database=None)
@given(policy=policies, attempt=st.integers(min_value=1, max_value=10_000), seed=st.integers())
def test_jitter_stays_within_zero_and_the_ceiling(
    policy: RetryPolicy, attempt: int, seed: int
) -> None:
    jittered = RetryPolicy(
        retry_backoff=policy.retry_backoff,
        retry_backoff_max=policy.retry_backoff_max,
        retry_jitter=True,
    )
    ceiling = RetryPolicy(
        retry_backoff=policy.retry_backoff,
        retry_backoff_max=policy.retry_backoff_max,
        retry_jitter=False,
    ).backoff(attempt)
    assert 0.0 <= jittered.backoff(attempt, random.Random(seed)) <= ceiling


@settings(max_examples=300, database=None)
@given(
    base=st.floats(min_value=0.001, max_value=100.0),
    attempt=st.integers(min_value=1, max_value=40),
)
def test_no_jitter_is_exactly_exponential_below_the_cap(base: float, attempt: int) -> None:
    policy = RetryPolicy(retry_backoff=base, retry_backoff_max=float("inf"), retry_jitter=False)
    assert policy.backoff(attempt) == base * 2.0 ** (attempt - 1)
    assert policy.backoff(attempt + 1) == 2 * policy.backoff(attempt)


@settings(max_examples=300, database=None)
@given(policy=policies, attempt=st.integers(min_value=1, max_value=10_000))
def test_no_jitter_schedule_never_decreases(policy: RetryPolicy, attempt: int) -> None:
    exact = RetryPolicy(
        retry_backoff=policy.retry_backoff,
        retry_backoff_max=policy.retry_backoff_max,
        retry_jitter=False,
    )
    assert exact.backoff(attempt) <= exact.backoff(attempt + 1)
    assert exact.backoff(attempt) == min(
        exact.retry_backoff_max, exact.retry_backoff * 2.0 ** min(attempt - 1, 62)
    )


@pytest.mark.parametrize("attempt", [1, 2, 5])
def test_zero_base_means_retry_at_once(attempt: int) -> None:
    assert RetryPolicy(retry_backoff=0.0).backoff(attempt, random.Random(0)) == 0.0
