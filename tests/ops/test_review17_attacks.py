"""Attacks on the operations surface (issue 17's review), against a real database: forged,
cookie-less and cross-site posts on every action, GET on the actions, basic auth under a
mount prefix, hostile text in every place a page shows it, huge pages, abusive query
parameters, a read-only dashboard asked to act, ``pgtasks status`` with hostile worker text,
a metrics scrape while the database does not answer, the task label of unknown tasks, and a
malformed trace context in a message."""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

import pgtasks
from pgtasks.admin import schedules as admin_schedules
from pgtasks.admin import status as admin_status
from pgtasks.cli.status import render
from pgtasks.dashboard import dashboard
from pgtasks.dashboard.security import CSRF_COOKIE
from pgtasks.dashboard.server import build
from pgtasks.integrations.opentelemetry import instrument
from pgtasks.integrations.prometheus import UNKNOWN_TASK, Metrics
from tests.ops.test_dashboard import client, dead_letter, jobs_to_cancel, schedules_declared
from tests.ops.test_status import cli

XSS = "<img src=x onerror=alert(1)>"
ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"


async def token(http: httpx.AsyncClient, path: str = "/") -> str:
    page = await http.get(path)
    assert page.status_code == 200
    return page.cookies.get(CSRF_COOKIE) or http.cookies[CSRF_COOKIE]


async def actions(app: pgtasks.App) -> list[tuple[str, dict[str, Any]]]:
    """One post of each action route, each of which would change something if accepted."""
    dead_id = await dead_letter(app)
    infos = await schedules_declared(app)
    [name] = infos
    _, scheduled = await jobs_to_cancel(app)
    return [
        ("/dead/action", {"retry_one": dead_id}),
        ("/schedules/action", {"pause": name}),
        (f"/jobs/{scheduled.queue}/{scheduled.id}/cancel", {}),
        (f"/queues/{scheduled.queue}/cancel", {"id": scheduled.id}),
    ]


async def unchanged(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    """Nothing any of `actions` would do was done."""
    assert await app.dead_letters.count() == 1
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_dash_cancel") == 1
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.cancel_requests") == 0
    infos = await admin_schedules.list_schedules(app.database)
    assert [i.state for i in infos] == ["active"]


# --- CSRF and origin ------------------------------------------------------------------------


async def test_every_action_refuses_a_missing_cookie_a_forged_token_and_get(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    posts = await actions(app)
    board = dashboard(app)
    async with client(board) as http:
        cookie = await token(http)
        for path, data in posts:
            # the token in the form, but no cookie (a cross-site post carries none)
            async with client(board) as bare:
                refused = await bare.post(path, data={"csrf": cookie, **data})
            assert refused.status_code == 403, path
            forged = await http.post(path, data={"csrf": "A" * 43, **data})
            assert forged.status_code == 403, path
            empty = await http.post(path, data=data)
            assert empty.status_code == 403, path
            got = await http.get(path, params={"csrf": cookie, **data})
            assert got.status_code in (404, 405), path
    await unchanged(app, conn)


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "null"},  # a sandboxed frame or a data: URL
        {"origin": "http://evil.example"},
        {"origin": "http://test.evil.example"},
        {"origin": "http://test:8443"},
        {"referer": "http://evil.example/page"},  # no Origin sent, a foreign Referer
        {"referer": "null"},
    ],
)
async def test_every_action_refuses_another_origin_even_with_the_token(
    app: pgtasks.App, conn: asyncpg.Connection, headers: dict[str, str]
) -> None:
    posts = await actions(app)
    async with client(dashboard(app)) as http:
        cookie = await token(http)
        for path, data in posts:
            refused = await http.post(path, data={"csrf": cookie, **data}, headers=headers)
            assert refused.status_code == 403, (path, headers)
        # the same-origin forms still work
        same = await http.post(
            "/schedules/action",
            data={"csrf": cookie, "pause": posts[1][1]["pause"]},
            headers={"origin": "http://test", "referer": "http://test/schedules"},
        )
        assert same.status_code == 303
    assert await app.dead_letters.count() == 1


