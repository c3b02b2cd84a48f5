"""``python -m pgtasks workflow show`` and a step's ``job show`` on a real database, run as a
user would."""

from __future__ import annotations

import json

import pgtasks
from pgtasks import chain, chord
from tests.acceptance.test_cli_dead import cli


async def test_workflow_show_and_a_steps_job_show(db_dsn: str) -> None:
    app = pgtasks.App(db_dsn)

    @app.task(queue="cli_wf", name="wf.add", max_retries=0)
    async def add(x: int, y: int) -> int:
        if x < 0:
            raise ValueError("negative\nnumbers")
        return x + y

    @app.task(queue="cli_wf", name="wf.total")
    async def total(values: list[int]) -> int:
        return sum(values)

    try:
        done = await chain(add.s(1, 2), add.partial(10), add.partial(100)).defer()
        broken = await chain(add.s(1, 1), add.si(-1, 0), add.si(5, 5)).defer()
        fanned = await chord((add.s(i, i) for i in range(3)), total.partial()).defer()
        await app.worker(burst=True).run()
        assert await done.result(timeout=10) == 113
        assert await fanned.result(timeout=10) == 6
        waiting = await chain(add.s(2, 2), add.partial(1)).defer()  # no worker runs it
        done_status, chord_status = await done.status(), await fanned.status()
    finally:
        await app.close()

    shown = cli(db_dsn, "workflow", "show", str(done.id))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"workflow {done.id}, a chain of 3 steps: succeeded"
    assert lines[1].startswith("  created ")
    assert ", ended " in lines[1]
    assert ", took " in lines[1]
    assert lines[2].split() == [
        "step", "task", "queue", "job", "state", "sent", "(UTC)", "finished", "(UTC)", "took"
    ]  # fmt: skip
    for line, step in zip(lines[3:], done_status.steps, strict=True):
        cells = line.split()
        assert cells[:5] == [str(step.step), add.name, "cli_wf", str(step.job_id), "succeeded"]
        assert cells[-1].endswith("s")
        assert float(cells[-1][:-1]) >= 0  # sent to finished

    failed = cli(db_dsn, "workflow", "show", str(broken.id))
    assert failed.returncode == 0, failed.stderr
    assert f"workflow {broken.id}, a chain of 3 steps: failed\n" in failed.stdout
    assert "  failed at step 1: ValueError: negative...\n" in failed.stdout
    states = [line.split()[4] for line in failed.stdout.splitlines()[4:]]
    assert states == ["succeeded", "failed", "pending"]

    pending = cli(db_dsn, "workflow", "show", str(waiting.id), "--json")
    assert pending.returncode == 0, pending.stderr
    detail = json.loads(pending.stdout)
    assert (detail["kind"], detail["state"], detail["step"]) == ("chain", "running", 0)
    assert [(s["state"], s["job_state"]) for s in detail["steps"]] == [
        ("sent", "waiting"),
        ("pending", None),
    ]
    text = cli(db_dsn, "workflow", "show", str(waiting.id))
    assert f"workflow {waiting.id}, a chain of 2 steps: running, at step 0\n" in text.stdout
    assert text.stdout.splitlines()[3].split()[4] == "waiting"  # the job's state, not "sent"

    callback = chord_status.steps[-1]
    assert callback.job_id is not None
    job = cli(db_dsn, "job", "show", "cli_wf", str(callback.job_id))
    assert job.returncode == 0, job.stderr
    assert (
        f"  workflow {fanned.id}, a chord of 4 steps: step 3 (the callback) "
        f"(pgtasks workflow show {fanned.id})\n"
    ) in job.stdout
    member = cli(db_dsn, "job", "show", "cli_wf", str(chord_status.steps[1].job_id), "--json")
    assert json.loads(member.stdout)["workflow"] == {
        "workflow": fanned.id,
        "kind": "chord",
        "step": 1,
        "steps": 4,
    }
    alone = cli(db_dsn, "job", "show", "cli_wf", str(chord_status.steps[0].job_id))
    assert "a chord of 4 steps: step 0 (pgtasks" in alone.stdout

    missing = cli(db_dsn, "workflow", "show", "99999")
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert (
        missing.stderr
        == "pgtasks: error: no workflow 99999 (never deferred, rolled back, or pruned)\n"
    )
