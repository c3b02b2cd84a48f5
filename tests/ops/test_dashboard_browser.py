"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which ``.ci/run`` installs) driven by Selenium clicks through every page
and action against a real database and a real worker (with two real schedules: one every
second, one weekly, and jobs to cancel on a queue of their own), and saves a screenshot of each page
under ``$PGTASKS_SCREENSHOT_DIR`` (default: a ``pgtasks-dashboard-screenshots`` folder in the
system's temporary directory): the CI artifact.

One browser, one server and one worker for the module. Skipped, saying why, when no browser
is installed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn

import pgtasks
from pgtasks.dashboard import dashboard

from ..conftest import _admin, _clone

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="no headless Chromium here: apt-get install -y chromium chromium-driver "
        "(.ci/run installs them)",
    ),
]

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

T = TypeVar("T")

SCREENSHOTS = Path(
    os.environ.get("PGTASKS_SCREENSHOT_DIR")
    or Path(tempfile.gettempdir()) / "pgtasks-dashboard-screenshots"
)


@dataclass
class Site:
    url: str
    ids: dict[str, Any]


def _start(dsn: str, port: int, ready: threading.Event, stop: asyncio.Event, site: Site) -> None:
    async def main() -> None:
        app = pgtasks.App(dsn)
        hold = asyncio.Event()

        @app.task(queue="emails", name="emails.send")
        async def send(to: str) -> str:
            return f"sent to {to}"

        @app.task(queue="emails", name="emails.slow")
        async def slow() -> None:
            await hold.wait()

        @app.task(queue="reports", name="reports.build", max_retries=2)
        async def build(day: str) -> None:
            if day == "bad":
                raise pgtasks.Fail(f"no data for {day}")
            if pgtasks.current_job().attempt == 1 and day == "flaky":
                raise pgtasks.Retry(delay=3600)

        @app.task(queue="cancels", name="cancels.wait")
        async def wait() -> None:
            await asyncio.sleep(3600)

        @app.periodic(every=dt.timedelta(seconds=1), name="heartbeat")
        @app.task(queue="ticks", name="ticks.beat")
        async def beat() -> None:
            pass

        # a workflow's steps run on the ticks' worker (see below)
        @app.task(queue="ticks", name="flows.add")
        async def add(x: int, y: int) -> int:
            return x + y

        @app.periodic("0 6 * * 1", tz="Europe/Paris")
        @app.task(queue="reports", name="reports.weekly")
        async def weekly() -> str:
            return "the week's report"

        await app.migrate()
        # the main worker runs the scheduler; the ticks have a worker of their own, so that
        # the main one's numbers (running, done) stay what the other tests expect
        worker = app.worker(concurrency=4, queues=["emails", "reports"])
        worker.heartbeat_interval = 0.5
        ticker = app.worker(concurrency=1, queues=["ticks"], schedule=False)
        # the cancel test starts the worker of its queue, so that the workers page and the
        # main worker's numbers are the same whichever tests run
        wanted = asyncio.Event()
        loop = asyncio.get_running_loop()
        site.ids["start_cancels_worker"] = lambda: loop.call_soon_threadsafe(wanted.set)

        async def cancels_worker() -> None:
            await wanted.wait()
            if not stop.is_set():
                async with app.worker(concurrency=1, queues=["cancels"], schedule=False):
                    await stop.wait()

        async with worker, ticker:
            cancelling = asyncio.create_task(cancels_worker())
            done = asyncio.Event()
            seen: dict[str, int] = {"dead": 0, "succeeded": 0, "retried": 0}

            def on(event: pgtasks.JobEvent) -> None:
                if event.kind in seen:
                    seen[event.kind] += 1
                if seen["dead"] >= 3 and seen["succeeded"] >= 3 and seen["retried"] >= 1:
                    done.set()

            worker.subscribe(on)
            keyed = await send.options(idempotency_key="welcome-42").defer("ann@example.com")
            await send.defer("bob@example.com")
            await build.defer("monday")
            later = await send.options(delay=3600).defer("later@example.com")
            await build.defer("flaky")
            for _ in range(3):
                await build.defer("bad")
            running = await slow.defer()
            to_cancel = [await wait.options(delay=3600).defer() for _ in range(2)]
            to_stop = await wait.defer()  # waiting until the cancel test starts its worker
            flow = await pgtasks.chain(add.s(1, 2), add.partial(10), add.partial(100)).defer()
            assert await flow.result(timeout=30) == 113
            await asyncio.wait_for(done.wait(), 30)
            site.ids.update(keyed=keyed.id, later=later.id, running=running.id)
            site.ids.update(to_cancel=[r.id for r in to_cancel], to_stop=to_stop.id)
            site.ids.update(workflow=flow.id)
            server = uvicorn.Server(
                uvicorn.Config(dashboard(app), host="127.0.0.1", port=port, log_level="warning")
            )
            serving = asyncio.create_task(server.serve())
            while not server.started:
                await asyncio.sleep(0.02)
            ready.set()
            await stop.wait()
            server.should_exit = True
            hold.set()
            await serving
            wanted.set()
            await cancelling
        await app.close()

    loop = asyncio.new_event_loop()
    site.ids["loop"] = loop
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


