"""The heartbeat: a worker says who it is and that it is alive, in ``pgtasks.workers``.

One upsert when it starts and one every ``interval`` seconds (host, pid, queues, concurrency,
jobs running, version, jobs by outcome since it started), never one per job; one update
when it stops. Readers (``pgtasks status``, the dashboard) show a worker that missed three
heartbeats as gone, and ``pgtasks prune`` deletes old rows.

It writes on the completer's connection, between two flushes (`Completer.connection`): not
the app's pool, which task code may exhaust, and no connection of its own. A heartbeat that
fails is logged (classified once, `db.errors.classify`) and tried again at the next tick: it
never stops the worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager

import anyio
import asyncpg

from .._version import __version__
from ..db import workers
from ..db.errors import ErrorKind, classify

logger = logging.getLogger("pgtasks")

HEARTBEAT_INTERVAL = 5.0
"""Seconds between a worker's heartbeats (``Worker.heartbeat_interval``)."""


class Heartbeat:
    def __init__(
        self,
        connection: Callable[[], AbstractAsyncContextManager[asyncpg.Connection]],
        *,
        worker_id: uuid.UUID,
        queues: Sequence[str],
        concurrency: int,
        running: Callable[[], int],
        stats: Callable[[], Mapping[str, int]],
        interval: float = HEARTBEAT_INTERVAL,
    ) -> None:
        self.id = worker_id
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._connection = connection
        self._queues = list(queues)
        self._concurrency = concurrency
        self._running = running
        self._stats = stats
        self.interval = interval
        self.failing: str | None = None  # the last error, while beats fail
        # a beat in flight when the worker stops must not land after the stop's row (it
        # would mark the worker alive again): the stop waits for it, and no beat follows
        self._writing = anyio.Lock()
        self._stopped = False

    async def run(self) -> None:
        """Beat every ``interval`` seconds until cancelled (the first beat is `beat`'s)."""
        while True:
            await anyio.sleep(self.interval)
            await self.beat()

    async def beat(self) -> bool:
        """One heartbeat; False (logged) when it could not be written."""
        try:
            with anyio.fail_after(max(self.interval, 2.0)):
                async with self._writing, self._connection() as conn:
                    if self._stopped:
                        return True
                    await workers.worker_beat(
                        conn,
                        self.id,
                        host=self.host,
                        pid=self.pid,
                        queues=self._queues,
                        concurrency=self._concurrency,
                        running=self._running(),
                        version=__version__,
                        interval=self.interval,
                        stats=self._stats(),
                    )
        except Exception as exc:
            self._failed(exc)
            return False
        if self.failing is not None:
            logger.info("worker heartbeat written again")
            self.failing = None
        return True

    async def stopped(self) -> None:
        """Record a clean stop (shielded, at most 2 s; a failure is only logged)."""
        self._stopped = True
        with anyio.move_on_after(2.0, shield=True), contextlib.suppress(Exception):
            try:
                async with self._writing, self._connection() as conn:
                    await workers.worker_stopped(conn, self.id, self._stats())
            except Exception as exc:
                self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        kind = classify(exc)
        if text != self.failing:  # the first failure, or another one: not every tick
            level = logging.WARNING if kind is ErrorKind.TRANSIENT else logging.ERROR
            logger.log(
                level,
                "worker heartbeat failed (%s, %s); the worker goes on, and tries again in %.0fs%s",
                kind.value,
                text,
                self.interval,
                ""
                if kind is ErrorKind.TRANSIENT
                else " (run 'pgtasks migrate' or check the role's grants on pgtasks.workers)",
            )
        self.failing = text
