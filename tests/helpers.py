"""Helpers shared by the test modules."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import anyio

import pgtasks
from pgtasks import JobEvent


class Events:
    """Collects a worker's events; `until` waits for a condition on them."""

    def __init__(self, worker: pgtasks.Worker) -> None:
        self.seen: list[JobEvent] = []
        self.counts: Counter[str] = Counter()
        self._changed = asyncio.Event()
        worker.subscribe(self._on)

    def _on(self, event: JobEvent) -> None:
        self.seen.append(event)
        self.counts[event.kind] += 1
        self._changed.set()

    async def until(self, check: Callable[[], bool], timeout: float = 20.0) -> None:
        with anyio.fail_after(timeout):
            while not check():
                self._changed.clear()
                await self._changed.wait()

    def of(self, kind: str) -> list[JobEvent]:
        return [e for e in self.seen if e.kind == kind]
