"""Names that several layers share, kept at the bottom so that none of them has to import
upward to reach them: the connection a caller may hand in, the choice of what happens to a
succeeded message, and the longest delay a job may have. Internal: the public names that
use them are re-exported from `pgtasks`.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# A connection: the caller's own, or one from a pool.
Connection: TypeAlias = "asyncpg.Connection | PoolConnectionProxy"

OnSuccess = Literal["archive", "delete"]
"""What happens to a succeeded message: kept in pgmq's archive, or deleted."""

MAX_DELAY = dt.timedelta(days=3650)
"""The longest ``delay`` a job may have, and how far ahead its ``eta`` may be: ten years."""