async def test_read_only_refuses_every_action(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    posts = await actions(app)
    async with client(dashboard(app, read_only=True)) as http:
        cookie = await token(http)
        for path, data in posts:
            refused = await http.post(path, data={"csrf": cookie, **data})
            assert refused.status_code == 403, path
            assert "read-only" in refused.text
    await unchanged(app, conn)


# --- basic auth -----------------------------------------------------------------------------


async def test_basic_auth_under_a_mount_prefix_has_no_way_around(app: pgtasks.App) -> None:
    await dead_letter(app)
    api = FastAPI()
    api.mount("/tasks", dashboard(app, basic_auth=("ops", "s3cret")))
    paths = [
        "/tasks",
        "/tasks/",
        "/tasks//dead",
        "/tasks/./dead",
        "/tasks/static/../dead",
        "/tasks/%2e%2e/tasks/dead",
        "/tasks/dead/action",
        "/TASKS/dead",
        "/tasks/static/live.js",
    ]
    async with client(api) as http:
        for path in paths:
            response = await http.get(path)
            assert response.status_code in (401, 404, 307), path
            assert "Dead letters" not in response.text, path
        for auth in (("ops", "wrong"), ("ops", ""), ("", "s3cret"), ("ops:s3cret", "")):
            assert (await http.get("/tasks/dead", auth=auth)).status_code == 401, auth
        for value in ("Basic", "Basic !!!", "Bearer x", "basic b3BzOnMzY3JldA== extra"):
            response = await http.get("/tasks/dead", headers={"authorization": value})
            assert response.status_code == 401, value
        posted = await http.post("/tasks/dead/action", data={"retry_one": "1"})
        assert posted.status_code == 401
        ok = await http.get("/tasks/dead", auth=("ops", "s3cret"))
        assert ok.status_code == 200
    assert await app.dead_letters.count() == 1


# --- hostile text ---------------------------------------------------------------------------


async def test_hostile_text_is_escaped_on_every_page(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="xss", name=f"xss.{XSS}", max_retries=0)
    async def hostile(text: str) -> None:
        raise ValueError(f"boom {XSS}</pre><script>alert(2)</script>")

    ref = await hostile.options(
        idempotency_key=f"key{XSS}", headers={"x-note": f"</pre>{XSS}"}
    ).defer(f"</pre>{XSS}")
    waiting = await hostile.options(idempotency_key=f"wait{XSS}", delay=3600).defer(XSS)
    await app.worker(burst=True, queues=["xss"]).run()
    [letter] = await app.dead_letters.list()
    await conn.execute(
        "INSERT INTO pgtasks.workers (id, host, pid, queues, concurrency, version,"
        " heartbeat_interval) VALUES (gen_random_uuid(), $1, 1, ARRAY['xss'], 1, $2, 5)",
        f"host{XSS}\x1b[31m",
        f"v{XSS}",
    )
    pages = [
        "/",
        "/queues/xss?state=failed",
        "/queues/xss?state=scheduled",
        f"/queues/xss?state=waiting&task={XSS}",
        f"/jobs/xss/{ref.id}",
        f"/jobs/xss/{waiting.id}",
        "/dead",
        f"/dead?queue={XSS}&task={XSS}",
        f"/dead/{letter.id}",
        f"/search?q={XSS}",
        f"/search?q=xss.{XSS}",
        f"/queues/xss?state={XSS}",
        "/workers",
        f"/schedules?done={XSS}&job=1&queue={XSS}",
        f"/dead?done={XSS}",
        f"/jobs/xss/{ref.id}?cancel={XSS}",
    ]
    async with client(dashboard(app)) as http:
        for path in pages:
            page = await http.get(path)
            assert page.status_code in (200, 400), (path, page.status_code)
            body = page.text
            assert XSS not in body, path
            assert "<script>alert" not in body, path
        assert ESCAPED in (await http.get(f"/jobs/xss/{ref.id}")).text
        assert ESCAPED in (await http.get("/workers")).text
        # the live refresh asks for the same page: the same escaping
        live = await http.get("/workers", headers={"x-pgtasks-live": "1"})
        assert XSS not in live.text
        assert "script-src 'self'" in live.headers["content-security-policy"]


async def test_a_hostile_schedule_name_is_escaped(app: pgtasks.App) -> None:
    await schedules_declared(app)
    async with client(dashboard(app)) as http:
        page = await http.get("/schedules")
        assert '<b>"nightly"' not in page.text
        assert "&lt;b&gt;&#34;nightly&#34; &amp; co&lt;/b&gt;" in page.text


# --- huge pages and abusive parameters ------------------------------------------------------


async def test_a_job_with_a_megabyte_argument_renders(app: pgtasks.App) -> None:
    @app.task(queue="big")
    async def big(text: str) -> None: ...

    ref = await big.defer("<" * 1_000_000)
    async with client(dashboard(app)) as http:
        started = time.monotonic()
        page = await http.get(f"/jobs/big/{ref.id}")
        assert page.status_code == 200
        assert time.monotonic() - started < 5
        assert "&lt;" * 1000 in page.text
        listed = await http.get("/queues/big")
        assert len(listed.content) < 100_000  # the list does not carry arguments


async def test_a_hundred_thousand_dead_letters_make_a_bounded_fast_page(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "INSERT INTO pgtasks.dead_letters (queue, msg_id, task, message, headers, read_ct,"
        " enqueued_at, reason) SELECT 'many', n, 'many.t', '{}', '{}', 1, now(), 'r'"
        " FROM generate_series(1, 100000) AS n"
    )
    await conn.execute("ANALYZE pgtasks.dead_letters")
    async with client(dashboard(app)) as http:
        started = time.monotonic()
        page = await http.get("/dead")
        elapsed = time.monotonic() - started
        assert page.status_code == 200
        assert page.text.count("<tr data-dead=") == 50
        assert "100000" in page.text or "100,000" in page.text
        assert elapsed < 3, elapsed
        filtered = await http.get("/dead", params={"queue": "many", "task": "many.t"})
        assert filtered.text.count("<tr data-dead=") == 50
        # the older ones are a page away, each page as fast
        first = [int(i) for i in re.findall(r'<tr data-dead="(\d+)"', filtered.text)]
        older = re.search(r'href="([^"]+)" id="older"', filtered.text)
        assert older is not None
        started = time.monotonic()
        page = await http.get(html.unescape(older[1]))
        assert time.monotonic() - started < 3
        second = [int(i) for i in re.findall(r'<tr data-dead="(\d+)"', page.text)]
        assert len(second) == 50
        assert max(second) < min(first)
        assert "queue=many" in older[1]
        last = await http.get("/dead", params={"before": 1})
        assert "No dead letters older than 1." in last.text


@pytest.mark.parametrize(
    "path",
    [
        "/queues/q?state=' OR 1=1 --",
        "/queues/q?task=' OR 1=1 --",
        "/queues/q?task=%00",
        "/queues/q%00x",
        "/queues/..%2f..%2fetc",
        "/search?q=' OR 1=1 --",
        "/search?q=%00",
        "/search?q=1%00",
        "/search?q=99999999999999999999999",
        "/search?q=-1",
        "/dead?queue=%00",
        "/dead?task=%00&queue=q",
        "/dead?queue=' OR 1=1 --",
        "/dead/99999999999999999999",
        "/dead/0",
        "/jobs/q/99999999999999999999",
        "/jobs/q/-1",
        "/jobs/q/0",
        "/workflows/99999999999999999999",
        "/workflows/0",
        "/schedules?job=99999999999999999999&queue=%00",
        "/static/..%2fweb.py",
        "/static/%2e%2e%2fweb.py",
    ],
)
async def test_abusive_parameters_get_a_clean_answer(app: pgtasks.App, path: str) -> None:
    @app.task(queue="q")
    async def noop() -> None: ...

    await noop.defer()
    async with client(dashboard(app)) as http:
        response = await http.get(path)
    assert response.status_code in (200, 400, 404), (path, response.status_code)
    assert "Traceback" not in response.text


async def test_an_enormous_search_answers(app: pgtasks.App) -> None:
    async with client(dashboard(app)) as http:
        started = time.monotonic()
        response = await http.get("/search", params={"q": "x" * 60_000})
        assert response.status_code == 200
        response = await http.get("/queues/q", params={"task": "x" * 60_000})
        assert response.status_code == 404
        assert time.monotonic() - started < 5


# --- pgtasks status -------------------------------------------------------------------------


async def test_status_json_and_text_with_hostile_worker_text(
    app: pgtasks.App, conn: asyncpg.Connection, db_dsn: str
) -> None:
    host = 'evil"\n\x1b[2J\x1b]0;owned\x07</script>\u2028'
    await conn.execute(
        "INSERT INTO pgtasks.workers (id, host, pid, queues, concurrency, version,"
        " heartbeat_interval) VALUES (gen_random_uuid(), $1, 7, ARRAY['st_x'], 1, $2, 5)",
        host,
        "1\x1b[31m",
    )
    done = await anyio.to_thread.run_sync(lambda: cli("status", "--json", dsn=db_dsn))
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    [worker] = document["workers"]
    assert worker["host"] == host  # scripts get the text as it is, in valid JSON
    text = "\n".join(render(await admin_status.status(app.database)))
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "\u2028" not in text
    # no queues yet, a blank, the count of workers, the header and one row
    assert len(text.splitlines()) == 5
    [row] = [line for line in text.splitlines() if "evil" in line]
    assert row.split()[0].startswith('evil"')


# --- metrics --------------------------------------------------------------------------------


@pytest.fixture
async def black_hole() -> AsyncIterator[int]:
    """A port that accepts connections and never answers (a database behind a dead link)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_a_scrape_answers_fast_while_the_database_does_not(black_hole: int) -> None:
    app = pgtasks.App(f"postgresql://root@127.0.0.1:{black_hole}/none")
    metrics = Metrics(app, status_timeout=1.0)
    port_server = await metrics.serve(0, "127.0.0.1")
    port = port_server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(2):
                started = time.monotonic()
                with anyio.fail_after(5):
                    response = await http.get(f"http://127.0.0.1:{port}/metrics")
                assert response.status_code == 200
                assert time.monotonic() - started < 3
                values = {
                    s.name: s.value
                    for f in text_string_to_metric_families(response.text)
                    for s in f.samples
                }
                assert values["pgtasks_queue_status_up"] == 0
                metrics._snapshot_at = -float("inf")  # the next scrape tries again
    finally:
        port_server.close()
        await app.close()


async def test_a_scrape_answers_while_the_database_refuses() -> None:
    app = pgtasks.App("postgresql://root@127.0.0.1:1/none")
    metrics = Metrics(app)
    try:
        with anyio.fail_after(5):
            body, _ = await metrics.render()
        assert b"pgtasks_queue_status_up 0.0" in body
    finally:
        await app.close()


async def test_unknown_task_names_share_one_label(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="card", name="card.known")
    async def known() -> None: ...

    metrics = Metrics(app, queue_stats=False)
    await known.defer()
    for n in range(30):
        body = json.dumps({"v": 1, "task": f"made.up.{n}"})
        await conn.execute("SELECT pgmq.send('card', $1::jsonb)", body)
    worker = app.worker(burst=True, queues=["card"])
    metrics.watch(worker)
    await worker.run()
    tasks = {
        s.labels["task"]
        for f in metrics.registry.collect()
        for s in f.samples
        if "task" in s.labels
    }
    assert tasks == {"card.known", UNKNOWN_TASK}


# --- tracing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": "garbage"},
        {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"},  # all-zero ids
        {"traceparent": "ff-" + "a" * 32 + "-" + "b" * 16 + "-01"},  # a forbidden version
        {"traceparent": "00-" + "a" * 5000, "tracestate": "," * 10000 + "=" * 100},
        {"traceparent": "\u2603" * 100, "tracestate": "k=\u2603"},
        {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "tracestate": "x" * 100_000},
    ],
)
async def test_a_malformed_trace_context_does_not_fail_the_job(
    app: pgtasks.App, headers: dict[str, str]
) -> None:
    ran: list[int] = []

    @app.task(queue="trbad")
    async def noop(n: int) -> None:
        ran.append(n)

    await noop.options(headers=headers).defer(1)  # before instrumenting: kept as given
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrument(app, tracer_provider=provider)
    await app.worker(burst=True, queues=["trbad"]).run()
    assert ran == [1]
    assert await app.dead_letters.count() == 0
    assert [s.name for s in exporter.get_finished_spans() if "trbad" in s.name]


async def test_a_standalone_dashboard_without_credentials_refuses_a_rebound_name(
    app: pgtasks.App,
) -> None:
    standalone = build(app, credentials=None, read_only=False)
    for base in ("http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"):
        async with client(standalone, base) as http:
            assert (await http.get("/")).status_code == 200, base
    for base in ("http://evil.example:8080", "http://127.0.0.1.evil.example", "http://x"):
        async with client(standalone, base) as http:
            refused = await http.get("/")
            assert refused.status_code == 421, base
            assert "csrf" not in refused.text
            posted = await http.post("/dead/action", data={"retry_one": "1"})
            assert posted.status_code == 421, base
    with_credentials = build(app, credentials=("ops", "s3cret"), read_only=False)
    async with client(with_credentials, "http://tasks.example.com") as http:
        assert (await http.get("/", auth=("ops", "s3cret"))).status_code == 200
