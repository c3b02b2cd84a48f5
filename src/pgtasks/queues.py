"""Queue names.

pgtasks accepts ``^[a-z][a-z0-9_]{0,39}$`` only: pgmq lowercases table names but not its
metadata (so mixed case breaks notifications), quotes other characters into odd table names,
and caps names at 47 characters. The same rule is enforced in SQL (pgtasks.check_queue_name).
"""

from __future__ import annotations

import re

from .exceptions import QueueNameError

QUEUE_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def check_queue_name(name: object) -> str:
    """Return ``name`` if pgtasks accepts it as a queue name, else raise `QueueNameError`."""
    if not isinstance(name, str) or not QUEUE_NAME.fullmatch(name):
        raise QueueNameError(
            f"invalid queue name {name!r}: use 1 to 40 characters of a-z, 0-9 and _, "
            "starting with a letter"
        )
    return name
