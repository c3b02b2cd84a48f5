"""Test fixtures: a real PostgreSQL with pgmq, a migrated template, a fresh database per test.

The server is ``PGTASKS_TEST_DSN`` when set, else the embedded one (the ``embedded`` extra),
started in a temporary directory and deleted at the end. Its data lives in a directory of its
own made with ``tempfile.mkdtemp`` (mode 0755), not under pytest's ``pytest-of-<user>``: pytest
resets that one to 0700 whenever a session starts, and a server that runs as another user
(under root, ``pgserver``) then stops with a PANIC in the middle of a concurrent run.

A template database is migrated once per session; every test that asks for ``db_dsn`` (or
``app``) gets its own clone of it, so tests are isolated and run in any order.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

import pgtasks
from pgtasks.db import embedded, schema


def with_database(dsn: str, database: str) -> str:
    """The same server DSN, pointed at another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-full",
        action="store_true",
        help="run the chaos scenarios at full size (minutes) instead of their short CI form",
    )
    parser.addoption(
        "--via-pgbouncer",
        choices=("session", "transaction"),
        help="send every test's database (db_dsn) through a real PgBouncer in this pool mode",
    )


@pytest.fixture(scope="session")
def chaos_full(request: pytest.FixtureRequest) -> bool:
    """Whether the chaos scenarios run at full size (``pytest -m chaos --chaos-full``)."""
    return bool(request.config.getoption("--chaos-full"))


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Run every ``async def test_*`` under anyio (asyncio), parametrized ones included: the
    marker must be on the function before anyio's own collection hook looks at it."""
    if (
        isinstance(collector, pytest.Module | pytest.Class)
        and collector.istestfunction(obj, name)
        and inspect.iscoroutinefunction(
            getattr(getattr(obj, "hypothesis", None), "inner_test", obj)
        )
    ):
        pytest.mark.anyio(obj)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def open_temp_dir(prefix: str) -> Path:
    """A new directory under the system temp dir that every user may enter (0755), for
    embedded servers: removed by the caller (`shutil.rmtree`)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """A DSN of the test server (its maintenance database)."""
    dsn = os.environ.get("PGTASKS_TEST_DSN")
    if dsn:
        yield dsn
        return
    base = open_temp_dir("pgtasks-test-server-")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = embedded._backend().get_server(base / "pgdata", cleanup_mode="delete")
        try:
            yield server.get_uri()
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                server.cleanup()
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _admin(server_dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_db(server_dsn: str) -> Iterator[str]:
    """Name of a database with pgmq and the pgtasks schema installed, used as a template."""
    name = f"pgtasks_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    async def create() -> None:
        await _admin(server_dsn, f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(with_database(server_dsn, name))
        try:
            await schema.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(create())
    yield name
    asyncio.run(_admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _clone(server_dsn: str, template: str | None) -> tuple[str, str]:
    name = f"pgtasks_t_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    asyncio.run(_admin(server_dsn, f'CREATE DATABASE "{name}"{clause}'))
    return name, with_database(server_dsn, name)


@pytest.fixture(scope="session")
def bouncer_port(request: pytest.FixtureRequest, server_dsn: str) -> Iterator[int | None]:
    """The port of the PgBouncer that ``--via-pgbouncer MODE`` puts in front of every
    test's database, or None."""
    mode = request.config.getoption("--via-pgbouncer")
    if mode is None:
        yield None
        return
    from tests.pgbouncer import Bouncers

    bouncers = Bouncers(server_dsn)
    try:
        yield bouncers.port(mode)
    finally:
        bouncers.stop()


@pytest.fixture
def db_dsn(server_dsn: str, template_db: str, bouncer_port: int | None) -> Iterator[str]:
    """DSN of a fresh, migrated database of this test's own (through a PgBouncer with
    ``--via-pgbouncer``)."""
    name, dsn = _clone(server_dsn, template_db)
    if bouncer_port is not None:
        from tests.pgbouncer import via

        dsn = via(dsn, bouncer_port)
    yield dsn
    asyncio.run(_admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def empty_db_dsn(server_dsn: str) -> Iterator[str]:
    """DSN of a fresh database with nothing installed (for migration tests)."""
    name, dsn = _clone(server_dsn, None)
    yield dsn
    asyncio.run(_admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def app(db_dsn: str) -> AsyncIterator[pgtasks.App]:
    """An App on this test's database; its pool is closed after the test."""
    application = pgtasks.App(db_dsn)
    try:
        yield application
    finally:
        await application.close()


@pytest.fixture
async def conn(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to this test's database, for checking what is in it."""
    connection = await asyncpg.connect(db_dsn)
    try:
        yield connection
    finally:
        await connection.close()
