"""The dashboard's actions (POST, with a CSRF token, refused in read-only mode): cancel one
job or the jobs selected in a list, retry or purge dead letters, pause, resume or trigger a
schedule. A base class of `Dashboard` (`web`), which renders the pages they lead back to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from ..admin import jobs as admin_jobs
from ..admin import schedules as admin_schedules
from ..admin.dead_letters import DeadLetters
from ..app import App
from ..db.database import Database
from ..exceptions import JobNotFound, PgTasksError, ScheduleNotFound
from ..queues import QUEUE_NAME
from .security import csrf_ok

CANCEL_OUTCOMES = ("cancelled", "requested", "finished", "unknown")
"""What a cancel of one job says on its page (a code in the link, never free text)."""


class Actions:
    """The POST routes of a `Dashboard`."""

    pgtasks_app: App
    database: Database
    dead_letters: DeadLetters
    read_only: bool

    def render(
        self,
        request: Request,
        template: str,
        *,
        live: bool = False,
        status_code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        raise NotImplementedError  # Dashboard's

    async def dead_action(self, request: Request) -> Response:
        form = await _form(request)
        refused = self._refused(request, form)
        if refused is not None:
            return refused
        action, ids = _action(form)
        if action is None or not ids:
            return self.render(
                request,
                "error.html",
                status_code=400,
                message="choose at least one dead letter, and retry or purge",
            )
        base = request.scope.get("root_path", "").rstrip("/")
        back = (form.get("back") or [""])[0]
        if not back.startswith(f"{base}/dead"):
            back = f"{base}/dead"
        if action == "retry":
            try:
                pairs = await self.dead_letters.retry_by_id(ids)
            except PgTasksError as exc:
                return self.render(request, "error.html", status_code=409, message=str(exc))
            done = f"retried {len(pairs)} dead letter(s) as job(s) " + ", ".join(
                f"{ref.id} ({ref.queue})" for _, ref in pairs
            )
        elif (form.get("confirm") or [""])[0] != "yes":
            letters = [await self.dead_letters.get(i) for i in ids if i > 0]
            return self.render(request, "confirm_purge.html", letters=letters, back=back)
        else:
            deleted = await self.dead_letters.delete(ids)
            done = f"purged {len(deleted)} dead letter(s)"
        separator = "&" if "?" in back else "?"
        if back.startswith(f"{base}/dead/"):  # the letter's own page is gone now
            back, separator = f"{base}/dead", "?"
        return RedirectResponse(
            f"{back}{separator}{urlencode({'done': done})}",
            status_code=303,
        )

    async def schedule_action(self, request: Request) -> Response:
        form = await _form(request)
        refused = self._refused(request, form)
        if refused is not None:
            return refused
        chosen = [(a, form[a][0]) for a in ("pause", "resume", "trigger") if form.get(a)]
        if len(chosen) != 1:
            return self.render(
                request,
                "error.html",
                status_code=400,
                message="choose one schedule, and pause, resume or run it now",
            )
        [(action, name)] = chosen
        params: dict[str, str | int] = {}
        try:
            if action == "trigger":
                ref = await admin_schedules.trigger(self.database, name)
                if ref.deduplicated:
                    done = f"schedule {name!r}: job {ref.id} in {ref.queue} already holds this tick"
                else:
                    done = f"ran schedule {name!r} now: job {ref.id} in {ref.queue}"
                params = {"job": ref.id, "queue": ref.queue}
            elif action == "pause":
                await admin_schedules.pause(self.database, name)
                done = f"paused schedule {name!r}: its ticks are not enqueued until resumed"
            else:
                await admin_schedules.resume(self.database, name)
                done = f"resumed schedule {name!r}: it ticks again from now on"
        except ScheduleNotFound as exc:
            return self.render(
                request, "error.html", status_code=404, message=str(exc), back="schedules"
            )
        base = request.scope.get("root_path", "").rstrip("/")
        return RedirectResponse(
            f"{base}/schedules?{urlencode({'done': done, **params})}", status_code=303
        )

    async def job_cancel(self, request: Request) -> Response:
        form = await _form(request)
        refused = self._refused(request, form)
        if refused is not None:
            return refused
        queue, msg_id = job_path(request)
        [outcome] = await self._cancel(queue, [msg_id])
        if outcome == "unknown":
            raise JobNotFound(f"no job {msg_id} in queue {queue!r}: nothing to cancel")
        base = request.scope.get("root_path", "").rstrip("/")
        return RedirectResponse(
            f"{base}/jobs/{queue}/{msg_id}?{urlencode({'cancel': outcome})}", status_code=303
        )

    async def queue_cancel(self, request: Request) -> Response:
        form = await _form(request)
        refused = self._refused(request, form)
        if refused is not None:
            return refused
        ids = _ids(form.get("id") or [])
        if not ids:
            return self.render(
                request, "error.html", status_code=400, message="choose at least one job to cancel"
            )
        queue = request.path_params["queue"]
        outcomes = await self._cancel(queue, ids)
        # back to the list it came from, with a count of each outcome
        params: dict[str, str | int] = {"state": "waiting"}
        state = (form.get("state") or [""])[0]
        task = (form.get("task") or [""])[0]
        if state in admin_jobs.STATES:
            params["state"] = state
        if task:
            params["task"] = task
        params.update({o: outcomes.count(o) for o in CANCEL_OUTCOMES if o in outcomes})
        base = request.scope.get("root_path", "").rstrip("/")
        return RedirectResponse(f"{base}/queues/{queue}?{urlencode(params)}", status_code=303)

    async def _cancel(self, queue: str, ids: Sequence[int]) -> list[str]:
        if not QUEUE_NAME.fullmatch(queue):
            raise JobNotFound(f"no queue {queue!r}")
        app = self.pgtasks_app
        return list(await app.cancel(app.job(queue, i) for i in ids))

    def _refused(self, request: Request, form: Mapping[str, list[str]]) -> Response | None:
        if self.read_only:
            return self.render(
                request,
                "error.html",
                status_code=403,
                message="this dashboard is read-only: actions are turned off",
            )
        why = csrf_ok(request, dict(form))
        if why is not None:
            return self.render(request, "error.html", status_code=403, message=f"refused: {why}")
        return None


async def _form(request: Request) -> dict[str, list[str]]:
    """An ``application/x-www-form-urlencoded`` body (the only kind the pages send), without
    python-multipart."""
    body = await request.body()
    if len(body) > 1_000_000:
        return {}
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def _action(form: Mapping[str, list[str]]) -> tuple[str | None, list[int]]:
    """("retry" | "purge", ids): a one-row button (``retry_one``/``purge_one``) or a button
    for the selected rows (``action`` with the ``id`` checkboxes)."""
    for action in ("retry", "purge"):
        one = form.get(f"{action}_one")
        if one:
            return action, _ids(one)
    action = (form.get("action") or [""])[0]
    if action not in ("retry", "purge"):
        return None, []
    return action, _ids(form.get("id") or [])


def job_path(request: Request) -> tuple[str, int]:
    """A job's queue and id from its path; `JobNotFound` (a 404) for a path that can name no
    job: a queue name pgtasks refuses, an id beyond a bigint."""
    queue, msg_id = request.path_params["queue"], request.path_params["msg_id"]
    if not QUEUE_NAME.fullmatch(queue) or msg_id >= 2**63:
        raise JobNotFound(f"no job {msg_id} in queue {queue!r}")
    return queue, msg_id


def _ids(values: Sequence[str]) -> list[int]:
    return sorted({int(v) for v in values if v.isdigit() and len(v) < 19})
