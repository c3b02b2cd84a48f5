"""The dashboard's pages and actions: a Starlette app rendering Jinja2 templates, reading and
acting only through `pgtasks.admin` and, to cancel jobs, `App.cancel` (never a running
worker).

Pages (GET): ``/`` the queues; ``/queues/{queue}?state=&task=`` a queue's jobs by state;
``/jobs/{queue}/{id}`` one job; ``/search?q=`` by job id, idempotency key or task name;
``/dead`` the dead letters (50 a page, ``?before=ID`` the older ones); ``/dead/{id}`` one
dead letter; ``/workflows/{id}`` one workflow; ``/schedules``; ``/workers``.
Actions (POST, with a CSRF token, refused in read-only mode): ``/jobs/{queue}/{id}/cancel``
cancels one job, ``/queues/{queue}/cancel`` the jobs selected in a list (through
`App.cancel`: at once if not running, else a request its worker acts on);
``/dead/action`` retries or purges dead letters, one or many (a purge asks to confirm on a
page of its own); ``/schedules/action`` pauses, resumes or triggers (runs now) one schedule,
named in the form (a schedule's name may hold any printable character, so it is never part
of a path). An action leads back to its page, with a banner saying what it did; the
actions are `actions.Actions`, a base class of `Dashboard`.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from .._version import __version__
from ..admin import jobs as admin_jobs
from ..admin import schedules as admin_schedules
from ..admin import status as admin_status
from ..admin import workers as admin_workers
from ..admin import workflows as admin_workflows
from ..admin.status import QueueState
from ..app import App
from ..db.database import Database
from ..exceptions import JobNotFound
from ..queues import QUEUE_NAME
from ..tasks.handle import FINAL_STATES
from .actions import CANCEL_OUTCOMES, Actions, job_path
from .security import CSRF_COOKIE, CSRF_FIELD, csrf_token

PAGE_SIZE = 50
STATIC = {"live.js": "text/javascript", "style.css": "text/css"}
# the states a job can be cancelled in (a running one through a request to its worker)
CANCELLABLE = tuple(s for s in admin_jobs.STATES if s not in FINAL_STATES)


def _age(value: dt.datetime | float | None, now: dt.datetime | None = None) -> str:
    """``4.2s``, ``3m05s``, ``2h10m``, ``3d04h`` (since a time, or a number of seconds)."""
    if value is None:
        return "-"
    if isinstance(value, dt.datetime):
        seconds = ((now or dt.datetime.now(dt.timezone.utc)) - value).total_seconds()
    else:
        seconds = value
    ahead = seconds < 0
    seconds = abs(seconds)
    if seconds < 60:
        text = f"{seconds:.1f}s"
    elif seconds < 3600:
        text = f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"
    elif seconds < 86400:
        text = f"{int(seconds) // 3600}h{int(seconds) % 3600 // 60:02d}m"
    else:
        text = f"{int(seconds) // 86400}d{int(seconds) % 86400 // 3600:02d}h"
    return f"in {text}" if ahead else text


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else f"{value.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


def _count(state: QueueState, name: str) -> str:
    value = f"{getattr(state, name):,}"
    if name in state.estimated:
        return "~" + value
    if name in state.at_least:
        return value + "+"
    return value


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


class Dashboard(Actions):
    """The dashboard of one pgtasks app's database; its attribute `app` is the ASGI app (see
    `pgtasks.dashboard`).
    Its dead letters are the app's (``app.dead_letters``): retries record with its
    ``result_ttl``."""

    def __init__(
        self,
        pgtasks_app: App,
        *,
        read_only: bool = False,
        title: str = "pgtasks",
        refresh: float = 5.0,
        mounted_note: str | None = None,
    ) -> None:
        self.pgtasks_app = pgtasks_app
        self.database: Database = pgtasks_app.database
        self.read_only = read_only
        self.title = title
        self.refresh = refresh
        self.note = mounted_note
        self.dead_letters = pgtasks_app.dead_letters
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("pgtasks.dashboard", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters.update(age=_age, when=_when, pretty=_pretty)
        self.templates.globals.update(count=_count, version=__version__, cancellable=CANCELLABLE)
        self.app = Starlette(
            routes=[
                Route("/", self.queues_page, name="queues"),
                Route("/queues/{queue}", self.queue_page, name="queue"),
                Route("/jobs/{queue}/{msg_id:int}", self.job_page, name="job"),
                Route(
                    "/jobs/{queue}/{msg_id:int}/cancel",
                    self.job_cancel,
                    methods=["POST"],
                    name="job_cancel",
                ),
                Route(
                    "/queues/{queue}/cancel",
                    self.queue_cancel,
                    methods=["POST"],
                    name="queue_cancel",
                ),
                Route("/workflows/{workflow_id:int}", self.workflow_page, name="workflow"),
                Route("/search", self.search_page, name="search"),
                Route("/dead", self.dead_page, name="dead"),
                Route("/dead/action", self.dead_action, methods=["POST"], name="dead_action"),
                Route("/dead/{dead_id:int}", self.dead_letter_page, name="dead_letter"),
                Route("/schedules", self.schedules_page, name="schedules"),
                Route(
                    "/schedules/action",
                    self.schedule_action,
                    methods=["POST"],
                    name="schedule_action",
                ),
                Route("/workers", self.workers_page, name="workers"),
                Route("/static/{name}", self.static, name="static"),
            ],
            exception_handlers={JobNotFound: self._not_found},
        )

    # --- rendering --------------------------------------------------------------------------

    def render(
        self,
        request: Request,
        template: str,
        *,
        live: bool = False,
        status_code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        token, new = csrf_token(request)
        base = request.scope.get("root_path", "").rstrip("/")
        html = self.templates.get_template(template).render(
            base=base,
            title=self.title,
            read_only=self.read_only,
            note=self.note,
            csrf_field=CSRF_FIELD,
            csrf=token,
            live=live,
            refresh=self.refresh,
            path=request.url.path,
            query=request.url.query,
            now=dt.datetime.now(dt.timezone.utc),
            **context,
        )
        response = HTMLResponse(html, status_code=status_code)
        response.headers["cache-control"] = "no-store"
        response.headers["x-frame-options"] = "DENY"
        response.headers["referrer-policy"] = "same-origin"
        response.headers["content-security-policy"] = (
            "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'; form-action 'self'"
        )
        if new:
            response.set_cookie(
                CSRF_COOKIE, token, path=base or "/", httponly=True, samesite="strict"
            )
        return response

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return self.render(request, "error.html", status_code=404, message=str(exc))

    # --- pages ------------------------------------------------------------------------------

    async def queues_page(self, request: Request) -> Response:
        snapshot = await admin_status.status(self.database)
        return self.render(request, "queues.html", live=True, snapshot=snapshot)

    async def queue_page(self, request: Request) -> Response:
        queue = request.path_params["queue"]
        state = request.query_params.get("state") or "waiting"
        task = _param(request, "task") or None
        if state not in admin_jobs.STATES:
            return self.render(
                request, "error.html", status_code=400, message=f"no job state {state!r}"
            )
        names = await admin_jobs.queue_names(self.database)
        if queue not in names:
            raise JobNotFound(f"no queue {queue!r}")
        jobs = await admin_jobs.list_jobs(
            self.database,
            queue,
            state,
            task=task,
            limit=PAGE_SIZE,
        )
        return self.render(
            request,
            "queue.html",
            live=True,
            queue=queue,
            state=state,
            task=task or "",
            states=admin_jobs.STATES,
            jobs=jobs,
            page_size=PAGE_SIZE,
            cancelled=_cancelled(request.query_params),
        )

    async def job_page(self, request: Request) -> Response:
        job = await admin_jobs.get_job(self.database, *job_path(request))
        cancel = request.query_params.get("cancel")
        return self.render(
            request, "job.html", job=job, cancel=cancel if cancel in CANCEL_OUTCOMES else None
        )

    async def workflow_page(self, request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        if not 1 <= workflow_id < 2**63:
            raise JobNotFound(f"no workflow {workflow_id}")
        w = await admin_workflows.get_workflow(self.database, workflow_id)
        return self.render(request, "workflow.html", live=True, w=w)

    async def search_page(self, request: Request) -> Response:
        text = _param(request, "q").strip()
        found: Sequence[admin_jobs.JobSummary] = []
        queues: list[str] = []
        if text:
            found = await admin_jobs.find(self.database, text)
            if len(found) == 1:
                job = found[0]
                base = request.scope.get("root_path", "").rstrip("/")
                return RedirectResponse(f"{base}/jobs/{job.queue}/{job.id}", status_code=303)
            if not found:  # a task name: the queues that have jobs of it
                for queue in await admin_jobs.queue_names(self.database):
                    for state in admin_jobs.STATES:
                        if await admin_jobs.list_jobs(
                            self.database,
                            queue,
                            state,
                            task=text,
                            limit=1,
                        ):
                            queues.append(queue)
                            break
        return self.render(request, "search.html", text=text, found=found, task_queues=queues)

    async def dead_page(self, request: Request) -> Response:
        queue = _param(request, "queue") or None
        task = _param(request, "task") or None
        before = request.query_params.get("before") or ""
        older = int(before) if before.isdigit() and len(before) < 19 else None
        letters = await self.dead_letters.list(
            queue=queue, task=task, limit=PAGE_SIZE, before=older
        )
        return self.render(
            request,
            "dead.html",
            letters=letters,
            queue=queue or "",
            task=task or "",
            before=older,
            page_size=PAGE_SIZE,
            done=request.query_params.get("done"),
            total=await self.dead_letters.count(queue=queue),
        )

    async def dead_letter_page(self, request: Request) -> Response:
        dead_id = request.path_params["dead_id"]
        if not 1 <= dead_id < 2**63:
            raise JobNotFound(f"no dead letter {dead_id}")
        letter = await self.dead_letters.get(dead_id)
        return self.render(request, "dead_letter.html", letter=letter)

    async def schedules_page(self, request: Request) -> Response:
        infos = await admin_schedules.list_schedules(self.database)
        job = request.query_params.get("job") or ""
        queue = request.query_params.get("queue") or ""
        return self.render(
            request,
            "schedules.html",
            live=True,
            schedules=infos,
            done=request.query_params.get("done"),
            # the job a trigger enqueued, linked from the banner (only a real id and queue)
            job=int(job) if job.isdigit() and len(job) < 19 else None,
            job_queue=queue if QUEUE_NAME.fullmatch(queue) else None,
        )

    async def workers_page(self, request: Request) -> Response:
        infos = await admin_workers.list_workers(self.database, everyone=True)
        return self.render(request, "workers.html", live=True, workers=infos)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return Response("not found\n", status_code=404, media_type="text/plain")
        data = importlib.resources.files("pgtasks.dashboard").joinpath("static").joinpath(name)
        return Response(
            data.read_bytes(),
            media_type=STATIC[name],
            headers={"cache-control": "max-age=300"},
        )


def _param(request: Request, name: str) -> str:
    """A query parameter as text to search with: a NUL (which no text in the database can
    hold, and which PostgreSQL refuses in a query) becomes U+FFFD, so it matches nothing."""
    return (request.query_params.get(name) or "").replace("\x00", "\ufffd")


def _cancelled(params: Mapping[str, str]) -> str:
    """What a cancel of selected jobs did, from its count of each outcome (numbers only, so
    that a link cannot put words in the banner)."""
    said = {
        "cancelled": "cancelled {} job(s)",
        "requested": "cancel requested for {} running job(s)",
        "finished": "{} already finished",
        "unknown": "{} not found",
    }
    return "; ".join(
        text.format(int(n))
        for outcome, text in said.items()
        if (n := params.get(outcome, "")).isdigit() and len(n) < 7 and int(n)
    )
