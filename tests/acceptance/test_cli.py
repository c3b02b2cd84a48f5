"""The real command line in a subprocess: help, version, migrate (and --sql), --app loading,
and the one-line errors for a bad database or a bad app."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncpg
import pytest

import pgtasks
from pgtasks import schema

from ..conftest import with_database

APP_MODULE = """
import pgtasks

app = pgtasks.App()

@app.task(queue="cli_mail")
async def send(to: str) -> None: ...

@app.task(queue="cli_reports")
async def report(day: str) -> None: ...

not_an_app = 42
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory with a small app module, put on PYTHONPATH by `pgtasks_cli`."""
    (tmp_path / "cliproject_tasks.py").write_text(textwrap.dedent(APP_MODULE))
    return tmp_path


def pgtasks_cli(
    *args: str, pythonpath: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PGTASKS_DSN", "DATABASE_URL", "PGTASKS_APP", "PYTHONPATH")
    }
    if pythonpath is not None:
        environment["PYTHONPATH"] = str(pythonpath)
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pgtasks", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pgtasks: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


async def installed(dsn: str) -> tuple[bool, list[str]]:
    """Whether the pgtasks schema exists, and the pgmq queues."""
    conn = await asyncpg.connect(dsn)
    try:
        has_schema = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgtasks')"
        )
        queues = []
        if await conn.fetchval("SELECT to_regclass('pgmq.meta') IS NOT NULL"):
            queues = [r[0] for r in await conn.fetch("SELECT queue_name FROM pgmq.meta ORDER BY 1")]
        return bool(has_schema), queues
    finally:
        await conn.close()


# --- help and version ---------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    result = pgtasks_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("worker", "migrate", "status", "prune"):
        assert command in result.stdout
    migrate_help = pgtasks_cli("migrate", "--help")
    assert migrate_help.returncode == 0
    for option in ("--sql", "--dsn", "--app"):
        assert option in migrate_help.stdout


def test_version() -> None:
    result = pgtasks_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"pgtasks {pgtasks.__version__}"


def test_no_command_is_a_usage_error() -> None:
    result = pgtasks_cli()
    assert result.returncode == 2
    assert "usage: pgtasks" in result.stderr


# --- migrate ------------------------------------------------------------------------------


async def test_migrate_installs_and_then_is_up_to_date(empty_db_dsn: str) -> None:
    first = pgtasks_cli("migrate", "--dsn", empty_db_dsn)
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"pgtasks: {2 + len(schema.migrations())} step(s) applied\n"
    assert first.stderr == ""
    assert await installed(empty_db_dsn) == (True, [])

    again = pgtasks_cli("migrate", "--dsn", empty_db_dsn)
    assert again.returncode == 0, again.stderr
    assert again.stdout == "pgtasks: up to date\n"


async def test_migrate_takes_the_dsn_from_the_environment(empty_db_dsn: str) -> None:
    result = pgtasks_cli("migrate", PGTASKS_DSN=empty_db_dsn)
    assert result.returncode == 0, result.stderr
    assert await installed(empty_db_dsn) == (True, [])


async def test_migrate_sql_prints_the_script_and_changes_nothing(
    empty_db_dsn: str, project: Path
) -> None:
    result = pgtasks_cli(
        "migrate", "--sql", "--app", "cliproject_tasks:app", "--dsn", empty_db_dsn,
        pythonpath=project,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert script.startswith(f"BEGIN;\nSELECT pg_advisory_xact_lock({schema.MIGRATION_LOCK});")
    assert "\n-- install pgmq" in script
    assert "\n-- create the pgtasks schema\n" in script
    assert "CREATE TABLE pgtasks.idempotency_keys" in script
    assert "SELECT pgmq.create('cli_mail');" in script
    assert "SELECT pgmq.create('cli_reports');" in script
    assert script.endswith("COMMIT;\n")
    assert await installed(empty_db_dsn) == (False, [])


def test_migrate_sql_on_an_up_to_date_database(db_dsn: str) -> None:
    result = pgtasks_cli("migrate", "--sql", "--dsn", db_dsn)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "-- pgtasks: nothing to do, the database is up to date\n"


async def test_app_option_creates_that_apps_queues(empty_db_dsn: str, project: Path) -> None:
    result = pgtasks_cli(
        "migrate", "--app", "cliproject_tasks:app", "--dsn", empty_db_dsn, pythonpath=project
    )
    assert result.returncode == 0, result.stderr
    assert await installed(empty_db_dsn) == (True, ["cli_mail", "cli_reports"])


async def test_app_from_the_environment(db_dsn: str, project: Path) -> None:
    result = pgtasks_cli(
        "migrate", pythonpath=project, PGTASKS_APP="cliproject_tasks:app", PGTASKS_DSN=db_dsn
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "pgtasks: 2 step(s) applied\n"
    assert await installed(db_dsn) == (True, ["cli_mail", "cli_reports"])


async def test_status_shows_queue_depths(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("SELECT pgtasks.defer('cli_status', 'x.y', '{}')")
        await conn.execute("SELECT pgtasks.defer('cli_status', 'x.y', '{}', 3600)")
    finally:
        await conn.close()
    result = pgtasks_cli("status", "--dsn", db_dsn)
    assert result.returncode == 0, result.stderr
    [row] = [line.split() for line in result.stdout.splitlines() if line.startswith("cli_status")]
    assert row[:3] == ["cli_status", "2", "1"]  # waiting, of which visible
    assert "dead letters: 0" in result.stdout


# --- errors -------------------------------------------------------------------------------


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize("command", ["migrate", "status", "prune"])
def test_unreachable_database_is_one_clear_line(command: str) -> None:
    port = unused_port()
    result = pgtasks_cli(command, "--dsn", f"postgresql://someone:hunter2@127.0.0.1:{port}/appdb")
    line = assert_one_error_line(result, f"someone@127.0.0.1:{port}/appdb", "connection refused")
    assert "hunter2" not in line


def test_missing_database_is_one_clear_line(server_dsn: str) -> None:
    result = pgtasks_cli("migrate", "--dsn", with_database(server_dsn, "pgtasks_cli_nowhere"))
    assert_one_error_line(result, "/pgtasks_cli_nowhere", "the database does not exist")


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("cliproject_no_such_module:app", ["cannot import 'cliproject_no_such_module'"]),
        ("cliproject_tasks:missing", ["cliproject_tasks.missing is NoneType, not a pgtasks.App"]),
        ("cliproject_tasks:not_an_app", ["cliproject_tasks.not_an_app is int, not a pgtasks.App"]),
        ("cliproject_tasks", ["--app must look like 'package.module:app'"]),
        (":app", ["--app must look like 'package.module:app'"]),
    ],
)
def test_bad_app_is_one_clear_line(spec: str, fragments: list[str], project: Path) -> None:
    # the app is loaded before any connection: a database that is not there is never reached
    dsn = f"postgresql://root@127.0.0.1:{unused_port()}/appdb"
    result = pgtasks_cli("migrate", "--app", spec, "--dsn", dsn, pythonpath=project)
    assert_one_error_line(result, repr(spec), *fragments)
