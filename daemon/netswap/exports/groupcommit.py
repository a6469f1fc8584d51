"""Group commit: one fdatasync answers every FLUSH that was waiting when it started.

Why: a file system on an NBD disk sends a FLUSH every few writes, from several connections
(CAN_MULTI_CONN). Run one by one on the shared workers, each FLUSH took a worker for a whole
fdatasync and the requests queued behind it waited too; the stream ran at half nbdkit's rate.
An fdatasync covers every write that completed before it started, whichever connection made
it, so FLUSHes that arrive while one sync runs can all share the next.

The rule that keeps this honest: a FLUSH is answered only after a sync that *started after it
arrived* has succeeded. It arrived after the replies of every write it must cover, and each
of those writes completed before its reply, so that sync covers them all. Hence:

* one sync at a time per backend, on its own flusher thread (never a worker, never the
  connection's reader: reads and writes behind a FLUSH go on while it syncs);
* a FLUSH that arrives while a sync runs waits for the next one, which takes every FLUSH
  waiting at its start;
* a sync may be skipped when nothing was written since the last one started: every writer
  sets `dirty` (an int shared with the C request loop) after its write completes and before
  it replies, and the flusher clears it just before syncing. A batch taken with `dirty`
  still clear has no write to cover that the previous sync (finished, successfully, or the
  backend's failure latch answers) did not. Backends whose files are also written by code
  that does not set it (NFS swap files) pass no flag and always sync.

The flusher thread exists only while FLUSHes come: it ends after `IDLE_EXIT` seconds without
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

    def __init__(self, sync: Callable[[], None], name: str, dirty=None,
                 clean: Optional[Callable[[], None]] = None) -> None:
        """`sync` makes every completed write durable (raises OSError on failure); `dirty` an
        int* every writer sets to 1 after a write, or None (always sync); `clean` what runs
        instead of `sync` when nothing was written (the failure latch's check); `name` names
        the flusher thread."""
        self._sync = sync
        self._clean = clean
        self._dirty = dirty
        self._name = name
        self._changed = threading.Condition(threading.Lock())
        self._waiting: list[Done] = []  # requests the next sync answers
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.syncs = 0  # syncs run (for tests and statistics; one writer, the flusher)
        self.skipped = 0  # batches answered without a sync (nothing written since the last)

    def request(self, done: Done) -> None:
        """Have `done(None)` called (on the flusher thread) once every write completed before
        this call is durable, or `done(error)` if that failed."""
        with self._changed:
            if self._closed:
                raise OSError(errno.EBADF, "backend is closed")
            self._waiting.append(done)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            else:
                self._changed.notify()

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
        """No more requests; the flusher answers what is waiting and ends."""
        with self._changed:
            self._closed = True
            self._changed.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _next_batch(self) -> Optional[list[Done]]:
        """Every request waiting now (the next sync covers them), or None: time to end."""
        with self._changed:
            while not self._waiting:
                if self._closed or not self._changed.wait(self.IDLE_EXIT):
                    if self._waiting:
                        break
                    self._thread = None
                    return None
            batch, self._waiting = self._waiting, []
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            error: Optional[BaseException] = None
            try:
                # Read (and clear) the flag only after the batch was taken: see the module
                # docstring for why that order makes skipping safe.
                if self._dirty is None or self._dirty[0]:
                    if self._dirty is not None:
                        self._dirty[0] = 0
                    self.syncs += 1
                    self._sync()
                else:
                    self.skipped += 1
                    if self._clean is not None:
                        self._clean()
            except Exception as exc:  # OSError from the sync; anything else is a bug, reported
                error = exc
            for done in batch:
                try:
                    done(error)
                except Exception:
                    log.exception("%s: a FLUSH completion failed", self._name)
