"""The command line's parser: its commands, their options and help (the building blocks are
in `arguments`)."""

from __future__ import annotations

import argparse
from typing import Any

from .._options import Flag, Number, Option, OptionSet, Text
from .._version import __version__
from ..admin import maintenance
from ..admin.jobs import STATES
from ..worker import WORKER_OPTIONS
from .arguments import (
    DOCS,
    Formatter,
    add_common,
    add_option,
    command,
    duration,
    interval,
    json_option,
    port,
    positive,
)

COMMAND_WORKER_OPTIONS = OptionSet(
    Option(
        "processes",
        1,
        "worker processes, under a supervisor that forwards signals and restarts one that "
        "dies; 1: this process is the worker",
        Number(1, 256, integer=True),
        flags=("--processes",),
        metavar="N",
    ),
    Option(
        "connect_timeout",
        60.0,
        "keep trying to reach a database that is not up yet for this long, with backoff "
        "(1 s, 2 s, ... 10 s); 0: fail at once",
        Number(0, 86_400, unit="seconds"),
        flags=("--connect-timeout",),
        metavar="SECONDS",
    ),
    Option(
        "log_jobs",
        True,
        "one INFO line per finished job: task, id, queue, attempt, outcome, duration",
        Flag(),
        flags=("--log-jobs",),
    ),
    Option(
        "metrics_port",
        None,
        "serve Prometheus metrics on this port, at /metrics (needs the metrics extra)",
        Number(1, 65_535, integer=True, none="no metrics server"),
        default_text="none",
        flags=("--metrics-port",),
        metavar="PORT",
    ),
    Option(
        "metrics_host",
        "0.0.0.0",
        "the address --metrics-port listens on (0.0.0.0: every interface)",
        Text("an address to listen on"),
        flags=("--metrics-host",),
        metavar="HOST",
    ),
)
"""The ``worker`` command's own flags, besides the worker options (`WORKER_OPTIONS`)."""


