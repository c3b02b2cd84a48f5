"""The dashboard's safety and mounting, through its ASGI app (httpx), on a real database:
actions need the CSRF token and a same-site origin, read-only refuses every action and shows
no button, basic auth guards every request, a standalone dashboard refuses to serve beyond
this machine without credentials, mounted under FastAPI its links carry the mount path, and
text from jobs and schedules' names is escaped. The schedules' actions are sent as plain
form posts (what a browser without JavaScript sends), down to a name that names no
schedule."""

from __future__ import annotations

import re
import subprocess
import sys

import anyio
import asyncpg
import httpx
import pytest
from fastapi import FastAPI

import pgtasks
from pgtasks.admin import schedules as admin_schedules
from pgtasks.dashboard import dashboard
from pgtasks.dashboard.security import CSRF_COOKIE
from pgtasks.dashboard.server import check_bind
from pgtasks.exceptions import ConfigurationError

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def dead_letter(app: pgtasks.App, name: str = "dash.refuse") -> int:
    @app.task(queue="dash", name=name)
    async def refuse(text: str) -> None:
        raise pgtasks.Fail(text)

    await refuse.defer("<script>alert(1)</script>")
    await app.worker(burst=True).run()
    [letter] = await app.dead_letters.list()
    return letter.id


HOSTILE = '<b>"nightly" & co</b>'


async def schedules_declared(app: pgtasks.App) -> dict[str, admin_schedules.ScheduleInfo]:
    """A weekly schedule with a hostile name, its row written by a scheduler that starts
    (and is stopped once the row is there); the rows by name."""

    @app.task(queue="dash_weekly", name="dash.weekly")
    async def weekly() -> None:
        pass

    app.schedule(weekly.s(), cron="0 6 * * 1", tz="Europe/Paris", name=HOSTILE)
    await app.migrate()
    async with anyio.create_task_group() as tg:
        tg.start_soon(app.scheduler().run)
        with anyio.fail_after(10):
            while not (infos := await admin_schedules.list_schedules(app.database)):
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    return {i.name: i for i in infos}


def client(asgi: object, base: str = "http://test") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url=base)  # type: ignore[arg-type]


async def test_actions_need_the_csrf_token_and_the_same_origin(app: pgtasks.App) -> None:
    dead_id = await dead_letter(app)
    async with client(dashboard(app)) as http:
        page = await http.get("/dead")
        assert page.status_code == 200
        assert "<script>alert(1)</script>" not in page.text  # escaped
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        cookie = page.cookies[CSRF_COOKIE]
        match = CSRF.search(page.text)
        assert match is not None
        assert match[1] == cookie
        assert "samesite=strict" in page.headers["set-cookie"].lower()

        forged = await http.post("/dead/action", data={"csrf": "x" * 43, "retry_one": dead_id})
        assert forged.status_code == 403
        foreign = await http.post(
            "/dead/action",
            data={"csrf": cookie, "retry_one": dead_id},
            headers={"origin": "http://evil.example"},
        )
        assert foreign.status_code == 403
        assert "another site" in foreign.text
        assert await app.dead_letters.count() == 1

        done = await http.post("/dead/action", data={"csrf": cookie, "retry_one": dead_id})
        assert done.status_code == 303
        assert await app.dead_letters.count() == 0


async def test_read_only_shows_no_button_and_refuses_every_action(app: pgtasks.App) -> None:
    dead_id = await dead_letter(app)
    async with client(dashboard(app, read_only=True)) as http:
        page = await http.get("/dead")
        assert "read-only" in page.text
        assert "retry_one" not in page.text
        assert "purge" not in page.text.split("<main")[1].lower().replace("purge)", "")
        cookie = page.cookies[CSRF_COOKIE]
        refused = await http.post("/dead/action", data={"csrf": cookie, "purge_one": dead_id})
        assert refused.status_code == 403
    assert await app.dead_letters.count() == 1


async def test_basic_auth_guards_every_request(app: pgtasks.App) -> None:
    async with client(dashboard(app, basic_auth=("ops", "s3cret"))) as http:
        assert (await http.get("/")).status_code == 401
        assert (await http.get("/", auth=("ops", "wrong"))).status_code == 401
        ok = await http.get("/", auth=("ops", "s3cret"))
        assert ok.status_code == 200
        assert (await http.get("/static/style.css", auth=("ops", "s3cret"))).status_code == 200


def test_a_standalone_dashboard_binds_to_loopback_unless_given_credentials() -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    with pytest.raises(ConfigurationError, match="no authentication"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", ("ops", "s3cret"))


async def test_the_command_refuses_an_open_address(db_dsn: str) -> None:
    result = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "pgtasks", "dashboard", "--dsn", db_dsn, "--host", "0.0.0.0"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    )
    assert result.returncode == 1
    assert "pgtasks: error: the dashboard would be reachable from other machines" in (result.stderr)


