"""``pgtasks worker --processes N``: one supervisor process and N worker processes.

Each worker is ``python -m pgtasks`` with the supervisor's own command line (and
``--processes 1``), started as a new program (spawn, never fork): a fork would copy the
supervisor's memory, the app it imported included, with whatever pools, threads or event
loops that module started, which asyncpg and threads do not survive. A worker started this
way is exactly what an operator would start by hand, so every guarantee of one worker
holds for each of them, and they coordinate only through PostgreSQL.

The supervisor runs no jobs and opens no connection. It:

* forwards SIGTERM and SIGINT to every worker (a second one too: the workers then stop at
  once), waits for them, and exits 0 when each stopped cleanly (1 otherwise). A worker
  that has not exited ``--shutdown-timeout`` + 30 s after the first signal is killed. A
  worker that the forwarded signal itself ended (it came before the worker installed its
  handlers, which it does before it claims anything) stopped cleanly too.
* restarts a worker that ends while it is not stopping them (a crash, ``kill -9``, the OOM
  killer, a SIGTERM sent to that worker alone) after a backoff of 1 s, 2 s, 4 s ... at
  most 30 s per slot, back to 1 s once a worker has run for a minute; each restart is
  logged. The dead worker's jobs are not lost: their leases lapse and any
  worker (its replacement, a sibling, another machine) runs them.
* with ``--burst``, does not restart a worker that exited by itself: it exits once every
  worker has, 0 if each did.
* puts the workers in a session of their own, so that a Ctrl-C in a terminal reaches the
  supervisor alone (and is forwarded once, not twice); each worker also stops gracefully
  if the supervisor dies (``kill -9``): it checks its parent every second.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

logger = logging.getLogger("pgtasks")

SUPERVISOR_PID = "PGTASKS_SUPERVISOR_PID"  # set in a worker's environment
WORKER_INDEX = "PGTASKS_WORKER_INDEX"
BACKOFF_MAX = 30.0
HEALTHY_AFTER = 60.0  # a worker that ran this long restarts after 1 s again
KILL_AFTER = 30.0  # seconds past --shutdown-timeout before a stopping worker is killed
TICK = 0.1


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: float = 1.0
    restart_at: float | None = None
    status: int | None = None  # its last exit status once it is done for good
    restarts: int = field(default=0)


class Supervisor:
    def __init__(
        self, argv: list[str], processes: int, *, burst: bool, shutdown_timeout: float
    ) -> None:
        self._command = [sys.executable, "-m", "pgtasks", *argv, "--processes", "1"]
        self._slots = [_Slot(i) for i in range(processes)]
        self._burst = burst
        self._kill_after = shutdown_timeout + KILL_AFTER
        self._signals: list[int] = []
        self._forwarded = 0
        self._stopping_since: float | None = None
        self._killed = False

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            logger.info(
                "supervisor (pid %d): starting %d worker processes", os.getpid(), len(self._slots)
            )
            for slot in self._slots:
                self._start(slot)
            while not all(slot.status is not None for slot in self._slots):
                self._forward()
                now = time.monotonic()
                for slot in self._slots:
                    self._check(slot, now)
                stopping = self._stopping_since
                if stopping is not None and now - stopping > self._kill_after and not self._killed:
                    self._killed = True
                    self._kill_all()
                time.sleep(TICK)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        failed = [s for s in self._slots if s.status != 0]
        for slot in failed:
            logger.error("worker process %d ended with status %s", slot.index, slot.status)
        logger.info("supervisor: every worker process has exited")
        return 1 if failed else 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)  # forwarded from the loop, not from the handler

    def _forward(self) -> None:
        while self._forwarded < len(self._signals):
            signum = self._signals[self._forwarded]
            self._forwarded += 1
            first = self._stopping_since is None
            if first:
                self._stopping_since = time.monotonic()
            logger.info(
                "supervisor: %s received, %s; forwarding it to the worker processes",
                signal.Signals(signum).name,
                "stopping gracefully" if first else "stopping now",
            )
            for slot in self._slots:
                slot.restart_at = None
                if slot.proc is not None and slot.proc.poll() is None:
                    slot.proc.send_signal(signum)

    def _start(self, slot: _Slot) -> None:
        env = dict(os.environ)
        env[SUPERVISOR_PID] = str(os.getpid())
        env[WORKER_INDEX] = str(slot.index)
        slot.proc = subprocess.Popen(self._command, env=env, start_new_session=True)
        slot.started_at = time.monotonic()
        slot.restart_at = None
        logger.info("worker process %d started (pid %d)", slot.index, slot.proc.pid)

    def _check(self, slot: _Slot, now: float) -> None:
        if slot.status is not None:
            return
        if slot.proc is None:  # waiting for its restart
            if self._stopping_since is not None:
                slot.status = 0  # its crash was logged; the stop itself is clean
                return
            if slot.restart_at is not None and now >= slot.restart_at:
                slot.restarts += 1
                self._start(slot)
            return
        code = slot.proc.poll()
        if code is None:
            return
        pid = slot.proc.pid
        slot.proc = None
        if self._stopping_since is not None:
            if code < 0 and -code in self._signals:
                # the forwarded signal's default action: it came before the worker could
                # handle it (Python still starting), so it had claimed nothing: clean
                logger.info(
                    "worker process %d (pid %d) ended by %s before it could handle it",
                    slot.index,
                    pid,
                    _signal_name(-code),
                )
                code = 0
            slot.status = code
            return
        if self._burst and code >= 0:
            slot.status = code  # done by itself (a burst), or a burst that failed
            return
        # not a burst: a worker ends only when told, and the supervisor told none (a signal
        # sent to the worker itself, say); N workers were asked for, so it is restarted
        if now - slot.started_at >= HEALTHY_AFTER:
            slot.backoff = 1.0
        slot.restart_at = now + slot.backoff
        logger.warning(
            "worker process %d (pid %d) %s; restarting it in %.0fs",
            slot.index,
            pid,
            f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}",
            slot.backoff,
        )
        slot.backoff = min(slot.backoff * 2, BACKOFF_MAX)

    def _kill_all(self) -> None:
        for slot in self._slots:
            if slot.proc is not None and slot.proc.poll() is None:
                logger.error(
                    "worker process %d (pid %d) has not stopped %.0fs after the signal; "
                    "killing it (its jobs come back when their leases lapse)",
                    slot.index,
                    slot.proc.pid,
                    self._kill_after,
                )
                slot.proc.kill()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def supervise(argv: list[str], processes: int, *, burst: bool, shutdown_timeout: float) -> int:
    """Run ``processes`` workers with this command line until they stop; the exit status."""
    return Supervisor(argv, processes, burst=burst, shutdown_timeout=shutdown_timeout).run()
