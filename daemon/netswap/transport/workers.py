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
    """Jobs per flow, handed out by deficit round robin; get() blocks until there is one.

    A flow may also run on at most `flow_limit` workers at once. Round robin alone decides
    who goes next, but a storm's writes can each block for milliseconds (the kernel throttles
    writers of dirty page cache), and with every worker inside one of them the next node's
    request waits however fair its turn. The limit keeps workers free for other flows.
    """

    def __init__(self, flow_limit: int, quantum: int = QUANTUM) -> None:
        self._flow_limit = flow_limit
        self._quantum = quantum
        self._ready = threading.Condition(threading.Lock())
        self._flows: dict[Hashable, deque] = {}  # flow -> its queued (cost, item)
        self._turns: deque = deque()  # flows with work queued, in round-robin order
        self._deficit: dict[Hashable, int] = {}
        self._running: dict[Hashable, int] = {}  # flow -> jobs being run now
        self._closed = False

    def put(self, flow: Hashable, cost: int, item) -> None:
        with self._ready:
            queued = self._flows.get(flow)
            if queued is None:
                queued = self._flows[flow] = deque()
                self._deficit[flow] = 0
                self._turns.append(flow)
            queued.append((max(cost, MIN_COST), item))
            if len(self._turns) == 1 and len(queued) == 1:
                self._begin_turn()
            self._ready.notify()

    def get(self) -> tuple:
        """(flow, job) for the next job, or (None, `_STOP`) once closed and empty.
        The caller reports the job's end with done(flow)."""
        with self._ready:
            at_limit = 0  # flows passed over in a row because they run on flow_limit workers
            while True:
                if not self._turns:
                    if self._closed:
                        return None, _STOP
                    self._ready.wait()
                    continue
                if at_limit >= len(self._turns):
                    self._ready.wait()  # until a job ends (done) or new work arrives (put)
                    at_limit = 0
                    continue
                flow = self._turns[0]
                if self._running.get(flow, 0) >= self._flow_limit:
                    at_limit += 1
                elif self._deficit[flow] >= self._flows[flow][0][0]:
                    return flow, self._take(flow)
                else:
                    at_limit = 0  # it may run, it only needs more turns for a large job
                # This flow has spent its quantum (or may not run more now): the next one's turn.
                self._turns.rotate(-1)
                self._begin_turn()

    def done(self, flow: Hashable) -> None:
        with self._ready:
            self._running[flow] -= 1
            if not self._running[flow]:
                del self._running[flow]
            self._ready.notify()

    def close(self) -> None:
        """Let get() return `_STOP` once everything queued has been handed out."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _take(self, flow: Hashable):
        queued = self._flows[flow]
        cost, item = queued.popleft()
        self._deficit[flow] -= cost
        self._running[flow] = self._running.get(flow, 0) + 1
        if not queued:
            # An idle flow keeps no credit: it cannot save up for a burst.
            self._turns.popleft()
            del self._flows[flow], self._deficit[flow]
            self._begin_turn()
        return item

    def _begin_turn(self) -> None:
        # The flow at the head has a turn: one more quantum to spend, but no more credit than
        # its next job needs, so a flow passed over while at its limit cannot hoard turns.
        if self._turns:
            flow = self._turns[0]
            head_cost = self._flows[flow][0][0]
            self._deficit[flow] = min(self._deficit[flow] + self._quantum,
                                      max(self._quantum, head_cost))

    def __len__(self) -> int:
        with self._ready:
            return sum(len(queued) for queued in self._flows.values())


class WorkerPool:
    def __init__(self, count: int, name: str = "io") -> None:
        # Every flow leaves one worker to the others (a lone worker is shared, not reserved).
        self._jobs = FairQueue(flow_limit=max(1, count - 1))
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
            flow, item = self._jobs.get()
            if item is _STOP:
                return
            job, args = item
            try:
                job(*args)
            except Exception:  # a job must never take a worker down with it
                log.exception("I/O job failed")
            finally:
                self._jobs.done(flow)