def build() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgtasks",
        description="pgtasks: a task queue on pgmq, inside your Postgres.",
        epilog="examples:\n"
        "  python -m pgtasks -A myproj.tasks:app migrate\n"
        "  python -m pgtasks -A myproj.tasks:app worker -c 20\n"
        "  python -m pgtasks dead list --dsn postgresql://app@db:5432/app\n\n"
        "'python -m pgtasks COMMAND --help' describes a command.\n"
        f"docs: {DOCS}",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"pgtasks {__version__}")
    add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = command(
        sub,
        "worker",
        "run a worker: claim and run the jobs of the app's queues",
        "python -m pgtasks worker -A myproj.tasks:app -q email,default -c 20",
        "worker",
        "SIGTERM or Ctrl-C: stop claiming, give running jobs --shutdown-timeout seconds,\n"
        "release the rest and write every outcome (at most 10 s more), exit 0. A second\n"
        "SIGTERM or Ctrl-C stops at once. In Kubernetes, set terminationGracePeriodSeconds\n"
        "to at least --shutdown-timeout + 10.",
    )
    options = worker.add_argument_group("worker options")
    for option in WORKER_OPTIONS.values():
        add_option(options, option)
    for option in COMMAND_WORKER_OPTIONS.values():
        add_option(options, option)

    migrate = command(
        sub,
        "migrate",
        "install pgmq, the pgtasks schema, the group roles' grants and the app's queues",
        "python -m pgtasks migrate -A myproj.tasks:app",
        "migrate",
        "Idempotent, in one transaction, safe to run from several processes at once.",
    )
    migrate.add_argument(
        "--sql", action="store_true", help="print the SQL it would run, and change nothing"
    )
    json_option(migrate)

    status = command(
        sub,
        "status",
        "every queue's jobs by state, rates and oldest waiting job, and the live workers",
        "python -m pgtasks status --watch",
        "status",
        "One query per refresh. A count past 50,000 is shown ~ (estimated) or + (at least).",
    )
    status.add_argument(
        "--watch",
        type=interval,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C; with --json, one line each",
    )
    json_option(status)

    doctor = command(
        sub,
        "doctor",
        "the queue tables' dead rows and sizes, what holds back vacuum, and advice",
        "python -m pgtasks doctor --horizon-age 5m",
        "doctor",
        "Exit status 0 when there is no advice, 2 when there is some.",
    )
    doctor.add_argument(
        "--horizon-age",
        type=lambda text: duration(text).total_seconds(),
        default=60.0,
        metavar="AGE",
        help="report a transaction that has held the xmin horizon this long, e.g. 30s, 5m "
        "(default: 60s)",
    )
    json_option(doctor)

    board = command(
        sub,
        "dashboard",
        "serve the web dashboard: queues, jobs, dead letters, workers",
        "python -m pgtasks dashboard -A myproj.tasks:app --port 8080",
        "dashboard",
        "Needs the dashboard extra (pip install 'pgtasks[dashboard]'). Binds to 127.0.0.1;\n"
        "another address needs --basic-auth (or PGTASKS_DASHBOARD_AUTH). Actions are POSTs\n"
        "with CSRF protection; --read-only turns them off.",
    )
    board.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)"
    )
    board.add_argument(
        "--port", type=port, default=8080, help="the port to listen on (default: 8080)"
    )
    board.add_argument(
        "--basic-auth",
        metavar="USER:PASSWORD",
        help="require HTTP basic auth (default: $PGTASKS_DASHBOARD_AUTH; none)",
    )
    board.add_argument("--read-only", action="store_true", help="show everything, allow no action")

    prune = command(
        sub,
        "prune",
        "delete expired idempotency keys, old error history, finished workflows and old "
        "archived messages",
        "python -m pgtasks prune --archive-older-than 30d",
        "prune",
        "Workers already delete archived messages past the app's archive_retention from\n"
        "their queues. Schedule this for the rest, e.g. daily from cron:\n"
        "  17 3 * * *  python -m pgtasks prune --app myproj.tasks:app",
    )
    prune.add_argument(
        "--errors-older-than",
        type=duration,
        default=maintenance.ERRORS_OLDER_THAN,
        metavar="AGE",
        help="error history to delete, e.g. 7d, 12h (default: 7d; dead letters keep theirs)",
    )
    prune.add_argument(
        "--workers-older-than",
        type=duration,
        default=maintenance.WORKERS_OLDER_THAN,
        metavar="AGE",
        help="rows of workers stopped or gone and last seen longer ago than this (default: 1d)",
    )
    prune.add_argument(
        "--workflows-older-than",
        type=duration,
        default=maintenance.WORKFLOWS_OLDER_THAN,
        metavar="AGE",
        help="workflows (with their steps) finished longer ago than this (default: 7d; a "
        "running one is kept)",
    )
    prune.add_argument(
        "--archive-older-than",
        type=duration,
        metavar="AGE",
        help="archived (succeeded) messages older than this to delete, in every queue, "
        "e.g. 30d (default: those past the app's archive_retention, 7d, in the app's "
        "queues)",
    )
    json_option(prune)

    job = sub.add_parser(
        "job",
        help="show one job, or list a queue's jobs by state",
        description="Show one job in full, or list the newest jobs of a queue.",
        epilog=f"example:\n  python -m pgtasks job show email 42\n\ndocs: {DOCS}#job",
        formatter_class=Formatter,
    )
    add_common(job)
    job_sub = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    job_show = command(
        job_sub,
        "show",
        "one job: its state, message, every failed attempt, and its result",
        "python -m pgtasks job show email 42",
        "job",
    )
    job_show.add_argument("queue", help="the job's queue")
    job_show.add_argument("id", type=int, help="the job's id (what defer returned)")
    json_option(job_show)
    job_list = command(
        job_sub,
        "list",
        "the newest jobs of a queue, by state and task",
        "python -m pgtasks job list --queue email --state failed",
        "job",
        "States: " + ", ".join(STATES) + ".\n"
        "In the queue, the next due first; once over, the newest first.",
    )
    job_list.add_argument("--queue", required=True, help="the queue")
    job_list.add_argument(
        "--state",
        choices=STATES,
        help="only jobs in this state",
    )
    job_list.add_argument("--task", help="only this task's")
    job_list.add_argument("--limit", type=positive, default=50, help="at most (default: 50)")
    json_option(job_list)

    workflow = sub.add_parser(
        "workflow",
        help="show a workflow (chain, group, chord): its steps, their states and timings",
        description="Show a workflow (chain, group or chord): its steps, their states and timings.",
        epilog=f"example:\n  python -m pgtasks workflow show 12\n\ndocs: {DOCS}#workflow",
        formatter_class=Formatter,
    )
    add_common(workflow)
    workflow_sub = workflow.add_subparsers(dest="workflow_command", required=True, metavar="ACTION")
    workflow_show = command(
        workflow_sub,
        "show",
        "one workflow: its state, and every step's task, job, state and timings",
        "python -m pgtasks workflow show 12",
        "workflow",
        "Steps are counted from 0, as in WorkflowStatus; a chord's callback is its last.\n"
        "A step's state is its job's while it is in its queue (waiting, running, retrying).\n"
        "Exit status 1 when the id names no workflow.",
    )
    workflow_show.add_argument("id", type=int, help="the workflow's id (WorkflowRef.id)")
    json_option(workflow_show)

    cancel = command(
        sub,
        "cancel",
        "cancel jobs: those not started are removed, running ones are asked to stop",
        "python -m pgtasks cancel email 42 43",
        "cancel",
        "Exit status 1 when an id names no job.",
    )
    cancel.add_argument("queue", help="the jobs' queue")
    cancel.add_argument("ids", type=int, nargs="+", metavar="ID", help="job ids")
    json_option(cancel)

    dead = sub.add_parser(
        "dead",
        help="list, show, retry and purge dead letters",
        description="List, show, retry and purge dead letters.",
        epilog=f"example:\n  python -m pgtasks dead list --queue email\n\ndocs: {DOCS}#dead",
        formatter_class=Formatter,
    )
    add_common(dead)
    dead_sub = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    dead_list = command(
        dead_sub,
        "list",
        "the newest dead letters, one line each",
        "python -m pgtasks dead list --queue email --limit 20",
        "dead",
    )
    dead_list.add_argument("--queue", help="only this queue's")
    dead_list.add_argument("--task", help="only this task's")
    dead_list.add_argument("--limit", type=positive, default=50, help="at most (default: 50)")
    json_option(dead_list)
    dead_show = command(
        dead_sub,
        "show",
        "one dead letter: body, headers and every attempt's error",
        "python -m pgtasks dead show 42",
        "dead",
    )
    dead_show.add_argument("id", type=int, help="the dead letter's id (from dead list)")
    json_option(dead_show)
    dead_retry = command(
        dead_sub,
        "retry",
        "enqueue dead letters again, as new jobs with fresh attempts",
        "python -m pgtasks dead retry 42 43",
        "dead",
        "All or nothing: an id that is not a dead letter is an error, and nothing is retried.",
    )
    dead_retry.add_argument("ids", type=int, nargs="*", metavar="ID", help="dead letter ids")
    dead_retry.add_argument("--all", action="store_true", help="every dead letter (of --queue)")
    dead_retry.add_argument("--queue", help="only this queue's")
    json_option(dead_retry)
    dead_purge = command(
        dead_sub,
        "purge",
        "delete dead letters: without --older-than, every one (of --queue)",
        "python -m pgtasks dead purge --older-than 30d",
        "dead",
        "Without --older-than it deletes every dead letter (of --queue), so it asks first\n"
        "when stdin is a terminal and refuses without --yes when it is not.",
    )
    dead_purge.add_argument(
        "--older-than", type=duration, metavar="AGE", help="only those older, e.g. 7d, 12h, 30m"
    )
    dead_purge.add_argument("--queue", help="only this queue's")
    dead_purge.add_argument(
        "-y", "--yes", action="store_true", help="do not ask before deleting every dead letter"
    )
    _add_schedule_commands(sub)
    return parser


