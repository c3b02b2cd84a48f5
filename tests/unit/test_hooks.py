"""Hooks without a database: how they compose, what ``with_headers`` checks, and that an
enqueue hook runs before anything is sent (the app below never opens its pool)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import pgtasks
from pgtasks import EnqueueCall, EnqueueNext, JobRef
from pgtasks.hooks import compose

NOWHERE = "postgresql://root@127.0.0.1:1/nowhere"


async def test_compose_runs_the_first_hook_outermost() -> None:
    trail: list[str] = []

    async def outer(value: int, next_: Callable[[int], Awaitable[int]]) -> int:
        trail.append("outer>")
        result = await next_(value + 1)
        trail.append("<outer")
        return result * 10

    async def inner(value: int, next_: Callable[[int], Awaitable[int]]) -> int:
        trail.append("inner>")
        result = await next_(value * 2)
        trail.append("<inner")
        return result + 1

    async def last(value: int) -> int:
        trail.append(f"last {value}")
        return value

    assert await compose([outer, inner], last)(1) == 50
    assert trail == ["outer>", "inner>", "last 4", "<inner", "<outer"]
    assert await compose([], last)(3) == 3


def test_with_headers_adds_checked_headers_to_every_job() -> None:
    app = pgtasks.App(NOWHERE)

    @app.task(queue="tags")
    async def work(n: int) -> None: ...

    call = EnqueueCall((work.options(headers={"a": 1}).s(1), work.s(2)))
    tagged = call.with_headers({"b": 2})
    assert [s.options.headers for s in tagged.signatures] == [{"a": 1, "b": 2}, {"b": 2}]
    assert [s.options.headers for s in call.signatures] == [{"a": 1}, None]  # unchanged
    with pytest.raises(ValueError, match="reserved"):
        call.with_headers({"x-pgtasks-released": 1})
    with pytest.raises(ValueError, match="idempotency_key"):
        call.with_headers({"idempotency_key": "k"})


async def test_an_enqueue_hook_runs_before_anything_is_sent() -> None:
    app = pgtasks.App(NOWHERE)

    @app.task(queue="early")
    async def work(n: int) -> None: ...

    @app.hooks.around_enqueue
    async def refuse(call: EnqueueCall, next: EnqueueNext) -> list[JobRef[Any]]:
        raise LookupError(f"refused {len(call.signatures)}")

    with pytest.raises(LookupError, match="refused 1"):
        await work.defer(1)
    with pytest.raises(LookupError, match="refused 2"):
        await app.defer_many([work.s(1), work.s(2)])
    assert app.database._pool is None  # never connected


async def test_an_enqueue_hook_must_return_one_ref_per_defer() -> None:
    app = pgtasks.App(NOWHERE)

    @app.task(queue="short")
    async def work() -> None: ...

    @app.hooks.around_enqueue
    async def swallow(call: EnqueueCall, next: EnqueueNext) -> list[JobRef[Any]]:
        return []

    with pytest.raises(TypeError, match="returned 0 job refs for one job"):
        await work.defer()
    assert await app.defer_many([work.s()]) == []  # what the hook returned
