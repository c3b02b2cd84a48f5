"""The dashboard's safety and mounting, through its ASGI app (httpx), on a real database:
actions need the CSRF token and a same-site origin, read-only refuses every action and shows
no button, basic auth guards every request, a standalone dashboard refuses to serve beyond
this machine without credentials, mounted under FastAPI its links carry the mount path, and
text from jobs and schedules' names is escaped. The schedules' actions and the cancels are
sent as plain form posts (what a browser without JavaScript sends), down to a name that
names no schedule and an id that names no job."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

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


async def jobs_to_cancel(app: pgtasks.App) -> tuple[pgtasks.JobRef[Any], pgtasks.JobRef[Any]]:
    """A job that succeeded (run by a burst worker) and one scheduled an hour ahead."""

    @app.task(queue="dash_cancel", name="dash.later")
    async def later(n: int) -> int:
        return n

    done = await later.defer(1)
    await app.worker(burst=True, queues=["dash_cancel"]).run()
    scheduled = await later.options(delay=3600).defer(2)
    return done, scheduled


async def test_a_cancel_needs_the_csrf_token_and_says_what_it_did(app: pgtasks.App) -> None:
    _, scheduled = await jobs_to_cancel(app)
    page_url = f"/jobs/dash_cancel/{scheduled.id}"
    action = f"{page_url}/cancel"
    async with client(dashboard(app)) as http:
        page = await http.get(page_url)
        assert page.status_code == 200
        assert f'action="{action}"' in page.text
        assert 'id="cancel-job"' in page.text
        cookie = page.cookies[CSRF_COOKIE]

        missing = await http.post(action, data={})
        assert missing.status_code == 403
        assert "CSRF token is missing" in missing.text
        forged = await http.post(action, data={"csrf": "x" * 43})
        assert forged.status_code == 403
        foreign = await http.post(
            action, data={"csrf": cookie}, headers={"origin": "http://evil.example"}
        )
        assert foreign.status_code == 403
        assert (await scheduled.status()).state == "scheduled"

        cancelled = await http.post(action, data={"csrf": cookie})
        assert cancelled.status_code == 303
        assert cancelled.headers["location"] == f"{page_url}?cancel=cancelled"
        assert (await scheduled.status()).state == "cancelled"
        banner = await http.get(cancelled.headers["location"])
        assert "Cancelled: it had not started" in banner.text
        assert 'id="job-state">cancelled<' in banner.text
        assert 'id="cancel-job"' not in banner.text

        gone = await http.post("/jobs/dash_cancel/999999/cancel", data={"csrf": cookie})
        assert gone.status_code == 404
        assert "no job 999999 in queue &#39;dash_cancel&#39;: nothing to cancel" in gone.text
        for path in ("/jobs/Dash/1", f"/jobs/dash_cancel/{2**63}"):  # no such name or id
            assert (await http.get(path)).status_code == 404
            assert (await http.post(f"{path}/cancel", data={"csrf": cookie})).status_code == 404


async def test_a_finished_job_is_not_cancelled_and_the_page_says_so(app: pgtasks.App) -> None:
    done, _ = await jobs_to_cancel(app)
    page_url = f"/jobs/dash_cancel/{done.id}"
    async with client(dashboard(app)) as http:
        page = await http.get(page_url)
        assert 'id="job-state">succeeded<' in page.text
        assert 'id="cancel-job"' not in page.text  # nothing to cancel: no button
        cookie = page.cookies[CSRF_COOKIE]
        refused = await http.post(f"{page_url}/cancel", data={"csrf": cookie})
        assert refused.status_code == 303
        assert refused.headers["location"] == f"{page_url}?cancel=finished"
        banner = await http.get(refused.headers["location"])
        assert "Not cancelled: already finished: succeeded." in banner.text
    status = await done.status()
    assert (status.state, status.cancel_requested) == ("succeeded", False)
    assert await done.result(timeout=5) == 1  # its result is still there


async def test_read_only_shows_no_cancel_button_and_refuses_to_cancel(app: pgtasks.App) -> None:
    _, scheduled = await jobs_to_cancel(app)
    async with client(dashboard(app, read_only=True)) as http:
        page = await http.get(f"/jobs/dash_cancel/{scheduled.id}")
        assert page.status_code == 200
        assert "cancel-job" not in page.text
        assert "/cancel" not in page.text
        listed = await http.get("/queues/dash_cancel?state=scheduled")
        assert f'data-job="{scheduled.id}"' in listed.text
        assert 'name="id"' not in listed.text
        assert "cancel-selected" not in listed.text
        cookie = page.cookies[CSRF_COOKIE]
        for action, data in (
            (f"/jobs/dash_cancel/{scheduled.id}/cancel", {"csrf": cookie}),
            ("/queues/dash_cancel/cancel", {"csrf": cookie, "id": str(scheduled.id)}),
        ):
            refused = await http.post(action, data=data)
            assert refused.status_code == 403
            assert "read-only" in refused.text
    assert (await scheduled.status()).state == "scheduled"


async def test_cancel_the_jobs_selected_in_a_queue(app: pgtasks.App) -> None:
    done, scheduled = await jobs_to_cancel(app)
    more = await app.defer_many([app.tasks["dash.later"].options(delay=3600).s(n) for n in (3, 4)])
    async with client(dashboard(app)) as http:
        page = await http.get("/queues/dash_cancel?state=scheduled")
        assert page.status_code == 200
        assert 'action="/queues/dash_cancel/cancel"' in page.text
        for ref in (scheduled, *more):
            assert f'name="id" value="{ref.id}"' in page.text
        assert 'name="id"' not in (await http.get("/queues/dash_cancel?state=succeeded")).text
        cookie = page.cookies[CSRF_COOKIE]
        chosen = [str(scheduled.id), str(more[0].id), str(done.id), "999999"]

        forged = await http.post(
            "/queues/dash_cancel/cancel", data={"csrf": "x" * 43, "id": chosen}
        )
        assert forged.status_code == 403
        assert [(await r.status()).state for r in (scheduled, *more)] == ["scheduled"] * 3
        none = await http.post("/queues/dash_cancel/cancel", data={"csrf": cookie})
        assert none.status_code == 400

        sent = await http.post(
            "/queues/dash_cancel/cancel",
            data={"csrf": cookie, "id": chosen, "state": "scheduled", "task": "dash.later"},
        )
        assert sent.status_code == 303
        location = sent.headers["location"]
        assert location.startswith("/queues/dash_cancel?state=scheduled&task=dash.later&")
        banner = await http.get(location)
        assert "cancelled 2 job(s); 1 already finished; 1 not found" in banner.text
        assert f'name="id" value="{more[1].id}"' in banner.text  # the one left
    states = [(await r.status()).state for r in (scheduled, *more, done)]
    assert states == ["cancelled", "cancelled", "scheduled", "succeeded"]


async def test_a_workflow_page_lists_its_steps_and_a_step_links_to_it(app: pgtasks.App) -> None:
    @app.task(queue="dash_flow", name="dash.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(queue="dash_flow", name="dash.refuse_sum")
    async def refuse_sum(total: int) -> None:
        raise pgtasks.Fail(f"<script>no {total}</script>")

    good = await pgtasks.chain(add.s(1, 2), add.partial(10)).defer()
    bad = await pgtasks.chain(add.s(1, 1), refuse_sum.partial()).defer()
    async with app.worker(queues=["dash_flow"]):
        assert await good.result(timeout=20) == 13
        with pytest.raises(pgtasks.JobFailed):
            await bad.result(timeout=20)

    async with client(dashboard(app)) as http:
        page = await http.get(f"/workflows/{good.id}")
        assert page.status_code == 200
        assert 'id="workflow-state">succeeded<' in page.text
        assert "a chain of 2 steps" in page.text
        steps = re.findall(r'href="/jobs/dash_flow/(\d+)"', page.text)
        assert len(steps) == 2
        step_page = await http.get(f"/jobs/dash_flow/{steps[1]}")
        assert f'href="/workflows/{good.id}" id="to-workflow">workflow {good.id}</a>' in (
            step_page.text
        )
        assert "a chain of 2 steps: step 1" in step_page.text

        failed = await http.get(f"/workflows/{bad.id}")
        assert 'id="workflow-state">failed<' in failed.text
        assert "&lt;script&gt;no 2&lt;/script&gt;" in failed.text
        assert "<script>no" not in failed.text

        for missing in (f"/workflows/{bad.id + 100}", f"/workflows/{2**64}"):
            response = await http.get(missing)
            assert response.status_code == 404, missing
            assert "no workflow" in response.text
