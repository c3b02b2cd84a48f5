"""Workflows attacked by an independent review (issue 15): members retried and timed out,
groups of one and chords of none, nested workflows, an error callback that fails or names a
key, two workers racing for a chord's last members, a member run twice after its lease
lapsed, a failed step retried by hand, cancels twice and against completion, a group of
10,000, a handle of the wrong kind, a closed app, and hostile text in `workflow show`."""

from __future__ import annotations

import argparse
import datetime as dt
import time
from typing import Any

import anyio
import asyncpg
import orjson
import pytest

import pgtasks
import pgtasks.worker.leases
from pgtasks import Retry, chain, chord, group
from pgtasks.cli.workflows import show
from tests.helpers import Events


async def test_retried_chord_members_count_once(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    attempts: list[tuple[int, int]] = []
    totals: list[list[int]] = []

    @app.task(queue="rv_retry", max_retries=3)
    async def member(n: int) -> int:
        attempt = pgtasks.current_job().attempt
        attempts.append((n, attempt))
        if attempt < 3 and n % 2 == 0:
            raise Retry(delay=0)
        return n

    @app.task(queue="rv_retry")
    async def total(values: list[int]) -> int:
        totals.append(values)
        return sum(values)

    ref = await chord((member.s(i) for i in range(6)), total.partial()).defer()
    async with app.worker(queues=["rv_retry"], poll_interval=0.1):
        assert await ref.result(timeout=20) == 15
    assert totals == [[0, 1, 2, 3, 4, 5]]  # once, every result, in order
    assert len(attempts) == 3 * 3 + 3  # the even ones ran three times
    assert await conn.fetchval("SELECT pending FROM pgtasks.workflows WHERE id = $1", ref.id) == 0


async def test_a_member_that_times_out(app: pgtasks.App) -> None:
    @app.task(queue="rv_slow", timeout=0.3, max_retries=1, retry_backoff=0.01)
    async def member(n: int) -> int:
        if pgtasks.current_job().attempt == 1 and n == 1:
            await anyio.sleep(5)
        return n

    @app.task(queue="rv_slow", timeout=0.3, max_retries=0)
    async def stuck(n: int) -> int:
        await anyio.sleep(5)
        return n

    @app.task(queue="rv_slow")
    async def total(values: list[int]) -> int:
        return sum(values)

    recovered = await chord((member.s(i) for i in range(3)), total.partial()).defer()
    failed = await chord([member.s(0), stuck.s(1)], total.partial()).defer()
    async with app.worker(queues=["rv_slow"], poll_interval=0.1):
        assert await recovered.result(timeout=20) == 3
        with pytest.raises(pgtasks.WorkflowFailed) as caught:
            await failed.result(timeout=20)
    assert caught.value.step == 1
    assert caught.value.error_type == "JobTimeout"


async def test_a_group_of_one_and_a_chord_of_none(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="rv_small")
    async def one(n: int) -> int:
        return n

    @app.task(queue="rv_small")
    async def total(values: list[int]) -> int:
        return sum(values)

    single = await group([one.s(7)]).defer()
    lone_chord = await chord([one.s(5)], total.partial()).defer()
    with pytest.raises(ValueError, match="at least one"):
        chord([], total.partial())
    with pytest.raises(ValueError, match="at least one"):
        group([])
    # built by hand, a chord of its callback alone would run forever: nothing sends it
    with pytest.raises(ValueError, match="a chord needs at least one member"):
        pgtasks.Workflow("chord", (total.partial(),))
    steps = orjson.dumps([{"queue": "rv_small", "task": total.name, "body": {}}]).decode()
    with pytest.raises(asyncpg.InvalidParameterValueError, match="at least one member"):
        await conn.execute("SELECT pgtasks.workflow_start('chord', $1::jsonb)", steps)
    async with app.worker(queues=["rv_small"], poll_interval=0.1):
        assert await single.result(timeout=15) == [7]
        assert await lone_chord.result(timeout=15) == 5


async def test_nested_workflows_are_refused_with_a_clear_error(app: pgtasks.App) -> None:
    @app.task(queue="rv_nest")
    async def step(n: int) -> int:
        return n

    @app.task(queue="rv_nest")
    async def total(values: list[int]) -> int:
        return sum(values)

    inner_group = group(step.s(1), step.s(2))
    inner_chain = chain(step.s(1), step.partial())
    with pytest.raises(TypeError, match="a chain's step cannot be a group"):
        chain(step.s(0), inner_group)
    with pytest.raises(TypeError, match="not a signature"):
        chord(inner_group, inner_chain)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a chord's header is a group, not a chain"):
        chord(inner_chain, total.partial())
    # a group of workflows: each is named, not "'Workflow' object is not iterable"
    for nested in (inner_group, inner_chain):
        with pytest.raises(TypeError, match=r"group\(\) takes signatures.*but a (group|chain)"):
            group(nested)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"group\(\) takes signatures.*but a (group|chain)"):
            group([step.s(0), nested])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="cannot follow a chain with a group"):
        _ = inner_chain | inner_group


