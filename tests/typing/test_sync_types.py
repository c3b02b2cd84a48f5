"""Static checks, run by mypy (``warn_unused_ignores``): a plain ``def`` task is a `SyncTask`
(a `Task`), its ``defer`` is typed exactly as an async task's, ``defer_sync`` mirrors it
without the coroutine, and calling it returns its result directly.

Each ``# type: ignore[code]`` below marks a call that must be a type error. pytest imports
this module and runs the one trivial test; the checks live in a function never called.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import assert_type

import pgtasks
from pgtasks import JobRef, Signature, SyncTask, Task, TaskCall


async def _checks(app: pgtasks.App, cursor: Any) -> None:
    @app.task
    def resize(path: str, width: int = 100) -> bytes:
        return b""

    @app.task(queue="reports", max_retries=1)
    def report(day: str) -> None: ...

    @pgtasks.task
    def shared(n: int) -> float:
        return 1.0

    @app.task
    async def coro(n: int) -> str:
        return ""

    exact: SyncTask[[str, int], bytes] = resize
    exact_none: SyncTask[[str], None] = report
    exact_shared: SyncTask[[int], float] = shared
    exact_async: Task[[int], str] = coro
    not_sync: SyncTask[[int], str] = coro  # type: ignore[assignment]
    as_task: Task[[str, int], bytes] = resize  # a SyncTask is a Task
    wrong: Task[[int], bytes] = resize  # type: ignore[assignment]

    # defer is typed like an async task's
    assert_type(await resize.defer("a.png"), JobRef[bytes])
    assert_type(await resize.defer("a.png", width=5), JobRef[bytes])
    assert_type(await report.defer("2026-01-01"), JobRef[None])
    assert_type(await resize.options(delay=5).defer("a.png"), JobRef[bytes])
    call: TaskCall[[str, int], bytes] = resize.options(delay=5)
    assert_type(resize.s("a.png"), Signature)
    assert_type(await (await resize.defer("a")).result(), bytes)

    # defer_sync: the same, blocking
    assert_type(resize.defer_sync("a.png"), JobRef[bytes])
    assert_type(coro.defer_sync(1), JobRef[str])
    assert_type(resize.options(cursor=cursor).defer_sync("a.png", 3), JobRef[bytes])
    assert_type(shared.defer_sync(2), JobRef[float])

    # calling a SyncTask runs it and returns its result
    assert_type(resize("a.png"), bytes)
    assert_type(await coro(1), str)

    # wrong arguments
    await resize.defer(1)  # type: ignore[arg-type]
    resize.defer_sync(1)  # type: ignore[arg-type]
    resize.defer_sync()  # type: ignore[call-arg]
    resize.options(queue="x").defer_sync("a", "b")  # type: ignore[arg-type]
    await report.defer()  # type: ignore[call-arg]
    del exact, exact_none, exact_shared, exact_async, not_sync, as_task, wrong, call


def test_the_checks_are_run_by_mypy() -> None:
    assert _checks is not None
