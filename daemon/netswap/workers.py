"""A fixed set of I/O threads shared by every connection, shared fairly between nodes.

Connections hand requests over as callables; a worker runs the backend call (preadv,
pwritev, fdatasync and fallocate release the GIL) and sends the reply. A fixed set keeps the
thread count, like the pool, a function of configuration rather than of load.

Fairness: one node's swap storm must not starve the others. Jobs are queued per flow (a
swap node, or a client of the static exports) and workers take them by deficit round robin
(Shreedhar and Varghese, 1995): each flow with work queued gets, in turn, a quantum of bytes
to spend, so a node with 128 large writes queued delays another node's 4 KiB read by about
one request, not by its whole queue, and flows share the workers in proportion to bytes,
not to how many requests they manage to queue.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable, Hashable

log = logging.getLogger("netswap.workers")

_STOP = None
# The bytes a flow may spend per turn. One large swap request (128 KiB is the Linux nbd
# driver's usual maximum) fits, so a flow of large requests still gets one per turn.
QUANTUM = 128 * 1024
# What a request without a payload (FLUSH, TRIM, a control job) costs in the round robin:
# its work is not proportional to its length.
MIN_COST = 4096


class FairQueue:
    """Jobs per flow, handed out by deficit round robin; get() blocks until there is one."""

    def __init__(self, quantum: int = QUANTUM) -> None:
        self._quantum = quantum
        self._ready = threading.Condition(threading.Lock())
        self._flows: dict[Hashable, deque] = {}  # flow -> its queued (cost, item)
        self._turns: deque = deque()  # flows with work queued, in round-robin order
        self._deficit: dict[Hashable, int] = {}
        self._closed = False

    def put(self, flow: Hashable, cost: int, item) -> None:
        with self._ready:
            queued = self._flows.get(flow)
            if queued is None:
                queued = self._flows[flow] = deque()
                self._deficit[flow] = 0
                self._turns.append(flow)
                if len(self._turns) == 1:
                    self._begin_turn()
            queued.append((max(cost, MIN_COST), item))
            self._ready.notify()

    def get(self):
        """The next job, or `_STOP` once the queue is closed and empty."""
        with self._ready:
            while not self._turns:
                if self._closed:
                    return _STOP
                self._ready.wait()
            while True:
                flow = self._turns[0]
                queued = self._flows[flow]
                cost, item = queued[0]
                if self._deficit[flow] >= cost:
                    self._deficit[flow] -= cost
                    queued.popleft()
                    if not queued:
                        # An idle flow keeps no credit: it cannot save up for a burst.
                        self._turns.popleft()
                        del self._flows[flow], self._deficit[flow]
                        self._begin_turn()
                    return item
                # This flow has spent its quantum: the next flow's turn.
                self._turns.rotate(-1)
                self._begin_turn()

    def close(self) -> None:
        """Let get() return `_STOP` once everything queued has been handed out."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _begin_turn(self) -> None:
        # The flow at the head has a turn: it may spend one more quantum.
        if self._turns:
            self._deficit[self._turns[0]] += self._quantum

    def __len__(self) -> int:
        with self._ready:
            return sum(len(queued) for queued in self._flows.values())


class WorkerPool:
    def __init__(self, count: int, name: str = "io") -> None:
        self._jobs = FairQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Callable, *args) -> None:
        """Run a job that belongs to no flow (health checks): it queues as a flow of its own."""
        self._jobs.put(None, MIN_COST, (job, args))

    def submit_for(self, flow: Hashable, cost: int, job: Callable, *args) -> None:
        """Run `job(*args)` on behalf of `flow`, charged `cost` bytes of its fair share."""
        self._jobs.put(flow, cost, (job, args))

    def responsive(self, timeout: float) -> bool:
        """Does a job submitted now run within `timeout`? (The watchdog's health check: a
        daemon whose workers are all wedged in I/O must stop telling systemd it is alive.)"""
        ran = threading.Event()
        self.submit(ran.set)
        return ran.wait(timeout)

    def stop(self) -> None:
        """Let queued jobs finish, then end every thread."""
        self._jobs.close()
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
