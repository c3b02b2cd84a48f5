"""The listener: one dedicated LISTEN connection per worker, outside the pool.

Producers send ``NOTIFY pgtasks, '<queue>'`` once per transaction. A notification is only a
hint that a queue may have work: the fetcher reads until the queue is drained, and a timer
and a safety poll cover what never notifies (delays, retries, expired leases) and what was
missed. The connection is watched two ways, a termination callback and a periodic
``SELECT 1``; when it dies the listener reconnects with backoff and, after every
(re)connect, wakes the fetcher for a full read pass, since notifications sent while it was
away are gone. The same connection hears requests to cancel running jobs (channel
``pgtasks_cancel``, payload ``queue:msg_id``); a missed one is caught at the job's next
lease extension.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskStatus

from ..db.connect import connect, ping
from ..db.results import CANCEL_CHANNEL
from ..db.sql import NOTIFY_CHANNEL

logger = logging.getLogger("pgtasks")


class Listener:
    def __init__(
        self,
        dsn: Callable[[], Awaitable[str]],
        on_wake: Callable[[str | None], None],
        on_cancel: Callable[[str], None] = lambda _payload: None,
        *,
        health_interval: float = 10.0,
        max_backoff: float = 1.0,
    ) -> None:
        self._dsn = dsn
        self._on_wake = on_wake
        self._on_cancel = on_cancel
        self._health_interval = health_interval
        self._max_backoff = max_backoff
        self.connected = False
        self.ever_connected = False
        self.reconnects = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled. The first connection's failure is raised (the worker
        cannot start); later failures are logged and retried with backoff."""
        backoff = 0.1
        status: TaskStatus[None] | None = task_status
        while True:
            try:
                await self._listen_once(status)
            except Exception as exc:  # a loop that restarts with backoff
                if not self.ever_connected:
                    raise
                logger.warning("listener connection lost (%s); reconnecting in %.1fs", exc, backoff)
            status = None
            if self.connected:  # it had been up: start the backoff afresh
                backoff = 0.1
            self.connected = False
            # short and jittered: back within about a second of the server's return, without
            # every worker reconnecting in step
            await anyio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self._max_backoff)
            self.reconnects += 1

    async def _listen_once(self, task_status: TaskStatus[None] | None) -> None:
        conn = await connect(
            await self._dsn(), server_settings={"application_name": "pgtasks-listener"}
        )
        lost = anyio.Event()

        def on_notify(_c: Any, _pid: int, _channel: str, payload: object) -> None:
            self._on_wake(str(payload) if payload else None)

        def on_cancel(_c: Any, _pid: int, _channel: str, payload: object) -> None:
            self._on_cancel(str(payload))

        def on_terminate(_c: Any) -> None:
            lost.set()

        try:
            conn.add_termination_listener(on_terminate)
            await conn.add_listener(NOTIFY_CHANNEL, on_notify)
            await conn.add_listener(CANCEL_CHANNEL, on_cancel)
            self.connected = self.ever_connected = True
            if task_status is not None:
                task_status.started()
            else:
                logger.info("listener reconnected")
            self._on_wake(None)  # catch up on whatever was sent while we were away
            while True:
                with anyio.move_on_after(self._health_interval):
                    await lost.wait()
                if lost.is_set():
                    raise OSError("the LISTEN connection was closed")
                with anyio.fail_after(5):
                    await ping(conn)
        finally:
            if not conn.is_closed():
                conn.terminate()