async def test_an_error_callback_that_fails_ends_in_the_dead_letters_once(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    calls: list[int] = []

    @app.task(queue="rv_err", max_retries=0)
    async def boom(n: int) -> int:
        raise ValueError("boom")

    @app.task(queue="rv_err", max_retries=1, retry_backoff=0.01)
    async def alarm(failed: dict[str, Any], error: dict[str, Any]) -> None:
        calls.append(failed["step"])
        raise RuntimeError("the alarm is broken too")

    ref = await chain(boom.s(1), boom.partial(), on_error=alarm).defer()
    async with app.worker(queues=["rv_err"], poll_interval=0.1) as worker:
        events = Events(worker)
        with pytest.raises(pgtasks.WorkflowFailed):
            await ref.result(timeout=15)
        await events.until(lambda: events.counts["dead"] == 2)  # the step, then the alarm
        await anyio.sleep(0.3)
    assert calls == [0, 0]  # its own retry policy, and no more
    status = await ref.status()
    assert (status.state, status.failed_step) == ("failed", 0)
    tasks = await conn.fetch("SELECT task FROM pgtasks.dead_letters ORDER BY id")
    assert [r["task"] for r in tasks] == [boom.name, alarm.name]


async def test_an_error_callback_with_options(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    reported: list[int] = []

    @app.task(queue="rv_opts", max_retries=0)
    async def step(n: int) -> int:
        if n < 0:
            raise ValueError("negative")
        return n

    @app.task(queue="rv_opts")
    async def alarm(failed: dict[str, Any], error: dict[str, Any]) -> None:
        reported.append(failed["step"])

    # the callback is sent when the workflow fails, at once: a key (one held by another
    # job would have it dropped as a duplicate), an eta or a delay cannot be honoured
    keyed = chain(step.s(1), on_error=alarm.options(idempotency_key="taken"))
    with pytest.raises(ValueError, match=r"error callback.*idempotency key"):
        await keyed.defer()
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=1)
    for callback in (alarm.options(eta=later), alarm.options(delay=60)):
        with pytest.raises(ValueError, match=r"error callback.*an eta or a delay"):
            await chain(step.s(1), on_error=callback).defer()
    # a connection of a step's or callback's own would be ignored: the workflow's is used
    for flow in (
        chain(step.s(1), step.options(connection=conn).partial()),
        chain(step.s(1), on_error=alarm.options(connection=conn)),
    ):
        with pytest.raises(ValueError, match=r"connection \(or cursor\) of its own"):
            await flow.defer()
    # a queue of its own is honoured (task.options(...) as the callback)
    ref = await chain(step.s(-1), step.partial(), on_error=alarm.options(queue="rv_alarms")).defer()
    async with app.worker(queues=["rv_opts", "rv_alarms"], poll_interval=0.05) as worker:
        events = Events(worker)
        with pytest.raises(pgtasks.WorkflowFailed):
            await ref.result(timeout=15)
        await events.until(lambda: events.counts["succeeded"] == 1)
    assert reported == [0]
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_rv_alarms") == 1


async def test_two_workers_end_a_chords_last_members_at_once(
    app: pgtasks.App, db_dsn: str, conn: asyncpg.Connection
) -> None:
    gate = anyio.Event()
    started: list[int] = []
    callbacks: list[int] = []
    other = pgtasks.App(db_dsn)

    for a in (app, other):

        @a.task(queue="rv_race", name="rv.member")
        async def member(n: int) -> int:
            started.append(n)
            await gate.wait()
            return n

        @a.task(queue="rv_race", name="rv.total")
        async def total(values: list[int]) -> int:
            callbacks.append(len(values))
            return sum(values)

    member_task = app.tasks["rv.member"]
    total_task = app.tasks["rv.total"]
    refs = [
        await chord([member_task.s(1), member_task.s(2)], total_task.partial()).defer()
        for _ in range(10)
    ]
    try:
        async with (
            app.worker(queues=["rv_race"], concurrency=10, poll_interval=0.05),
            other.worker(queues=["rv_race"], concurrency=10, poll_interval=0.05),
        ):
            with anyio.fail_after(15):
                while len(started) < 20:
                    await anyio.sleep(0.05)
            gate.set()  # every member ends at once, on both workers
            for ref in refs:
                assert await ref.result(timeout=15) == 3
            await anyio.sleep(0.3)
    finally:
        await other.close()
    assert callbacks == [2] * 10  # each chord's callback exactly once
    rows = await conn.fetch("SELECT state, pending FROM pgtasks.workflows")
    assert {(r["state"], r["pending"]) for r in rows} == {("succeeded", 0)}


async def test_a_member_run_twice_after_its_lease_lapsed_counts_once(
    db_dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pgtasks.worker.leases.LeaseKeeper, "extend_due", lambda self: None)
    first, second = anyio.Event(), anyio.Event()
    runs: list[int] = []
    callbacks: list[list[int]] = []
    app = pgtasks.App(db_dsn, lease=1)  # the claim's lease (the task's is for extensions)
    other = pgtasks.App(db_dsn, lease=1)

    for a in (app, other):

        @a.task(queue="rv_lapse", name="rv.slow", lease=1)
        async def slow(n: int) -> int:
            runs.append(n)
            await (first if len(runs) == 1 else second).wait()
            return n

        @a.task(queue="rv_lapse", name="rv.sum")
        async def total(values: list[int]) -> int:
            callbacks.append(values)
            return sum(values)

    ref = await chord([app.tasks["rv.slow"].s(4)], app.tasks["rv.sum"].partial()).defer()
    try:
        async with app.worker(queues=["rv_lapse"], poll_interval=0.05) as one:
            events = Events(one)
            await events.until(lambda: len(runs) == 1)
            async with other.worker(queues=["rv_lapse"], poll_interval=0.05):
                with anyio.fail_after(10):
                    while len(runs) < 2:  # the lease lapsed: the other worker runs it too
                        await anyio.sleep(0.05)
                first.set()  # the first run ends: its claim is stale, its ack refused
                await anyio.sleep(0.2)
                second.set()
                assert await ref.result(timeout=15) == 4
                await anyio.sleep(0.3)
    finally:
        await other.close()
        await app.close()
    assert callbacks == [[4]]
    assert await conn.fetchval("SELECT pending FROM pgtasks.workflows WHERE id = $1", ref.id) == 0


async def test_a_failed_chain_step_retried_by_hand_does_not_resume_the_chain(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    ran: list[str] = []

    @app.task(queue="rv_dead", max_retries=0)
    async def flaky(label: str) -> str:
        ran.append(label)
        if ran.count(label) == 1:
            raise ValueError("first time")
        return label

    @app.task(queue="rv_dead")
    async def after(value: str) -> str:
        ran.append("after:" + value)
        return value

    ref = await chain(flaky.s("a"), after.partial()).defer()
    async with app.worker(queues=["rv_dead"], poll_interval=0.1) as worker:
        events = Events(worker)
        with pytest.raises(pgtasks.WorkflowFailed):
            await ref.result(timeout=15)
        (letter,) = await app.dead_letters.list()
        await app.dead_letters.retry([letter.id])
        await events.until(lambda: events.counts["succeeded"] == 1)
        await anyio.sleep(0.3)
    assert ran == ["a", "a"]  # the next step was never sent
    status = await ref.status()
    assert [s.state for s in status.steps] == ["failed", "pending"]
    assert status.state == "failed"


async def test_cancel_twice_and_against_the_end(app: pgtasks.App) -> None:
    @app.task(queue="rv_cancel")
    async def quick(n: int) -> int:
        return n

    @app.task(queue="rv_cancel")
    async def total(values: list[int]) -> int:
        return sum(values)

    parked = await chord((quick.s(i) for i in range(3)), total.partial()).defer()
    first, again = await parked.cancel(), await parked.cancel()
    assert (first, again) == (3, 0)
    outcomes: list[str] = []
    async with app.worker(queues=["rv_cancel"], concurrency=20, poll_interval=0.02):
        for round_ in range(10):  # the cancels come later and later into the chord's run
            ref = await chord((quick.s(i) for i in range(4)), total.partial()).defer()
            await anyio.sleep(0.01 * round_)
            counts: list[int] = []
            async with anyio.create_task_group() as tg:

                async def cancel(ref: Any = ref, counts: list[int] = counts) -> None:
                    counts.append(await ref.cancel())

                tg.start_soon(cancel)
                tg.start_soon(cancel)
            try:
                assert await ref.result(timeout=15) == 6
                outcomes.append("succeeded")
            except pgtasks.JobCancelled:
                outcomes.append("cancelled")
            status = await ref.status()
            with anyio.fail_after(10):  # a member asked to stop ends soon after
                while "sent" in {s.state for s in status.steps}:
                    await anyio.sleep(0.05)
                    status = await ref.status()
            assert status.final
            assert 0 in counts  # the second cancel found nothing more to do
            if status.state == "succeeded":
                assert counts == [0, 0]
                assert [s.state for s in status.steps] == ["succeeded"] * 5
            # else the cancel committed first: it decided, even if a running step (the
            # callback, say) was asked to stop too late and still succeeded
    assert set(outcomes) <= {"succeeded", "cancelled"}


async def test_a_group_of_ten_thousand(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    @app.task(queue="rv_big")
    async def noop(n: int) -> int:
        return n

    @app.task(queue="rv_big")
    async def count(values: list[int]) -> int:
        return len(values)

    started = time.monotonic()
    ref = await chord((noop.s(i) for i in range(10_000)), count.partial()).defer()
    took = time.monotonic() - started
    assert took < 20, f"deferring 10,000 members took {took:.1f}s"
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_rv_big") == 10_000
    async with app.worker(queues=["rv_big"], concurrency=200, poll_interval=0.1):
        assert await ref.result(timeout=120) == 10_000


async def test_a_handle_of_the_wrong_kind_says_so(app: pgtasks.App) -> None:
    @app.task(queue="rv_kind")
    async def one(n: int) -> int:
        return n

    grouped = await group(one.s(1), one.s(2)).defer()
    job = await one.defer(3)
    async with app.worker(queues=["rv_kind"], poll_interval=0.1):
        assert await grouped.result(timeout=15) == [1, 2]
        await job.result(timeout=15)
    wrong = app.workflow(grouped.id, "chain")
    with pytest.raises(ValueError, match=f"workflow {grouped.id} is a group, not a chain"):
        await wrong.result(timeout=5)
    with pytest.raises(ValueError, match="is a group, not a chain"):
        await wrong.status()
    with pytest.raises(pgtasks.JobNotFound):
        await app.workflow(job.id + 1000, "group").result(timeout=5)
    for bad_id in (2**70, 0, True, "1"):
        with pytest.raises(ValueError, match="a workflow's id is a positive 64-bit integer"):
            app.workflow(bad_id, "chain")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a workflow's kind is 'chain', 'group' or 'chord'"):
        app.workflow(grouped.id, "pipeline")  # type: ignore[arg-type]


async def test_waiting_on_a_workflow_when_the_app_is_closed(app: pgtasks.App) -> None:
    @app.task(queue="rv_closed")
    async def one(n: int) -> int:
        return n

    ref = await chain(one.s(1), one.partial()).defer()
    waited: list[BaseException] = []

    async def wait() -> None:
        try:
            await ref.result(timeout=10)
        except pgtasks.PgTasksError as exc:
            waited.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.3)
            await app.close()  # a waiter must not hang on a closed app
    assert waited, "the waiter did not end when the app closed"
    assert isinstance(waited[0], pgtasks.AppClosed)
    assert f"the app was closed while this coroutine waited for workflow {ref.id}" in str(waited[0])


async def test_hostile_text_in_a_step_error_is_one_line_in_workflow_show(
    app: pgtasks.App, capsys: pytest.CaptureFixture[str]
) -> None:
    @app.task(queue="rv_show", max_retries=0)
    async def evil(n: int) -> int:
        raise ValueError("\x1b[2J\x1b[31mpwned\r\nfake line\x00 \udcff" + "x" * 5_000)

    ref = await chain(evil.s(1), evil.partial()).defer()
    async with app.worker(queues=["rv_show"], poll_interval=0.1):
        with pytest.raises(pgtasks.WorkflowFailed):
            await ref.result(timeout=15)
    capsys.readouterr()
    assert await show(app, argparse.Namespace(id=ref.id, json=False)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\r" not in out
    assert "fake line" not in out  # the error is cut at its first line
    lines = out.splitlines()
    assert len(lines) == 2 + 1 + 1 + 2  # title, times, error, header, two steps
    assert all(len(line) < 700 for line in lines)


@pytest.mark.parametrize(
    "place", ['{"id": 1, "step": 1099511627776}', '{"id": 1180591620717411303424, "step": 0}']
)
async def test_a_workflow_header_beyond_the_databases_integers_does_not_loop(
    app: pgtasks.App, conn: asyncpg.Connection, place: str
) -> None:
    # A message sent by hand (the outbox case) with a workflow header whose numbers do not
    # fit the columns: the step's end must not make the acknowledgement fail for ever.
    runs: list[int] = []

    @app.task(queue="rv_forged", max_retries=1)
    async def plain(n: int) -> int:
        runs.append(n)
        return n

    await conn.execute("SELECT pgmq.create('rv_forged')")
    await conn.execute(
        "SELECT pgmq.send('rv_forged', $1::jsonb, $2::jsonb)",
        orjson.dumps({"v": 1, "task": plain.name, "args": [1], "kwargs": {}}).decode(),
        f'{{"x-pgtasks-workflow": {place}}}',
    )
    async with app.worker(queues=["rv_forged"], poll_interval=0.05) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] == 1, timeout=10)
        await anyio.sleep(0.5)
    assert runs == [1]
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_rv_forged") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_rv_forged") == 1


