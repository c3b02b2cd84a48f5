"""Defects an adversarial review of job handles and results found (issue 13), each on a real
worker and database: handles from a dead letter's retry, results whose encoding raises or
that hold NaN or an infinity, a false NUL, and what a retried dead letter's original job
says afterwards."""

from __future__ import annotations

import argparse
import math
from typing import Any

import anyio
import asyncpg
import orjson
import pydantic
import pytest

import pgtasks
from pgtasks.admin import jobs as admin_jobs
from pgtasks.cli import jobs as cli_jobs
from tests.helpers import Events

WIDE = 2**70  # beyond 64 bits: orjson refuses it, the standard library's encoder takes over


def _deep(levels: int) -> list[Any]:
    top: list[Any] = []
    inner = top
    for _ in range(levels):
        inner.append([])
        inner = inner[0]
    return top


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text either")


class Dumpless(pydantic.BaseModel):
    """A model whose own conversion code raises (a validator, a computed field...)."""

    n: int

    def model_dump(self, **_: Any) -> dict[str, Any]:
        if self.n == 2:
            raise SystemExit("bye")
        if self.n == 3:
            raise Unprintable
        raise RuntimeError("model_dump exploded")


async def _dead_letter_of(app: pgtasks.App, queue: str) -> int:
    (dead,) = await app.dead_letters.list(queue=queue)
    return dead.id


async def _stored(conn: asyncpg.Connection, ref: pgtasks.JobRef[Any]) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT state, result::text AS result, error::text AS error FROM pgtasks.job_results "
        "WHERE queue = $1 AND msg_id = $2",
        ref.queue,
        ref.id,
    )
    assert row is not None, f"no record of job {ref.id}"
    return row


# --- 1. the refs a dead letter's retry returns are handles -----------------------------------


async def test_refs_from_a_dead_letter_retry_answer_status_and_result(app: pgtasks.App) -> None:
    healthy = False

    @app.task(queue="replayed", max_retries=0)
    async def double(n: int) -> int:
        if not healthy:
            raise RuntimeError("provider down")
        return n * 2

    await app.defer_many([double.s(1), double.s(2), double.s(3)])
    await app.worker(burst=True).run()
    letters = sorted(d.id for d in await app.dead_letters.list(queue="replayed"))
    healthy = True
    (one,) = await app.dead_letters.retry(letters[:1])
    ((_, two),) = await app.dead_letters.retry_by_id(letters[1:2])
    (three,) = await app.dead_letters.retry_all(queue="replayed")
    for ref in (one, two, three):
        assert (await ref.status()).state == "waiting"
    async with app.worker(poll_interval=30):
        with anyio.fail_after(10):
            assert [await r.result() for r in (one, two, three)] == [2, 4, 6]
    assert (await one.status()).state == "succeeded"


# --- 2. a result whose encoding raises: succeeded, not stored, never run again ---------------


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("deep", "nested too deeply"),  # RecursionError in the standard library's encoder
        ("deep_orjson", "nested too deeply"),  # orjson's own recursion limit
        ("model_dump", "RuntimeError: model_dump exploded"),  # user code, beside a wide int
        ("model_dump_alone", "model_dump exploded"),  # user code, under orjson
        ("model_dump_exit", "SystemExit: bye"),  # not even an Exception
        ("unprintable", "<unprintable Unprintable>"),  # an error whose __str__ raises
    ],
)
@pytest.mark.parametrize("transactional", [False, True])
async def test_a_result_whose_encoding_raises_is_recorded_and_the_job_not_run_again(
    app: pgtasks.App, conn: asyncpg.Connection, kind: str, said: str, transactional: bool
) -> None:
    await conn.execute("CREATE TABLE effects (n integer NOT NULL)")
    runs: list[int] = []

    @app.task(queue="encoding", max_retries=2, retry_backoff=0.01, transactional=transactional)
    async def make(kind: str) -> Any:
        runs.append(pgtasks.current_job().attempt)
        job_conn = pgtasks.current_job().connection
        if job_conn is not None:
            await job_conn.execute("INSERT INTO effects VALUES (1)")
        if kind == "deep":
            return {"wide": WIDE, "deep": _deep(5_000)}
        if kind == "deep_orjson":
            return _deep(1_000)
        if kind == "model_dump":
            return {"wide": WIDE, "model": Dumpless(n=1)}
        if kind == "model_dump_exit":
            return {"wide": WIDE, "model": Dumpless(n=2)}
        if kind == "unprintable":
            return {"wide": WIDE, "model": Dumpless(n=3)}
        return Dumpless(n=1)

    ref = await make.defer(kind)
    async with app.worker(poll_interval=0.05) as worker:
        events = Events(worker)
        with pytest.raises(pgtasks.ResultUnavailable) as unavailable:
            await ref.result(timeout=10)
        await anyio.sleep(0.3)  # time enough for a retry, had there been one
    assert runs == [1]
    assert events.counts["succeeded"] == 1
    assert events.counts["retried"] == events.counts["failed"] == 0
    assert said in str(unavailable.value)
    assert "could not be encoded" in str(unavailable.value)
    status = await ref.status()
    assert status.state == "succeeded"
    assert status.error is not None
    assert status.error["type"] == "ResultNotStored"
    row = await _stored(conn, ref)
    assert (row["state"], row["result"]) == ("succeeded", None)
    if transactional:
        assert await conn.fetchval("SELECT count(*) FROM effects") == 1


