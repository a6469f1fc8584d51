"""A fixed set of I/O threads shared by every connection.

Connections hand requests over as callables; a worker runs the backend call (preadv,
pwritev, fdatasync and fallocate release the GIL) and sends the reply. A fixed set keeps the
thread count, like the pool, a function of configuration rather than of load.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

log = logging.getLogger("netswap.workers")

_STOP = None


class WorkerPool:
    def __init__(self, count: int, name: str = "io") -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Callable, *args) -> None:
        self._jobs.put((job, args))

    def responsive(self, timeout: float) -> bool:
        """Does a job submitted now run within `timeout`? (The watchdog's health check: a
        daemon whose workers are all wedged in I/O must stop telling systemd it is alive.)"""
        ran = threading.Event()
        self.submit(ran.set)
        return ran.wait(timeout)

    def stop(self) -> None:
        """Let queued jobs finish, then end every thread."""
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is _STOP:
                return
            job, args = item
            try:
                job(*args)
            except Exception:  # a job must never take a worker down with it
                log.exception("I/O job failed")