async def test_mounted_under_fastapi_its_links_carry_the_mount_path(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    dead_id = await dead_letter(app)
    api = FastAPI()
    api.mount("/tasks", dashboard(app))
    async with client(api) as http:
        page = await http.get("/tasks/")
        assert page.status_code == 200
        assert "path=/tasks" in page.headers["set-cookie"].lower()
        assert 'href="/tasks/queues/dash"' in page.text
        assert 'href="/tasks/static/style.css"' in page.text
        assert (await http.get("/tasks/static/live.js")).status_code == 200
        letter = await http.get(f"/tasks/dead/{dead_id}")
        assert 'action="/tasks/dead/action"' in letter.text
        cookie = http.cookies[CSRF_COOKIE]
        purge = await http.post(
            "/tasks/dead/action",
            data={"csrf": cookie, "purge_one": dead_id, "back": f"/tasks/dead/{dead_id}"},
        )
        assert purge.status_code == 200  # asks first
        assert "Purge 1 dead letter(s)?" in purge.text
        confirmed = await http.post(
            "/tasks/dead/action",
            data={"csrf": cookie, "action": "purge", "id": dead_id, "confirm": "yes"},
        )
        assert confirmed.status_code == 303
        assert confirmed.headers["location"].startswith("/tasks/dead?done=purged+1")
        assert (await http.get("/tasks/jobs/dash/999")).status_code == 404
    assert await app.dead_letters.count() == 0


async def test_schedule_actions_need_the_csrf_token_and_name_their_schedule(
    app: pgtasks.App,
) -> None:
    [info] = (await schedules_declared(app)).values()
    assert info.state == "active"
    async with client(dashboard(app)) as http:
        page = await http.get("/schedules")
        assert page.status_code == 200
        assert HOSTILE not in page.text  # escaped, in the cell and in the buttons' values
        assert "&lt;b&gt;&#34;nightly&#34; &amp; co&lt;/b&gt;" in page.text
        assert 'name="pause"' in page.text
        cookie = page.cookies[CSRF_COOKIE]

        missing = await http.post("/schedules/action", data={"pause": HOSTILE})
        assert missing.status_code == 403
        assert "CSRF token is missing" in missing.text
        forged = await http.post("/schedules/action", data={"csrf": "x" * 43, "pause": HOSTILE})
        assert forged.status_code == 403
        [info] = await admin_schedules.list_schedules(app.database)
        assert info.state == "active"

        paused = await http.post("/schedules/action", data={"csrf": cookie, "pause": HOSTILE})
        assert paused.status_code == 303
        [info] = await admin_schedules.list_schedules(app.database)
        assert info.state == "paused"
        banner = await http.get(paused.headers["location"])
        assert "paused schedule &#39;&lt;b&gt;" in banner.text
        assert 'name="resume"' in banner.text
        assert 'name="pause"' not in banner.text

        run = await http.post("/schedules/action", data={"csrf": cookie, "trigger": HOSTILE})
        assert run.status_code == 303
        [info] = await admin_schedules.list_schedules(app.database)
        assert info.state == "paused"  # run now leaves the ticks alone
        assert info.last_job == "waiting"
        assert info.last_job_queue == "dash_weekly"
        banner = await http.get(run.headers["location"])
        assert f"now: job {info.last_job_id} in dash_weekly" in banner.text
        assert f'href="/jobs/dash_weekly/{info.last_job_id}" id="done-job"' in banner.text

        unknown = "<script>alert(1)</script>"
        gone = await http.post("/schedules/action", data={"csrf": cookie, "resume": unknown})
        assert gone.status_code == 404
        assert unknown not in gone.text
        assert "no schedule named &#39;&lt;script&gt;alert(1)&lt;/script&gt;&#39;" in gone.text
        assert 'href="/schedules" id="back"' in gone.text
        both = await http.post(
            "/schedules/action", data={"csrf": cookie, "pause": HOSTILE, "resume": HOSTILE}
        )
        assert both.status_code == 400

        resumed = await http.post("/schedules/action", data={"csrf": cookie, "resume": HOSTILE})
        assert resumed.status_code == 303
    [info] = await admin_schedules.list_schedules(app.database)
    assert info.state == "active"


async def test_read_only_shows_no_schedule_button_and_refuses_their_actions(
    app: pgtasks.App,
) -> None:
    await schedules_declared(app)
    async with client(dashboard(app, read_only=True)) as http:
        page = await http.get("/schedules")
        assert page.status_code == 200
        assert "&lt;b&gt;&#34;nightly&#34; &amp; co&lt;/b&gt;" in page.text
        main = page.text.split("<main")[1]
        assert "<button" not in main
        assert "run now" not in main
        cookie = page.cookies[CSRF_COOKIE]
        for action in ("pause", "trigger"):
            refused = await http.post("/schedules/action", data={"csrf": cookie, action: HOSTILE})
            assert refused.status_code == 403
            assert "read-only" in refused.text
    [info] = await admin_schedules.list_schedules(app.database)
    assert (info.state, info.last_job_id) == ("active", None)
