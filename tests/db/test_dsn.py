"""Where the DSN comes from, how it is shown, and what a connection failure says."""

from __future__ import annotations

import socket
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pgtasks
from pgtasks import ConfigurationError, DatabaseUnavailable
from pgtasks.db import embedded
from pgtasks.db.connect import connect, describe, resolve_dsn

from ..conftest import with_database

ENV_VARS = ("PGTASKS_DSN", "DATABASE_URL")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def unused_port() -> int:
    """A local TCP port nothing listens on (bound and released at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def with_user(dsn: str, user: str, password: str) -> str:
    """The same server and database, as another user with a password."""
    parts = urlsplit(dsn)
    host = parts.hostname or ""
    netloc = f"{quote(user)}:{quote(password)}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# --- resolution order ---------------------------------------------------------------------


def test_argument_wins_over_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PGTASKS_DSN", "postgresql://env/pgtasks")
    clean_env.setenv("DATABASE_URL", "postgresql://env/database_url")
    source = pgtasks.App("postgresql://arg/db").dsn_source
    assert (source.dsn, source.origin) == ("postgresql://arg/db", "argument")


def test_pgtasks_dsn_wins_over_database_url(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PGTASKS_DSN", "postgresql://env/pgtasks")
    clean_env.setenv("DATABASE_URL", "postgresql://env/database_url")
    source = pgtasks.App().dsn_source
    assert (source.dsn, source.origin) == ("postgresql://env/pgtasks", "PGTASKS_DSN")


def test_database_url_is_used_when_pgtasks_dsn_is_unset_or_empty(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("DATABASE_URL", "postgresql://env/database_url")
    assert resolve_dsn(None).origin == "DATABASE_URL"
    clean_env.setenv("PGTASKS_DSN", "")
    source = resolve_dsn(None)
    assert (source.dsn, source.origin) == ("postgresql://env/database_url", "DATABASE_URL")


def test_embedded_server_is_the_last_resort(clean_env: pytest.MonkeyPatch) -> None:
    source = pgtasks.App().dsn_source
    assert (source.dsn, source.origin) == (None, "embedded")
    assert resolve_dsn("").origin == "embedded"  # an empty argument counts as none


def test_no_dsn_and_no_embedded_server_says_what_to_do(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(embedded, "available", lambda: False)
    with pytest.raises(ConfigurationError) as info:
        resolve_dsn(None)
    message = str(info.value)
    assert "no database configured" in message
    assert "PGTASKS_DSN" in message
    assert "DATABASE_URL" in message
    assert "pgtasks[embedded]" in message


async def test_the_dsn_is_resolved_when_first_used(
    clean_env: pytest.MonkeyPatch, db_dsn: str
) -> None:
    app = pgtasks.App()
    clean_env.setenv("PGTASKS_DSN", db_dsn)
    try:
        assert await app.dsn() == db_dsn
        pool = await app.pool()
        assert await pool.fetchval("SELECT current_database()") == urlsplit(db_dsn).path[1:]
    finally:
        await app.close()


# --- describe -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://alice:s3cret@db.example.com:6543/shop", "alice@db.example.com:6543/shop"),
        ("postgres://bob@localhost/app", "bob@localhost:5432/app"),
        ("postgresql://db.example.com", "db.example.com:5432/<default database>"),
        ("postgresql://%61lice:p%40ss@h/d%62", "alice@h:5432/db"),
        ("postgresql:///app?host=/run/postgresql", "/run/postgresql (unix socket)/app"),
        ("postgresql://u:pw@/app?host=/tmp&password=pw", "u@/tmp (unix socket)/app"),
        ("postgresql://h/?dbname=app&user=carol&port=7000", "carol@h:7000/app"),
        ("postgresql://u:pw@h:notaport/app", "u@h:<bad port>/app"),
        ("mysql://u:pw@h/app", "<DSN that is not a postgresql:// URL>"),
        ("u:pw@h/app", "<DSN that is not a postgresql:// URL>"),
    ],
)
def test_describe_shows_user_host_port_and_database(dsn: str, shown: str) -> None:
    assert describe(dsn) == shown


@settings(max_examples=200, database=None)
@given(
    password=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1),
    in_query=st.booleans(),
)
def test_describe_never_shows_the_password(password: str, in_query: bool) -> None:
    quoted = quote(password, safe="")
    dsn = (
        f"postgresql://user@dbhost:5432/name?password={quoted}"
        if in_query
        else f"postgresql://user:{quoted}@dbhost:5432/name"
    )
    shown = describe(dsn)
    assert shown == "user@dbhost:5432/name"


# --- connection failures ------------------------------------------------------------------


def assert_names_the_server(message: str, dsn: str, database: str) -> None:
    assert message.startswith(f"cannot connect to PostgreSQL at {describe(dsn)}: ")
    assert f"/{database}" in message
    assert "\n" not in message


async def test_refused_port(clean_env: pytest.MonkeyPatch) -> None:
    port = unused_port()
    dsn = f"postgresql://someone:hunter2hunter2@127.0.0.1:{port}/appdb"
    app = pgtasks.App(dsn)
    with pytest.raises(DatabaseUnavailable) as info:
        await app.pool()
    message = str(info.value)
    assert f"someone@127.0.0.1:{port}/appdb" in message
    assert "connection refused" in message
    assert "hunter2" not in message
    assert_names_the_server(message, dsn, "appdb")


async def test_unknown_host() -> None:
    dsn = "postgresql://u:hunter2hunter2@no-such-host.invalid:5999/appdb"
    with pytest.raises(DatabaseUnavailable) as info:
        await connect(dsn)
    message = str(info.value)
    assert "u@no-such-host.invalid:5999/appdb" in message
    assert "host name not found" in message
    assert "hunter2" not in message


async def test_missing_database(server_dsn: str) -> None:
    dsn = with_database(server_dsn, "pgtasks_no_such_database")
    with pytest.raises(DatabaseUnavailable) as info:
        await pgtasks.App(dsn).pool()
    message = str(info.value)
    assert_names_the_server(message, dsn, "pgtasks_no_such_database")
    assert "the database does not exist" in message


async def test_bad_authentication(server_dsn: str) -> None:
    dsn = with_user(server_dsn, "pgtasks_no_such_role", "hunter2hunter2")
    with pytest.raises(DatabaseUnavailable) as info:
        await connect(dsn)
    message = str(info.value)
    assert_names_the_server(message, dsn, urlsplit(server_dsn).path.lstrip("/"))
    assert "pgtasks_no_such_role@" in message
    assert "authentication failed" in message
    assert "hunter2" not in message


async def test_defer_on_an_unreachable_database_raises_database_unavailable() -> None:
    port = unused_port()
    app = pgtasks.App(f"postgresql://root@127.0.0.1:{port}/appdb")

    @app.task
    async def job(x: int) -> None: ...

    with pytest.raises(DatabaseUnavailable, match=f"127.0.0.1:{port}/appdb.*connection refused"):
        await job.defer(1)
    with pytest.raises(DatabaseUnavailable, match="connection refused"):
        await app.defer_many([job.s(1), job.s(2)])
    await app.close()


async def test_defer_when_the_server_stops_accepting_connections_says_cannot_connect(
    server_dsn: str, db_dsn: str, conn: asyncpg.Connection
) -> None:
    # the pool exists, its connections die, and no new one can be opened: the error says
    # "cannot connect" with the cause, and that nothing was enqueued
    app = pgtasks.App(db_dsn, pool_min_size=1, pool_max_size=1)

    @app.task(queue="gone")
    async def job(x: int) -> None: ...

    database = urlsplit(db_dsn).path.lstrip("/")
    admin = await asyncpg.connect(server_dsn)  # not on the database it closes
    try:
        await job.defer(1)
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'pgtasks' AND datname = current_database()"
        )
        await anyio.sleep(0.5)  # the pool sees its connection closed
        with pytest.raises(DatabaseUnavailable) as info:
            await job.defer(2)
        message = str(info.value)
        assert message.startswith(f"deferring {job.name!r} to 'gone' failed: cannot connect to ")
        assert "nothing was enqueued" in message
        assert "lost the connection" not in message
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
        await app.close()
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_gone") == 1