async def test_a_later_step_to_a_queue_that_does_not_exist(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    # With queue creation off, a chain whose second step goes to a queue that does not
    # exist: the hand-off cannot be sent. Refused when deferred, as a job would be; and a
    # queue dropped after the defer fails the workflow at that step, without making the
    # step before it run again and again.
    runs: list[int] = []

    @app.task(queue="rv_here", max_retries=2)
    async def first(n: int) -> int:
        runs.append(n)
        return n

    @app.task(queue="rv_here")
    async def second(n: int) -> int:
        return n

    @app.task(queue="rv_here")
    async def alarm(failed: dict[str, Any], error: dict[str, Any]) -> None:
        pass

    @app.task(queue="rv_here", max_retries=0)
    async def broken(n: int) -> int:
        raise ValueError("broken")

    await conn.execute("SELECT pgtasks.ensure_queue('rv_here')")
    await conn.execute("SELECT pgtasks.ensure_queue('rv_gone')")
    await conn.execute("UPDATE pgtasks.settings SET create_queues = false")
    nowhere = chain(first.s(1), second.options(queue="rv_nowhere").partial())
    with pytest.raises(pgtasks.QueueNotFound, match="rv_nowhere"):
        await nowhere.defer()
    with pytest.raises(pgtasks.QueueNotFound, match="rv_nowhere"):
        await chain(first.s(1), on_error=alarm.options(queue="rv_nowhere")).defer()
    ref = await chain(first.s(2), second.options(queue="rv_gone").partial()).defer()
    alarmed = await chain(broken.s(3), on_error=alarm.options(queue="rv_gone")).defer()
    await conn.execute("SELECT pgmq.drop_queue('rv_gone')")
    async with app.worker(queues=["rv_here"], poll_interval=0.05):
        with pytest.raises(pgtasks.WorkflowFailed, match="rv_gone") as failed:
            await ref.result(timeout=15)
        with pytest.raises(pgtasks.WorkflowFailed, match="broken") as unreported:
            await alarmed.result(timeout=15)
        await anyio.sleep(0.3)
    assert runs == [2]
    assert failed.value.step == 1
    assert failed.value.error["outcome"] == "not sent"
    assert "'rv_gone' does not exist" in str(unreported.value.error["on_error"])
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_rv_here") == 1


async def test_cancel_a_group_of_ten_thousand(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    @app.task(queue="rv_bigstop")
    async def noop(n: int) -> int:
        return n

    ref = await group(noop.s(i) for i in range(10_000)).defer()
    started = time.monotonic()
    assert await ref.cancel() == 10_000
    took = time.monotonic() - started
    assert took < 30, f"cancelling 10,000 members took {took:.1f}s"
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_rv_bigstop") == 0
    with pytest.raises(pgtasks.JobCancelled):
        await ref.result(timeout=5)


async def test_a_step_in_a_queue_no_worker_serves_waits_there(app: pgtasks.App) -> None:
    @app.task(queue="rv_front")
    async def front(n: int) -> int:
        return n + 1

    @app.task(queue="rv_back")
    async def back(n: int) -> int:
        return n * 10

    ref = await chain(front.s(1), back.partial()).defer()
    async with app.worker(queues=["rv_front"], poll_interval=0.05):
        with pytest.raises(TimeoutError):
            await ref.result(timeout=1.5)
    status = await ref.status()
    assert (status.state, status.step) == ("running", 1)
    assert [(s.state, s.queue) for s in status.steps] == [
        ("succeeded", "rv_front"),
        ("sent", "rv_back"),
    ]
    async with app.worker(queues=["rv_back"], poll_interval=0.05):
        assert await ref.result(timeout=15) == 20
