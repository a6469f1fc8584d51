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
* a sync may be skipped when nothing was written since the last one started: every writer
  sets `dirty` (an int shared with the C request loop) after its write completes and before
  it replies, and a flusher clears it just before syncing. A batch taken with `dirty` still
  clear has no write to cover that the latest sync begun does not; it is answered when that
  sync ends (at once if it has). Backends whose files are also written by code that does
  not set the flag (NFS swap files) pass none and always sync.

The file backend (backends.py) passes no `dirty` here: its skip-when-clean decision is made
in its `sync`, by cext/commit.c, whose record of running syncs it shares with the NBD C loop
that serves plain FLUSHes on the connections' threads (one record, so neither side skips on
a flag the other cleared for a sync still running). Its batching, threads and overlap stay
here for the FLUSHes Python serves.

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


class _Sync:
    """One sync begun: the FLUSHes that joined it after it started, and whether it ended."""

    def __init__(self) -> None:
        self.ended = False
        self.error: Optional[BaseException] = None
        self.joined: list[Done] = []


class GroupCommit:
    IDLE_EXIT = 2.0  # seconds a flusher thread waits for the next FLUSH before it ends
    CONCURRENT = 4  # syncs of one backend that may overlap

    def __init__(self, sync: Callable[[], None], name: str, dirty=None,
                 clean: Optional[Callable[[], None]] = None) -> None:
        """`sync` makes every completed write durable (raises OSError on failure); `dirty` an
        int* every writer sets to 1 after a write, or None (always sync); `clean` what runs
        before answering a batch that needed no sync (the failure latch's check); `name`
        names the flusher threads."""
        self._sync = sync
        self._clean = clean
        self._dirty = dirty
        self._name = name
        self._changed = threading.Condition(threading.Lock())
        self._waiting: list[Done] = []  # requests the next sync answers
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # flusher threads waiting for work
        self._latest: Optional[_Sync] = None  # the sync begun last
        self._closed = False
        self.syncs = 0  # syncs begun (for statistics and tests; counted under the lock)
        self.skipped = 0  # batches answered without a sync of their own

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

    def _next(self) -> Optional[tuple[list[Done], Optional[_Sync]]]:
        """The requests waiting now and the sync begun for them (None: they need none, the
        `clean` check answers them), or None: this flusher ends."""
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
            # Read (and clear) the flag only after the batch was taken: see the module
            # docstring for why that order makes skipping safe.
            latest = self._latest
            if (self._dirty is not None and not self._dirty[0]
                    and (latest is None or latest.error is None)):  # a failed one: sync again
                if latest is not None and not latest.ended:
                    latest.joined.extend(batch)  # answered when that sync ends
                    self.skipped += 1
                    return [], None
                self.skipped += 1
                return batch, None
            if self._dirty is not None:
                self._dirty[0] = 0
            begun = self._latest = _Sync()
            self.syncs += 1
            return batch, begun

    def _run(self) -> None:
        while True:
            taken = self._next()
            if taken is None:
                return
            batch, begun = taken
            error: Optional[BaseException] = None
            try:
                if begun is not None:
                    self._sync()
                elif batch and self._clean is not None:
                    self._clean()
            except Exception as exc:  # OSError from the sync; anything else is a bug, reported
                error = exc
            if begun is not None:
                with self._changed:
                    begun.ended, begun.error = True, error
                    batch = batch + begun.joined
            for done in batch:
                try:
                    done(error)
                except Exception:
                    log.exception("%s: a FLUSH completion failed", self._name)