@pytest.fixture(scope="module")
def site(server_dsn: str, template_db: str) -> Iterator[Site]:
    name, dsn = _clone(server_dsn, template_db)
    from .test_metrics import free_port

    port = free_port()
    site = Site(f"http://127.0.0.1:{port}", {})
    ready = threading.Event()
    stop = asyncio.Event()
    thread = threading.Thread(target=_start, args=(dsn, port, ready, stop, site), daemon=True)
    thread.start()
    try:
        assert ready.wait(60), "the dashboard and its worker did not start"
        yield site
    finally:
        loop: asyncio.AbstractEventLoop | None = site.ids.get("loop")
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        asyncio.run(_admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.implicitly_wait(5)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def shot(browser: Any, name: str) -> None:
    assert browser.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def _settled(read: Callable[[], T]) -> T:
    """``read()``, again if the page was replaced under it (a click's navigation landing
    between finding an element and reading it; Chromium may report that as a stale element
    or as a node that no longer belongs to the document)."""
    for _ in range(50):
        try:
            return read()
        except StaleElementReferenceException:
            time.sleep(0.1)
        except WebDriverException as exc:
            if "does not belong to the document" not in str(exc):
                raise
            time.sleep(0.1)
    return read()


def text(browser: Any, css: str) -> str:
    return _settled(lambda: str(browser.find_element(By.CSS_SELECTOR, css).text))


def follow(browser: Any, element: Any, *, submit: bool = False) -> None:
    """Click ``element`` (a link, a form's button), or submit its form, and wait until the
    page it leads to has replaced this one, so that nothing is read from the old page (an
    action on the schedules page leads back to the schedules page: its heading does not
    change)."""
    old = browser.find_element(By.TAG_NAME, "html")
    if submit:
        element.submit()
    else:
        element.click()
    WebDriverWait(browser, 10).until(lambda _: _detached(old))


def _detached(element: Any) -> bool:
    """Whether ``element`` has left the document. Chromium reports a node that the
    navigation is detaching either as stale or, mid-swap, as an inspector error ("Node with
    given id does not belong to the document"); both mean the old page is gone."""
    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "does not belong to the document" not in str(exc):
            raise
        return True
    return False


def heading(browser: Any, expected: str) -> str:
    """The page's ``h1`` once it reads ``expected`` (a click's navigation may not have landed
    yet, and the old page's heading is still there), or as it is after ten seconds."""
    deadline = time.monotonic() + 10
    while (seen := text(browser, "h1")) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


def rows(browser: Any, css: str) -> list[list[str]]:
    return _settled(
        lambda: [
            [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in browser.find_elements(By.CSS_SELECTOR, f"{css} tbody tr")
        ]
    )


def test_the_queues_page(site: Site, browser: Any) -> None:
    browser.get(site.url + "/")
    assert browser.title == "Queues · pgtasks"
    table = {r[0]: r for r in rows(browser, "#queues")}
    # queue waiting scheduled running retrying dead oldest done1m done1h failed1m failed1h workers
    assert table["emails"][1:6] == ["0", "1", "1", "0", "0"]
    assert table["emails"][7] == "2"
    assert table["reports"][1:6] == ["0", "0", "0", "1", "3"]
    assert table["reports"][-1] == "1"
    live = browser.find_element(By.ID, "live-toggle")  # shown by the page's own script
    assert live.is_displayed()
    shot(browser, "01-queues")


def test_a_queue_by_state_and_one_job(site: Site, browser: Any) -> None:
    browser.get(site.url + "/")
    browser.find_element(By.LINK_TEXT, "emails").click()
    assert heading(browser, "Queue emails") == "Queue emails"
    assert text(browser, "#no-jobs") == "No waiting jobs."
    browser.find_element(By.ID, "tab-running").click()
    [running] = rows(browser, "#jobs")
    assert running[:2] == [str(site.ids["running"]), "emails.slow"]
    shot(browser, "02-queue-running")
    browser.find_element(By.ID, "tab-succeeded").click()
    assert sorted(r[1] for r in rows(browser, "#jobs")) == ["emails.send", "emails.send"]
    browser.find_element(By.ID, "tab-scheduled").click()
    browser.find_element(By.LINK_TEXT, str(site.ids["later"])).click()
    assert text(browser, "#job-state") == "scheduled"
    assert '"later@example.com"' in text(browser, "#job-body")
    assert browser.find_element(By.ID, "job-result").is_displayed()  # no result yet
    shot(browser, "03-job")


def test_search_by_id_key_and_task(site: Site, browser: Any) -> None:
    browser.get(site.url + "/")
    box = browser.find_element(By.ID, "search")
    box.send_keys("welcome-42")
    follow(browser, box, submit=True)
    assert browser.current_url.endswith(f"/jobs/emails/{site.ids['keyed']}")
    assert text(browser, "#job-state") == "succeeded"
    assert text(browser, "#job-result") == '"sent to ann@example.com"'

    # an id is per queue: every queue that has a job with it is listed
    browser.find_element(By.ID, "search").send_keys(str(site.ids["running"]))
    follow(browser, browser.find_element(By.ID, "search"), submit=True)
    follow(browser, browser.find_element(By.LINK_TEXT, f"job {site.ids['running']} in emails"))
    assert text(browser, "#job-state") == "running"

    browser.find_element(By.ID, "search").send_keys("reports.build")
    follow(browser, browser.find_element(By.ID, "search"), submit=True)
    follow(browser, browser.find_element(By.CSS_SELECTOR, "#task-queues a"))
    follow(browser, browser.find_element(By.ID, "tab-retrying"))
    [retrying] = rows(browser, "#jobs")
    assert retrying[1:3] == ["reports.build", "1"]
    retrying_link = browser.find_element(By.CSS_SELECTOR, "#jobs tbody a")
    follow(browser, retrying_link)
    assert text(browser, "#job-state") == "retrying"
    assert "Retry" in text(browser, "#attempts")
    shot(browser, "04-job-retrying")


def test_dead_letters_retry_one_and_purge_many(site: Site, browser: Any) -> None:
    browser.get(site.url + "/dead")
    letters = rows(browser, "#dead")
    assert len(letters) == 3
    assert all("failed: no data for bad" in r[6] for r in letters)
    shot(browser, "05-dead-letters")
    first, second, third = sorted(int(r[1]) for r in letters)

    browser.find_element(By.LINK_TEXT, str(first)).click()
    assert "no data for bad" in text(browser, "#reason")
    assert "Fail" in text(browser, "#attempts")
    shot(browser, "06-dead-letter")
    browser.find_element(By.ID, "retry-this").click()
    assert text(browser, "#done").startswith("retried 1 dead letter(s) as job(s) ")
    # the worker runs it again, and it fails again: back as a new dead letter
    for checkbox in browser.find_elements(By.CSS_SELECTOR, "input[name=id]"):
        if int(checkbox.get_attribute("value")) in (second, third):
            checkbox.click()
    browser.find_element(By.ID, "purge-selected").click()
    assert heading(browser, "Purge 2 dead letter(s)?") == "Purge 2 dead letter(s)?"
    shot(browser, "07-confirm-purge")
    browser.find_element(By.ID, "confirm-purge").click()
    assert text(browser, "#done") == "purged 2 dead letter(s)"
    left = [int(r[1]) for r in rows(browser, "#dead")]
    assert second not in left
    assert third not in left


def test_the_workers_page(site: Site, browser: Any) -> None:
    browser.get(site.url + "/workers")
    workers = {r[2]: r for r in rows(browser, "#workers")}
    assert sorted(workers) == ["emails, reports", "ticks"]
    assert workers["ticks"][1] == "alive"
    worker = workers["emails, reports"]
    assert worker[1] == "alive"
    assert worker[2] == "emails, reports"
    assert worker[3] == "1/4"
    shot(browser, "08-workers")


def test_an_action_without_the_csrf_token_is_refused(site: Site, browser: Any) -> None:
    browser.get(site.url + "/dead")
    browser.execute_script(
        "document.querySelector('input[name=csrf]').value = 'forged';"
        "document.querySelector('#dead-form button[name=retry_one]').click();"
    )
    assert text(browser, "#error").startswith("refused: the form's CSRF token")
    shot(browser, "09-csrf-refused")


SCHEDULE_COLUMNS = (
    "name", "task", "queue", "timing", "tz", "catch_up", "state", "next", "last", "job"
)  # fmt: skip


def schedules(browser: Any) -> dict[str, dict[str, str]]:
    """The schedules page's rows (but their buttons) by name, each by column."""
    return {r[0]: dict(zip(SCHEDULE_COLUMNS, r, strict=False)) for r in rows(browser, "#schedules")}


def reload_until(browser: Any, read: Callable[[], T], done: Callable[[T], bool]) -> T:
    """``read()`` of the page, reloaded until ``done`` says yes, or as it is after ten
    seconds (for what a worker or the scheduler changes meanwhile)."""
    deadline = time.monotonic() + 10
    while not done(seen := read()) and time.monotonic() < deadline:
        time.sleep(0.2)
        browser.refresh()
    return seen


def button(browser: Any, schedule: str, action: str) -> Any:
    return browser.find_element(
        By.CSS_SELECTOR, f"tr[data-schedule='{schedule}'] button[name={action}]"
    )


def actions(browser: Any, schedule: str) -> list[str]:
    return _settled(
        lambda: [
            str(b.get_attribute("name"))
            for b in browser.find_elements(
                By.CSS_SELECTOR, f"tr[data-schedule='{schedule}'] button"
            )
        ]
    )


def job_id(cell: str) -> str:
    """The id in a "last job" cell (``succeeded 12``)."""
    return cell.split()[-1]


def test_schedules_pause_resume_and_run_now(site: Site, browser: Any) -> None:
    browser.get(site.url + "/")
    follow(browser, browser.find_element(By.ID, "nav-schedules"))
    assert heading(browser, "Schedules") == "Schedules"
    assert browser.title == "Schedules · pgtasks"
    table = schedules(browser)
    assert sorted(table) == ["heartbeat", "reports.weekly"]
    beat = table["heartbeat"]
    assert [beat[c] for c in ("task", "queue", "timing", "tz", "catch_up", "state")] == [
        "ticks.beat", "ticks", "every 1s", "UTC", "latest", "active"
    ]  # fmt: skip
    assert actions(browser, "heartbeat") == ["pause", "trigger"]
    weekly = table["reports.weekly"]
    assert [weekly[c] for c in ("task", "queue", "timing", "tz", "catch_up", "state")] == [
        "reports.weekly", "reports", "cron 0 6 * * 1", "Europe/Paris", "latest", "active"
    ]  # fmt: skip
    next_tick = dt.datetime.strptime(weekly["next"].split(" UTC")[0], "%Y-%m-%d %H:%M:%S")
    assert (next_tick.weekday(), next_tick.hour) in ((0, 4), (0, 5))  # 06:00 in Paris
    assert (weekly["last"], weekly["job"]) == ("-", "-")  # never ticked, never run

    # pause the one that ticks every second: it does not tick while paused
    reload_until(browser, lambda: schedules(browser)["heartbeat"], lambda r: r["last"] != "-")
    follow(browser, button(browser, "heartbeat", "pause"))
    assert text(browser, "#done") == (
        "paused schedule 'heartbeat': its ticks are not enqueued until resumed"
    )
    paused = schedules(browser)["heartbeat"]  # read after the pause committed
    assert (paused["state"], paused["next"]) == ("paused", "-")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", paused["last"])
    assert actions(browser, "heartbeat") == ["resume", "trigger"]
    time.sleep(3.0)  # three ticks' worth
    browser.refresh()
    still = schedules(browser)["heartbeat"]
    assert (still["state"], still["last"]) == ("paused", paused["last"])  # no tick...
    assert job_id(still["job"]) == job_id(paused["job"])  # ...and no job (its state may move)

    # resume it: it ticks again, and its jobs run
    follow(browser, button(browser, "heartbeat", "resume"))
    assert text(browser, "#done") == "resumed schedule 'heartbeat': it ticks again from now on"
    assert schedules(browser)["heartbeat"]["state"] == "active"
    again = reload_until(
        browser,
        lambda: schedules(browser)["heartbeat"],
        lambda r: r["last"] > paused["last"] and r["job"].split()[0] == "succeeded",
    )
    assert again["last"] > paused["last"]
    assert again["job"].split()[0] == "succeeded"
    assert job_id(again["job"]) != job_id(paused["job"])

    # run the weekly one now, and follow the link to the job that ran
    follow(browser, button(browser, "reports.weekly", "trigger"))
    done = re.fullmatch(
        r"ran schedule 'reports.weekly' now: job (\d+) in reports · job (\d+)",
        text(browser, "#done"),
    )
    assert done is not None
    assert done[1] == done[2]
    ran = done[1]
    weekly = schedules(browser)["reports.weekly"]
    assert (weekly["state"], weekly["last"]) == ("active", "-")  # its ticks are left alone
    assert job_id(weekly["job"]) == ran
    shot(browser, "10-schedules")
    follow(
        browser,
        browser.find_element(By.CSS_SELECTOR, "tr[data-schedule='reports.weekly'] a.last-job"),
    )
    assert browser.current_url == f"{site.url}/jobs/reports/{ran}"
    state = reload_until(browser, lambda: text(browser, "#job-state"), lambda s: s == "succeeded")
    assert state == "succeeded"
    assert '"x-pgtasks-schedule": "reports.weekly"' in text(browser, "#job-headers")
    shot(browser, "11-scheduled-job")


def test_cancel_scheduled_jobs_and_a_running_one(site: Site, browser: Any) -> None:
    chosen, later = site.ids["to_cancel"]
    # one of the scheduled jobs, selected in the queue's list
    browser.get(f"{site.url}/queues/cancels?state=scheduled")
    assert heading(browser, "Queue cancels") == "Queue cancels"
    assert sorted(int(r[0]) for r in rows(browser, "#jobs")) == [chosen, later]
    browser.find_element(By.CSS_SELECTOR, f"input[name=id][value='{chosen}']").click()
    follow(browser, browser.find_element(By.ID, "cancel-selected"))
    assert text(browser, "#done") == "cancelled 1 job(s)"
    assert [int(r[0]) for r in rows(browser, "#jobs")] == [later]
    follow(browser, browser.find_element(By.ID, "tab-cancelled"))
    assert [int(r[0]) for r in rows(browser, "#jobs")] == [chosen]

    # the other one from its page
    browser.get(f"{site.url}/jobs/cancels/{later}")
    assert text(browser, "#job-state") == "scheduled"
    follow(browser, browser.find_element(By.ID, "cancel-job"))
    assert text(browser, "#done").startswith("Cancelled: it had not started")
    assert text(browser, "#job-state") == "cancelled"
    assert "cancel-job" not in browser.page_source  # nothing left to cancel
    shot(browser, "12-job-cancelled")

    # a running one: its worker is asked, and the run ends as cancelled
    site.ids["start_cancels_worker"]()
    browser.get(f"{site.url}/jobs/cancels/{site.ids['to_stop']}")
    state = reload_until(browser, lambda: text(browser, "#job-state"), lambda s: s == "running")
    assert state == "running"
    follow(browser, browser.find_element(By.ID, "cancel-job"))
    assert text(browser, "#done").startswith("Cancel requested: it is running")
    if text(browser, "#job-state") == "running":  # asked once: no second button
        assert "cancel-job" not in browser.page_source
        assert text(browser, "#job-cancel-requested").startswith("Cancel requested")
    shot(browser, "13-job-cancel-requested")
    state = reload_until(browser, lambda: text(browser, "#job-state"), lambda s: s == "cancelled")
    assert state == "cancelled"
    assert "cancel-job" not in browser.page_source


def test_a_workflow_and_its_steps_link_to_each_other(site: Site, browser: Any) -> None:
    workflow = site.ids["workflow"]
    browser.get(f"{site.url}/workflows/{workflow}")
    assert heading(browser, f"Workflow {workflow} succeeded") == f"Workflow {workflow} succeeded"
    assert text(browser, "#workflow-kind") == "a chain of 3 steps"
    steps = rows(browser, "#steps")
    assert [r[:3] for r in steps] == [[str(i), "flows.add", "ticks"] for i in range(3)]
    assert [r[4] for r in steps] == ["succeeded"] * 3
    shot(browser, "14-workflow")
    follow(browser, browser.find_element(By.LINK_TEXT, steps[2][3]))
    assert text(browser, "#job-state") == "succeeded"
    assert text(browser, "#job-result") == "113"
    follow(browser, browser.find_element(By.ID, "to-workflow"))
    assert heading(browser, f"Workflow {workflow} succeeded") == f"Workflow {workflow} succeeded"
