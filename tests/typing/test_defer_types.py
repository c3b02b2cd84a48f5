"""Static checks, run by mypy (``warn_unused_ignores``): ``defer``, ``delay``, ``s`` and
``options(...).defer`` mirror the task's signature and return what they say.

Each ``# type: ignore[code]`` below marks a call that must be a type error. If a signature
stopped being checked, the ignore would become unused and mypy would fail. pytest imports this
module and runs the one trivial test; the checks live in a function that is never called.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg
from typing_extensions import assert_type

import pgtasks
from pgtasks import CancelOutcome, JobRef, JobStatus, Signature, Task, TaskCall


async def _checks(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    @app.task
    async def send_welcome_email(user_id: int, lang: str = "en") -> bool:
        return True

    @app.task(queue="reports", max_retries=1)
    async def build_report(day: dt.date, *, fmt: str) -> None: ...

    # the decorator keeps the parameters and the result type
    exact: Task[[int, str], bool] = send_welcome_email
    wrong: Task[[str], bool] = send_welcome_email  # type: ignore[assignment]
    wrong_result: Task[[int, str], int] = send_welcome_email  # type: ignore[assignment]
    assert_type(send_welcome_email.name, str)

    # defer / delay / s / options(...) take exactly the task's arguments
    assert_type(await send_welcome_email.defer(1), JobRef[bool])
    assert_type(await send_welcome_email.defer(user_id=1, lang="fr"), JobRef[bool])
    assert_type(await send_welcome_email.delay(1, "fr"), JobRef[bool])
    assert_type(send_welcome_email.s(1), Signature)
    call: TaskCall[[int, str], bool] = send_welcome_email.options(delay=5)
    wrong_call: TaskCall[[str], bool]
    wrong_call = send_welcome_email.options(delay=5)  # type: ignore[assignment]
    assert_type(await send_welcome_email.options(delay=5).defer(1), JobRef[bool])
    assert_type(await send_welcome_email.options(queue="x").delay(1), JobRef[bool])
    assert_type(send_welcome_email.options(queue="x").options(eta=None).s(1), Signature)
    assert_type(await send_welcome_email.options(connection=conn).defer(1), JobRef[bool])
    assert_type(await build_report.defer(dt.date.today(), fmt="pdf"), JobRef[None])
    assert_type(await send_welcome_email.apply_async((1,), {"lang": "fr"}), JobRef[bool])
    as_callable: Callable[[int, str], Coroutine[Any, Any, JobRef[bool]]] = send_welcome_email.defer

    # a ref's result is typed as the task's return value
    ref = await send_welcome_email.defer(1)
    assert_type(await ref.result(), bool)
    assert_type(await ref.result(timeout=5), bool)
    assert_type(await (await build_report.defer(dt.date.today(), fmt="x")).result(), None)
    assert_type(await ref.status(), JobStatus)
    assert_type(await ref.cancel(), CancelOutcome)
    assert_type(app.job("email", 1), JobRef[Any])
    wrong_result_type: str = await ref.result()  # type: ignore[assignment]

    # calling the task runs the function
    assert_type(send_welcome_email(1), Awaitable[bool])
    assert_type(await send_welcome_email(1), bool)

    # wrong type
    await send_welcome_email.defer(user_id="x")  # type: ignore[arg-type]
    await send_welcome_email.defer(1, 2)  # type: ignore[arg-type]
    await send_welcome_email.delay("x")  # type: ignore[arg-type]
    send_welcome_email.s("x")  # type: ignore[arg-type]
    await send_welcome_email.options(delay=5).defer("x")  # type: ignore[arg-type]
    send_welcome_email.options(delay=5).s("x")  # type: ignore[arg-type]
    await build_report.defer("2024-01-01", fmt="pdf")  # type: ignore[arg-type]
    await send_welcome_email("x")  # type: ignore[arg-type]

    # missing argument
    await send_welcome_email.defer()  # type: ignore[call-arg]
    await send_welcome_email.options(queue="x").defer()  # type: ignore[call-arg]
    send_welcome_email.s()  # type: ignore[call-arg]
    await build_report.defer(dt.date.today())  # type: ignore[call-arg]

    # unknown keyword, too many positionals, keyword-only passed positionally
    await send_welcome_email.defer(1, nope=2)  # type: ignore[call-arg]
    await send_welcome_email.options(queue="x").delay(1, nope=2)  # type: ignore[call-arg]
    await send_welcome_email.defer(1, "fr", "extra")  # type: ignore[call-arg]
    await build_report.defer(dt.date.today(), "pdf")  # type: ignore[call-arg]

    # options themselves are typed
    send_welcome_email.options(delay="soon")  # type: ignore[arg-type]
    send_welcome_email.options(eta="tomorrow")  # type: ignore[arg-type]
    send_welcome_email.options(priority=1)  # type: ignore[call-arg]
    send_welcome_email.options(queue=1)  # type: ignore[arg-type]

    # defer_many takes signatures, not coroutines
    sigs = [send_welcome_email.s(1), build_report.s(dt.date.today(), fmt="x")]
    assert_type(await app.defer_many(sigs), list[JobRef[Any]])
    await app.defer_many([send_welcome_email.defer(1)])  # type: ignore[list-item]

    # a plain def is a task too, run in a thread (tests/typing/test_sync_types.py)
    def not_async(x: int) -> int:
        return x

    as_sync: pgtasks.SyncTask[[int], int] = app.task(not_async)
    del as_sync

    del exact, wrong, wrong_result, as_callable, call, wrong_call


def test_typing_module_is_importable() -> None:
    """The checks above are for mypy; this only proves pytest can import the module."""
    assert callable(_checks)
