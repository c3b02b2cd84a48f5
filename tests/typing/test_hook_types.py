"""Static checks of the hooks' types, run by mypy (``warn_unused_ignores``): a hook with the
documented signature registers and keeps its own type; one with the wrong signature is a
type error. Each ``# type: ignore[code]`` marks a line that must be an error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from typing_extensions import assert_type

import pgtasks
from pgtasks import EnqueueCall, EnqueueNext, ExecuteNext, JobContext, JobRef


def timed_job() -> JobContext:
    raise NotImplementedError


async def plain_next(job: JobContext) -> object:
    return None


async def _checks(app: pgtasks.App) -> None:
    @app.hooks.around_enqueue
    async def tag(call: EnqueueCall, next: EnqueueNext) -> list[JobRef[Any]]:
        refs = await next(call.with_headers({"tenant": "acme"}))
        assert_type(refs, list[JobRef[Any]])
        return refs

    @app.hooks.around_execute
    async def timed(job: JobContext, next: ExecuteNext) -> object:
        assert_type(job, JobContext)
        return await next(job)

    # the decorators give back the function itself, with its own signature
    @app.hooks.around_execute
    async def tunable(job: JobContext, next: ExecuteNext, *, factor: int = 1) -> object:
        return await next(job)

    assert_type(await tunable(timed_job(), plain_next, factor=2), object)

    async def plain_callable(
        call: EnqueueCall, next: Callable[[EnqueueCall], Awaitable[list[JobRef[Any]]]]
    ) -> list[JobRef[Any]]:
        return await next(call)

    app.hooks.around_enqueue(plain_callable)  # a Callable for next is fine too

    async def wrong_result(call: EnqueueCall, next: EnqueueNext) -> JobRef[Any]:
        return (await next(call))[0]

    app.hooks.around_enqueue(wrong_result)  # type: ignore[type-var]

    async def wrong_order(job: JobContext, next: ExecuteNext) -> object:
        return await next(job)

    app.hooks.around_enqueue(wrong_order)  # type: ignore[type-var]
    app.hooks.around_execute(tag)  # type: ignore[type-var]


def test_the_checks_are_type_checked() -> None:
    assert callable(_checks)
