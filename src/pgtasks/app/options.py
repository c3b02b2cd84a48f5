"""The app's own options (`APP_OPTIONS`), checked by `App` with the database's and the task
defaults."""

from __future__ import annotations

import datetime as dt

from .._options import Duration, Flag, Number, Option, OptionSet
from .._shared import MAX_DELAY

APP_OPTIONS = OptionSet(
    Option(
        "max_message_size",
        1024 * 1024,
        "largest encoded message body, in bytes: larger arguments are refused at defer, and "
        "a worker does not load a larger body",
        Number(64, 128 * 1024 * 1024, integer=True, unit="bytes"),
        default_text="1048576 (1 MiB)",
    ),
    Option(
        "key_retention",
        dt.timedelta(days=7),
        "how long an idempotency key keeps deduplicating after its job succeeded",
        Duration(dt.timedelta(0), MAX_DELAY),
    ),
    Option(
        "archive_retention",
        dt.timedelta(days=7),
        "how long a succeeded job's message stays in its queue's archive: every worker deletes "
        "older ones from its queues (hourly; a burst worker once it has drained them), and "
        "prune from the app's queues",
        Duration(dt.timedelta(hours=1), MAX_DELAY, none="keep every archived message"),
    ),
    Option(
        "create_queues",
        True,
        "create a missing queue on enqueue (when the database allows it too); off: "
        "deferring to a queue nobody created raises QueueNotFound",
        Flag(),
    ),
    Option(
        "max_result_size",
        1024 * 1024,
        "largest result kept, in bytes (encoded): a larger one is not kept, and result() says why",
        Number(0, 128 * 1024 * 1024, integer=True, unit="bytes"),
        default_text="1048576 (1 MiB)",
    ),
    Option(
        "default",
        False,
        "make this the app that shared tasks (@pgtasks.task) defer through",
        Flag(),
    ),
)
"""The app's own options (besides the database's, `DATABASE_OPTIONS`, and the task
defaults, `TASK_DEFAULTS`)."""
