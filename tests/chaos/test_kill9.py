"""kill -9 a real worker process mid-job: nothing is lost, a transactional job's effect
happens exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import asyncpg
import pytest

import pgtasks

pytestmark = pytest.mark.chaos

TASKS = """
import os
import signal

import pgtasks

app = pgtasks.App()


@app.task(queue="chaos_tx", transactional=True, lease=2, max_retries=3)
async def pay(order: int) -> None:
    job = pgtasks.current_job()
    await job.connection.execute("INSERT INTO payments VALUES ($1)", order)
    if job.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # die after the body, before the commit
"""


def _worker(tmp_path: Path, dsn: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGTASKS_APP")}
    env.update(PGTASKS_DSN=dsn, PYTHONPATH=str(tmp_path))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgtasks",
            "worker",
            "--app",
            "chaostasks:app",
            "--poll-interval",
            "0.5",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def test_kill9_between_body_and_commit_runs_the_effect_once(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection
) -> None:
    (tmp_path / "chaostasks.py").write_text(textwrap.dedent(TASKS))
    await conn.execute("CREATE TABLE payments (order_id integer NOT NULL)")
    app = pgtasks.App(db_dsn)

    @app.task(queue="chaos_tx", name="chaostasks.pay")
    async def pay(order: int) -> None: ...

    try:
        ref = await pay.defer(42)
    finally:
        await app.close()

    first = _worker(tmp_path, db_dsn)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL, out
    assert await conn.fetchval("SELECT count(*) FROM payments") == 0  # rolled back

    second = _worker(tmp_path, db_dsn)
    try:
        started = time.monotonic()
        with anyio.fail_after(30):
            while await conn.fetchval("SELECT count(*) FROM pgmq.q_chaos_tx"):
                await anyio.sleep(0.1)
        recovery = time.monotonic() - started
    finally:
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=30)
    assert second.returncode == 0, out
    assert await conn.fetchval("SELECT count(*) FROM payments") == 1
    row = await conn.fetchrow("SELECT msg_id, read_ct FROM pgmq.a_chaos_tx")
    assert row is not None
    assert (row["msg_id"], row["read_ct"]) == (ref.id, 2)
    print(f"kill -9 recovery: the message came back and committed in {recovery:.2f}s")
