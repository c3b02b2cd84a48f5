"""What the commands print: JSON for scripts (``--json``), and dead letters as text (a table
of one line each, or one letter in full). Text from a task or a producer is shortened to one
line, with control characters as spaces.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import orjson

from ..admin.dead_letters import DeadLetter


def print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def one_line(text: str, width: int) -> str:
    """Untrusted text as one line of at most ``width`` characters (see `_shorten`)."""
    return _shorten(text, width)


def _shorten(text: str, width: int) -> str:
    """One line of at most ``width`` characters: the first line, control characters as
    spaces, ``...`` where something was cut."""
    lines = text.strip().splitlines() or [""]
    line = "".join(c if c.isprintable() else " " for c in lines[0])
    if len(lines) == 1 and len(line) <= width:
        return line
    return line[: max(width - 3, 0)] + "..."


def summary_json(d: DeadLetter) -> dict[str, Any]:
    return {
        "id": d.id,
        "queue": d.queue,
        "msg_id": d.msg_id,
        "task": d.task,
        "attempts": d.attempts,
        "enqueued_at": d.enqueued_at,
        "failed_at": d.failed_at,
        "reason": d.reason,
    }


def dead_table(letters: Sequence[DeadLetter], columns: int) -> list[str]:
    """``dead list`` as a table of one line per letter, at most ``columns`` wide where the
    reason allows (it gets what the other columns leave, at least 20 characters)."""
    header = ("id", "queue", "task", "tries", "failed at (UTC)", "reason")
    rows = [
        (
            str(d.id),
            d.queue,
            _shorten(d.task or "?", 48),
            str(d.attempts),
            f"{d.failed_at.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S}",
            d.reason,
        )
        for d in letters
    ]
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(5)]
    reason_width = max(20, columns - sum(widths) - 2 * 5 - 1)
    lines = []
    for row in [header, *rows]:
        id_, queue, task, tries, failed, reason = row
        lines.append(
            f"{id_:>{widths[0]}}  {queue:<{widths[1]}}  {task:<{widths[2]}}  "
            f"{tries:>{widths[3]}}  {failed:<{widths[4]}}  {_shorten(reason, reason_width)}"
        )
    return lines


def print_letter(d: DeadLetter) -> None:
    print(f"dead letter {d.id}: job {d.msg_id} in queue {d.queue}, task {d.task or '?'}")
    print(
        f"  enqueued {d.enqueued_at:%Y-%m-%d %H:%M:%S%z}, failed {d.failed_at:%Y-%m-%d %H:%M:%S%z}"
    )
    print(f"  attempts: {d.attempts}")
    print(f"  reason: {d.reason}")
    print(f"  message: {orjson.dumps(d.message).decode()}")
    if d.headers:
        print(f"  headers: {orjson.dumps(d.headers).decode()}")
    for h in d.history:
        print(
            f"  attempt {h.attempt} on {h.worker} at {h.failed_at:%Y-%m-%d %H:%M:%S%z}: "
            f"{h.error_type}: {h.message}"
        )
        if h.traceback:
            print("    " + h.traceback.rstrip().replace("\n", "\n    "))