# --- 3. NaN and the infinities are not JSON: refused, said so, everywhere -----------------------


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        [1.0, math.inf],
        {"ratio": -math.inf},
        {"nested": [{"x": math.nan}]},
        {"wide": WIDE, "x": math.nan},  # the standard library's path
    ],
    ids=["nan", "inf", "-inf", "in-list", "in-dict", "nested", "beside-wide-int"],
)
async def test_a_result_holding_nan_or_infinity_is_not_stored_and_says_why(
    app: pgtasks.App, conn: asyncpg.Connection, value: object
) -> None:
    runs: list[int] = []

    @app.task(queue="floats", max_retries=2, retry_backoff=0.01)
    async def compute() -> Any:
        runs.append(1)
        return value

    ref = await compute.defer()
    async with app.worker(poll_interval=0.05):
        with pytest.raises(pgtasks.ResultUnavailable) as unavailable:
            await ref.result(timeout=10)
    assert runs == [1]
    assert "NaN or an infinity" in str(unavailable.value)
    row = await _stored(conn, ref)
    assert row["result"] is None  # never a null standing in for the number
    assert orjson.loads(row["error"])["type"] == "ResultNotStored"


async def test_a_pydantic_result_holding_nan_is_not_stored(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    class Reading(pydantic.BaseModel):
        value: float

    @app.task(queue="floats")
    async def read() -> Reading:
        return Reading(value=math.nan)

    ref = await read.defer()
    async with app.worker(poll_interval=0.05):
        with pytest.raises(pgtasks.ResultUnavailable, match="NaN or an infinity"):
            await ref.result(timeout=10)
    assert (await _stored(conn, ref))["result"] is None


async def test_a_result_with_null_and_finite_floats_is_kept(app: pgtasks.App) -> None:
    @app.task(queue="floats")
    async def fine() -> dict[str, Any]:
        return {"missing": None, "x": 1.5, "items": [None, 0.0, -2.25]}

    ref = await fine.defer()
    async with app.worker(poll_interval=0.05):
        assert await ref.result(timeout=10) == {
            "missing": None,
            "x": 1.5,
            "items": [None, 0.0, -2.25],
        }


# --- 4. NUL: the character, not its escape's text ---------------------------------------------


async def test_the_text_of_a_nul_escape_is_kept_and_a_real_nul_is_refused(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    class Note(pydantic.BaseModel):
        text: str

    @app.task(queue="nul")
    async def escaped() -> str:
        return "C:\\u0000 is six characters"

    @app.task(queue="nul")
    async def nested_escape() -> dict[str, list[str]]:
        return {"\\u0000": ["\\u0000", "\\\\u0000"]}

    @app.task(queue="nul")
    async def real() -> str:
        return "before\x00after"

    @app.task(queue="nul")
    async def in_model() -> Note:
        return Note(text="a\x00b")

    refs = [await t.defer() for t in (escaped, nested_escape, real, in_model)]
    async with app.worker(poll_interval=0.05):
        with anyio.fail_after(10):
            assert await refs[0].result() == "C:\\u0000 is six characters"
            assert await refs[1].result() == {"\\u0000": ["\\u0000", "\\\\u0000"]}
            for ref in refs[2:]:
                with pytest.raises(pgtasks.ResultUnavailable, match="NUL character"):
                    await ref.result()
    for ref in refs[2:]:
        assert (await _stored(conn, ref))["result"] is None


def test_arguments_with_a_nul_inside_a_model_are_refused_before_sending() -> None:
    from pgtasks.serialization import envelope

    class Note(pydantic.BaseModel):
        text: str

    with pytest.raises(pgtasks.SerializationError, match="positional argument 1 contains a NUL"):
        envelope.encode("t", (1, Note(text="a\x00b")), {}, max_size=10_000)
    assert "\\\\u0000" in envelope.encode("t", ("\\u0000",), {}, max_size=10_000)


# --- 5. a retried dead letter's original job still failed, and names its retry ---------------


async def test_a_retried_dead_letter_keeps_its_failure_and_names_the_new_job(
    app: pgtasks.App, capsys: pytest.CaptureFixture[str]
) -> None:
    healthy = False

    @app.task(queue="again", max_retries=1, retry_backoff=0.01)
    async def charge(order: int) -> int:
        if not healthy:
            raise RuntimeError(f"provider down for {order}")
        return order

    original = await charge.defer(7)
    async with app.worker(poll_interval=0.05):
        with pytest.raises(pgtasks.JobFailed):
            await original.result(timeout=10)
    healthy = True
    (retried,) = await app.dead_letters.retry([await _dead_letter_of(app, "again")])
    assert retried.id != original.id

    for ref in (original, app.job("again", original.id)):
        status = await ref.status()
        assert status.state == "failed"
        assert status.retried_as == retried.id
        assert status.attempts == 2
        assert status.error is not None
        assert status.error["type"] == "RuntimeError"
        assert "retries exhausted" in status.error["reason"]
        with pytest.raises(pgtasks.JobFailed) as failed:
            await ref.result(timeout=5)
        assert failed.value.retried_as == retried.id
        assert f"retried as job {retried.id}" in str(failed.value)
        assert failed.value.error_type == "RuntimeError"

    async with app.worker(poll_interval=30):
        assert await retried.result(timeout=10) == 7
    assert (await original.status()).state == "failed"  # the retry's success is its own

    detail = await admin_jobs.get_job(app.database, "again", original.id)
    assert detail.summary.state == "failed"
    assert detail.retried_as == retried.id
    assert detail.body == {"v": 1, "task": charge.name, "kwargs": {"order": 7}}
    assert [a.attempt for a in detail.attempts] == [1, 2]
    failed_ids = [j.id for j in await admin_jobs.list_jobs(app.database, "again", "failed")]
    assert failed_ids == [original.id]
    everything = {j.id: j.state for j in await admin_jobs.list_jobs(app.database, "again")}
    assert everything == {original.id: "failed", retried.id: "succeeded"}

    args = argparse.Namespace(queue="again", id=original.id, json=False)
    assert await cli_jobs.show(app, args) == 0
    shown = capsys.readouterr().out
    assert f"job {original.id} in queue again: failed" in shown
    assert f"retried as job {retried.id}" in shown


async def test_a_retry_that_fails_again_chains_the_records(app: pgtasks.App) -> None:
    @app.task(queue="chain", max_retries=0)
    async def broken() -> int:
        raise RuntimeError("still broken")

    first = await broken.defer()
    await app.worker(burst=True).run()
    (second,) = await app.dead_letters.retry([await _dead_letter_of(app, "chain")])
    await app.worker(burst=True).run()
    (third,) = await app.dead_letters.retry([await _dead_letter_of(app, "chain")])
    assert (await first.status()).retried_as == second.id
    assert (await second.status()).retried_as == third.id
    assert (await third.status()).state == "waiting"
    assert [s.state for s in [await first.status(), await second.status()]] == ["failed"] * 2
