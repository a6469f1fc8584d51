"""Group commit: one fdatasync answers every FLUSH that was waiting when it started.

Why: a file system on an NBD disk sends a FLUSH every few writes, from several connections
(CAN_MULTI_CONN). Run on the shared workers, each FLUSH took a worker for a whole fdatasync
and waited for a sync of its own. An fdatasync covers every write that completed before it
started, whichever connection made it, so FLUSHes waiting together can share one.

The rule that keeps this honest: a FLUSH is answered only after a sync that *started after it
arrived* has succeeded. It arrived after the replies of every write it must cover, and each
of those writes completed before its reply, so that sync covers them all. Hence:

* syncs run on the backend's flusher threads (never a worker, never the connection's
  reader: reads and writes behind a FLUSH go on while it syncs); each takes every FLUSH
  waiting when it starts;
* up to `CONCURRENT` syncs of one backend overlap. A FLUSH that arrives while one runs may
  not use it, and waiting for it to end before starting the next doubled a FLUSH's latency:
  measured, the FLUSH-heavy bench row fell from 0.76x to 0.22x nbdkit with one sync at a
  time. Overlapping fdatasyncs of one file cost little more than one (ext4's journal
  commits them together), so a FLUSH starts a sync at once unless `CONCURRENT` run;
* a sync is not skipped here when nothing was written since the last one began: that decision
  needs one record of the syncs running that the NBD C loop (which serves plain FLUSHes on
  the connections' threads) shares, so it is made in the backend's `sync`, by cext/commit.c
  (commit.h says how). The batching, threads and overlap here are for the FLUSHes Python
  serves, NFS COMMITs and closing.

Flusher threads exist only while FLUSHes come: each ends after `IDLE_EXIT` seconds without
one, so a swap node's backend (the kernel's swap never flushes) costs no thread.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import Callable, Optional

log = logging.getLogger(__name__)

Done = Callable[[Optional[BaseException]], None]


class GroupCommit:
    IDLE_EXIT = 2.0  # seconds a flusher thread waits for the next FLUSH before it ends
    CONCURRENT = 4  # syncs of one backend that may overlap

    def __init__(self, sync: Callable[[], None], name: str) -> None:
        """`sync` makes every completed write durable (raises OSError on failure); `name`
        names the flusher threads."""
        self._sync = sync
        self._name = name
        self._changed = threading.Condition(threading.Lock())
        self._waiting: list[Done] = []  # requests the next sync answers
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # flusher threads waiting for work
        self._closed = False
        self.syncs = 0  # sync calls begun (for tests; counted under the lock; the backend's
        # `sync` may find nothing to do, see above)

    def request(self, done: Done) -> None:
        """Have `done(None)` called (on a flusher thread) once every write completed before
        this call is durable, or `done(error)` if that failed."""
        with self._changed:
            if self._closed:
                raise OSError(errno.EBADF, "backend is closed")
            self._waiting.append(done)
            if self._idle:
                self._changed.notify()
            elif len(self._threads) < self.CONCURRENT:
                thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._threads.add(thread)
                thread.start()
            # else: every flusher is syncing; the first to end takes this batch

    def sync(self) -> None:
        """request() for a caller that waits (NFS COMMIT, closing the registry): returns once
        the writes completed before it are durable, or raises what the sync raised."""
        finished = threading.Event()
        outcome: list[Optional[BaseException]] = []

        def done(error: Optional[BaseException]) -> None:
            outcome.append(error)
            finished.set()

        self.request(done)
        finished.wait()
        if outcome[0] is not None:
            raise outcome[0]

    def close(self) -> None:
        """No more requests; the flushers answer what is waiting and end."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            threads = [t for t in self._threads if t is not threading.current_thread()]
        for thread in threads:
            thread.join()

    def _next(self) -> Optional[list[Done]]:
        """The requests waiting now, for one sync that begins now; None: this flusher ends."""
        me = threading.current_thread()
        with self._changed:
            while not self._waiting:
                if self._closed:
                    self._threads.discard(me)
                    return None
                self._idle += 1
                woken = self._changed.wait(self.IDLE_EXIT)
                self._idle -= 1
                if not woken and not self._waiting:
                    self._threads.discard(me)
                    return None
            batch, self._waiting = self._waiting, []
            self.syncs += 1
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next()
            if batch is None:
                return
            error: Optional[BaseException] = None
            try:
                self._sync()
            except Exception as exc:  # OSError from the sync; anything else is a bug, reported
                error = exc
            for done in batch:
                try:
                    done(error)
                except Exception:
                    log.exception("%s: a FLUSH completion failed", self._name)