def _add_schedule_commands(sub: Any) -> None:
    """``scheduler`` (the scheduler alone) and ``schedules`` (list, pause, resume, trigger,
    delete)."""
    scheduler = command(
        sub,
        "scheduler",
        "run the scheduler of the app's periodic jobs alone, without running jobs",
        "python -m pgtasks scheduler -A myproj.tasks:app",
        "scheduler",
        "Every worker runs one already (unless --no-schedule); any number may run at once,\n"
        "and each tick still becomes exactly one job. SIGTERM or Ctrl-C stops it.",
    )
    add_option(scheduler, COMMAND_WORKER_OPTIONS["connect_timeout"])
    schedules = sub.add_parser(
        "schedules",
        help="list the periodic jobs; pause, resume, trigger or delete one",
        description="List the periodic jobs (the default action); pause, resume, trigger "
        "or delete one.",
        epilog="examples:\n  python -m pgtasks schedules\n"
        "  python -m pgtasks schedules pause nightly-report\n\n"
        f"docs: {DOCS}#schedules",
        formatter_class=Formatter,
    )
    add_common(schedules)
    json_option(schedules)
    actions = schedules.add_subparsers(dest="schedules_command", metavar="ACTION")
    listing = command(
        actions,
        "list",
        "every schedule: expression, time zone, state, next and last tick, last job",
        "python -m pgtasks schedules list --json",
        "schedules",
    )
    json_option(listing, suppress=True)
    for action, summary, details in (
        ("pause", "stop enqueueing a schedule's ticks", ""),
        (
            "resume",
            "enqueue a paused schedule's ticks again, from now on",
            "The ticks of the pause are not caught up.",
        ),
        (
            "trigger",
            "enqueue a schedule's job once, now",
            "Its scheduled_at is the database's now; the schedule's own ticks are not\n"
            "affected, and a paused schedule can be triggered.",
        ),
        (
            "delete",
            "forget a schedule's row (for orphaned schedules)",
            "A schedule that running schedulers still define is written again by them.",
        ),
    ):
        one = command(
            actions,
            action,
            summary,
            f"python -m pgtasks schedules {action} nightly-report",
            "schedules",
            details,
        )
        one.add_argument("name", help="the schedule's name (from schedules list)")
        json_option(one, suppress=True)
