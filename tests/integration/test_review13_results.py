"""Defects an adversarial review of job handles and results found (issue 13), each on a real
worker and database: results whose encoding raises or that hold NaN or an infinity, and a
false NUL."""

from __future__ import annotations

import math
from typing import Any

import anyio
import asyncpg
import orjson
import pydantic
import pytest

import pgtasks
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


async def _stored(conn: asyncpg.Connection, ref: pgtasks.JobRef[Any]) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT state, result::text AS result, error::text AS error FROM pgtasks.job_results "
        "WHERE queue = $1 AND msg_id = $2",
        ref.queue,
        ref.id,
    )
    assert row is not None, f"no record of job {ref.id}"
    return row


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
