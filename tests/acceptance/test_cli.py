"""The real command line in a subprocess: help, version, the common options before or after
the command, migrate (and --sql, --json), --app loading, status, and the one-line errors for a
bad database, a bad app, a bad log level and a database that was never migrated."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncpg
import pytest

import pgtasks
from pgtasks.db import schema

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


APPLIED = re.compile(r"pgtasks: \d+ step\(s\) applied\n")


# --- help and version ---------------------------------------------------------------------

COMMANDS = {
    # command: options its --help must describe
    ("worker",): ["--queues", "--concurrency", "--shutdown-timeout", "--connect-timeout",
                  "--burst", "--no-listen", "--poll-interval", "--log-jobs", "--no-log-jobs"],
    ("migrate",): ["--sql", "--json"],
    ("status",): ["--json"],
    ("doctor",): ["--horizon-age", "--json"],
    ("prune",): ["--errors-older-than", "--archive-older-than", "--json"],
    ("dead", "list"): ["--queue", "--task", "--limit", "--json"],
    ("dead", "show"): ["--json"],
    ("dead", "retry"): ["--all", "--queue", "--json"],
    ("dead", "purge"): ["--older-than", "--queue", "--yes"],
}  # fmt: skip


def test_help_lists_the_commands() -> None:
    result = pgtasks_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("worker", "migrate", "status", "prune", "dead"):
        assert re.search(rf"^    {command} +\w", result.stdout, re.M), result.stdout
    assert "docs: https://" in result.stdout
    assert "python -m pgtasks -A myproj.tasks:app worker" in result.stdout


@pytest.mark.parametrize("command", list(COMMANDS), ids=" ".join)
def test_every_command_has_help_with_defaults_an_example_and_the_docs(
    command: tuple[str, ...],
) -> None:
    result = pgtasks_cli(*command, "--help", COLUMNS="200")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for option in ["--app", "-A", "--dsn", "--log-level", *COMMANDS[command]]:
        assert re.search(rf"(^|[\s,]){re.escape(option)}\b", text), (option, text)
    assert "default: $PGTASKS_APP" in text
    assert "\nexample:\n  python -m pgtasks " + " ".join(command) in text
    assert f"docs: https://pgtasks.readthedocs.io/en/latest/cli/#{command[0]}" in text


def test_worker_help_gives_the_defaults_and_the_grace_period_rule() -> None:
    text = " ".join(pgtasks_cli("worker", "--help", COLUMNS="200").stdout.split())
    for default in ("(default: 10)", "(default: 20)", "(default: 60)", "(default: on)"):
        assert default in text
    assert "terminationGracePeriodSeconds to at least --shutdown-timeout + 10" in text


def test_dead_purge_help_says_it_deletes_everything_without_older_than() -> None:
    text = " ".join(pgtasks_cli("dead", "purge", "--help").stdout.split())
    assert "Without --older-than it deletes every dead letter" in text
    assert "refuses without --yes" in text


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
    assert APPLIED.fullmatch(first.stdout)
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
    assert "SELECT pgtasks.ensure_queue('cli_mail');" in script
    assert "SELECT pgtasks.ensure_queue('cli_reports');" in script
    assert script.endswith("COMMIT;\n")
    assert await installed(empty_db_dsn) == (False, [])


def test_migrate_sql_on_an_up_to_date_database(db_dsn: str) -> None:
    result = pgtasks_cli("migrate", "--sql", "--dsn", db_dsn)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "-- pgtasks: nothing to do, the database is up to date\n"


async def test_migrate_json(empty_db_dsn: str, project: Path) -> None:
    app = ("--app", "cliproject_tasks:app", "--dsn", empty_db_dsn)
    planned = pgtasks_cli("migrate", "--sql", "--json", *app, pythonpath=project)
    assert planned.returncode == 0, planned.stderr
    steps = json.loads(planned.stdout)["steps"]
    assert steps[-1] == {
        "description": "create queue cli_reports",
        "sql": "SELECT pgtasks.ensure_queue('cli_reports');",
    }
    applied = pgtasks_cli("migrate", "--json", *app, pythonpath=project)
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["steps"] == [{"description": s["description"]} for s in steps]
    again = pgtasks_cli("migrate", "--json", *app, pythonpath=project)
    assert json.loads(again.stdout) == {"steps": []}


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
    assert row[:6] == ["cli_status", "1", "1", "0", "0", "0"]  # waiting, scheduled, ..., dead
    assert "workers: none alive" in result.stdout

    as_json = pgtasks_cli("status", "--json", "--dsn", db_dsn)
    assert as_json.returncode == 0, as_json.stderr
    status = json.loads(as_json.stdout)
    assert status["dead_letters"] == 0
    [queue] = [q for q in status["queues"] if q["queue"] == "cli_status"]
    assert (queue["waiting"], queue["scheduled"]) == (1, 1)
    assert queue["oldest_waiting_seconds"] >= 0


# --- the common options -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["-A", "cliproject_tasks:app", "--dsn", "{dsn}", "migrate"],
        ["migrate", "-A", "cliproject_tasks:app", "--dsn", "{dsn}"],
        ["--app", "cliproject_tasks:app", "migrate", "--dsn", "{dsn}"],
        ["-A", "nothing_here:app", "migrate", "-A", "cliproject_tasks:app", "--dsn", "{dsn}"],
    ],
    ids=["before", "after", "split", "after-wins"],
)
async def test_common_options_go_before_or_after_the_command(
    args: list[str], empty_db_dsn: str, project: Path
) -> None:
    argv = [a.replace("{dsn}", empty_db_dsn) for a in args]
    result = pgtasks_cli(*argv, pythonpath=project)
    assert result.returncode == 0, result.stderr
    assert await installed(empty_db_dsn) == (True, ["cli_mail", "cli_reports"])


def test_dead_actions_take_the_common_options_anywhere(db_dsn: str) -> None:
    for argv in (
        ["--dsn", db_dsn, "dead", "list"],
        ["dead", "--dsn", db_dsn, "list"],
        ["dead", "list", "--dsn", db_dsn],
    ):
        result = pgtasks_cli(*argv)
        assert result.returncode == 0, (argv, result.stderr)
        assert result.stdout.startswith("id  queue")


@pytest.mark.parametrize("level", ["debug", "Info", "WARNING"])
def test_log_level_in_any_case(level: str, db_dsn: str) -> None:
    result = pgtasks_cli("--log-level", level, "status", "--dsn", db_dsn)
    assert result.returncode == 0, result.stderr
    if level != "WARNING":  # the pool's INFO line
        assert "INFO pgtasks: using PostgreSQL at" in result.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_unknown_log_level_is_a_usage_error(where: str) -> None:
    args = ["--log-level", "verbose"]
    result = pgtasks_cli(*([*args, "status"] if where == "before" else ["status", *args]))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "argument --log-level: invalid choice: 'VERBOSE'" in result.stderr
    assert "'DEBUG', 'INFO', 'WARNING', 'ERROR'" in result.stderr


# --- a database that was never migrated, or not since an upgrade ------------------------

NOT_MIGRATED = (
    "pgtasks: error: the database has no pgtasks schema; run 'python -m pgtasks migrate --app ...'"
)


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--json"],
        ["prune"],
        ["dead", "list"],
        ["dead", "show", "1"],
        ["dead", "retry", "1"],
        ["dead", "retry", "--all"],
        ["dead", "purge", "--yes"],
        ["worker", "-A", "cliproject_tasks:app", "--burst"],
    ],
    ids=" ".join,
)
def test_a_database_never_migrated_is_one_line_naming_migrate(
    command: list[str], empty_db_dsn: str, project: Path
) -> None:
    result = pgtasks_cli(*command, "--dsn", empty_db_dsn, pythonpath=project)
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == NOT_MIGRATED
    if command[0] != "worker":  # the worker logs its database at INFO first
        assert result.stderr == NOT_MIGRATED + "\n"
    assert "Traceback" not in result.stderr


async def test_a_database_missing_a_newer_migration_is_out_of_date(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        *_, previous, latest = (m.version for m in schema.migrations())
        await conn.execute("DELETE FROM pgtasks.migrations WHERE version = $1", latest)
    finally:
        await conn.close()
    result = pgtasks_cli("status", "--dsn", db_dsn)
    assert_one_error_line(
        result,
        f"the database's pgtasks schema is out of date (migration {previous}, this "
        f"pgtasks needs {latest}); run 'python -m pgtasks migrate --app ...'",
    )


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
        ("cliproject_tasks:missing", ["module 'cliproject_tasks' has no attribute 'missing'"]),
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


def test_an_error_inside_task_groups_is_reported_as_itself() -> None:
    """anyio's task groups wrap even a single error in an exception group; the CLI reports
    the error inside (one line), not a traceback of the group."""
    from pgtasks.cli import _only_error

    class Group(Exception):
        def __init__(self, *exceptions: BaseException) -> None:
            super().__init__("group")
            self.exceptions = exceptions

    inner = pgtasks.PermissionDenied("nope")
    assert _only_error(Group(Group(inner))) is inner
    two = Group(inner, ValueError())
    assert _only_error(two) is two
    assert _only_error(inner) is inner


# --- options out of range ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--poll-interval", "0"], "argument --poll-interval: '0' is not a number of seconds "
         "from 0.01 to 3,600"),
        (["--poll-interval", "-1"], "argument --poll-interval: '-1' is not a number"),
        (["--shutdown-timeout", "inf"], "argument --shutdown-timeout: 'inf' is not a number"),
        (["-c", "0"], "argument -c/--concurrency: '0' is not a whole number from 1 to 100,000"),
        (["-q", "Email"], "argument -q/--queues: invalid queue name 'Email'"),
    ],
)  # fmt: skip
def test_a_worker_flag_out_of_range_is_a_usage_error(argv: list[str], says: str) -> None:
    result = pgtasks_cli("worker", "-A", "tasks:app", *argv)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"pgtasks worker: error: {says}")


def test_an_app_option_out_of_range_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "badapp.py").write_text(
        "import pgtasks\napp = pgtasks.App('postgresql://x@127.0.0.1:1/x', max_retries=-1)\n"
    )
    result = pgtasks_cli("worker", "-A", "badapp:app", pythonpath=tmp_path)
    assert_one_error_line(
        result, "App: max_retries must be a whole number from 0 to 10,000 (got -1)"
    )
