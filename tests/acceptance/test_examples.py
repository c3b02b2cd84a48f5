"""The examples run as documented: the quickstart (on a given server and on the embedded
one) and the FastAPI app with its lifespan worker."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from ..conftest import open_temp_dir

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PGTASKS_DSN", "DATABASE_URL", "PGTASKS_APP", "PGTASKS_DATA_DIR")
    }
    env.update(extra)
    return env


def test_quickstart_runs_against_a_server(db_dsn: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        cwd=tmp_path,
        env=_env(PGTASKS_DSN=db_dsn),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done: 5 succeeded, 1 retried, 0 dead-lettered" in result.stdout


def test_quickstart_runs_on_the_embedded_server() -> None:
    """No DSN anywhere: the quickstart starts the embedded server in ./.pgtasks/pgdata (in a
    directory of its own: see tests/conftest.py on ``pytest-of-<user>``)."""
    project = open_temp_dir("pgtasks-test-quickstart-")
    try:
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "quickstart.py")],
            cwd=project,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "done: 5 succeeded" in result.stdout
        assert (project / ".pgtasks" / "pgdata" / "PG_VERSION").exists()
        pid_file = project / ".pgtasks" / "pgdata" / "postmaster.pid"
        assert not pid_file.exists(), "the embedded server should stop when the process exits"
    finally:
        shutil.rmtree(project, ignore_errors=True)


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_fastapi_example_runs_a_deferred_job(
    db_dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGTASKS_DSN", db_dsn)
    example = _load(EXAMPLES / "fastapi_app.py")
    done = asyncio.Event()
    async with LifespanManager(example.api) as manager:
        worker = manager._state["pgtasks_worker"]
        worker.subscribe(lambda e: done.set() if e.kind == "succeeded" else None)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/signup", params={"email": "ada@example.com"})
        assert response.status_code == 200
        job_id = response.json()["job"]
        await asyncio.wait_for(done.wait(), timeout=10)
    archived = await conn.fetchval(
        "SELECT message->'kwargs'->>'email' FROM pgmq.a_signups WHERE msg_id = $1", job_id
    )
    assert archived == "ada@example.com"


# --- synchronous code: Django and Flask --------------------------------------------------------


def test_django_example_passes_its_own_tests(db_dsn: str) -> None:
    """``python manage.py test``, as a user runs it: Django creates its test database,
    migrates it (pgtasks' schema comes with a migration), and runs the shop's tests: an
    order and its job commit together or roll back together, and a worker confirms it."""
    result = subprocess.run(
        [sys.executable, "manage.py", "test", "--noinput", "-v", "2"],
        cwd=EXAMPLES / "django_app",
        env=_env(DATABASE_URL=db_dsn),
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Applying shop.0002_pgtasks... OK" in output
    assert "Ran 3 tests" in output
    assert "\nOK" in output


async def test_flask_example_defers_in_its_transaction(
    db_dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGTASKS_DSN", db_dsn)
    example = _load(EXAMPLES / "flask_app.py")
    client = example.app.test_client()
    try:

        def post(path: str, **form: str) -> tuple[int, dict[str, Any]]:
            response = client.post(path, data=form)
            return response.status_code, response.get_json()

        status, body = await asyncio.to_thread(post, "/signup", email="ada@example.com")
        assert status == 201, body
        again, _ = await asyncio.to_thread(post, "/signup", email="ada@example.com")
        assert again == 409  # the user exists: the second transaction rolled back, job too
        assert await conn.fetchval("SELECT count(*) FROM pgmq.q_flask_email") == 1
        report_status, report = await asyncio.to_thread(post, "/reports", kind="users")
        assert report_status == 202
        async with example.tasks.worker(poll_interval=0.1):
            ref = example.tasks.job("flask_reports", int(report["job"]))
            assert await ref.result(timeout=20) == 1
            welcome = example.tasks.job("flask_email", int(body["job"]))
            with anyio.fail_after(20):
                while (await welcome.status()).state != "succeeded":
                    await anyio.sleep(0.05)
        welcomed = await conn.fetchval(
            "SELECT welcomed FROM flask_users WHERE id = $1", body["user"]
        )
        assert welcomed is True
    finally:
        await asyncio.to_thread(example.tasks.close_sync)
        await example.tasks.close()
        example.engine.dispose()
