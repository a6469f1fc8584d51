"""Executing one connection's requests on its export, replying, and accounting for them.

Runs on the shared worker threads (and, for requests refused or handed back by the C loop,
on the connection's reader). `run_on_backend` maps a request onto the export's backend; an
`Execution` turns what it did into the reply (a BLOCK_STATUS's descriptors are written into
its pool buffer, as a READ's data is read into one), hands that to the connection's
`ReplySender`, and once the reply is sent (or the client is gone) releases what the request
held (its buffer, its pressure throttle, its in-flight slot) and records it in the request
statistics.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Optional

from ..counters import declare
from . import constants as C
from .errors import nbd_error_from_os
from .transmission import (DESCRIPTOR_SIZE, MAX_EXTENTS, Request, block_status_header,
                           encode_extents, reply_header)

if TYPE_CHECKING:
    from ..counters import Counters
    from ..transport.sender import ReplySender

BACKEND_ERRORS = declare(
    "nbd", "io_errors", "netswap_backend_errors_total",
    "Requests the backing storage refused or failed, by request:NBD errno.",
    label="request")

log = logging.getLogger("netswap.nbd")


def run_on_backend(backend, request: Request, view: Optional[memoryview]):
    """Do what `request` asks on `backend`; `view` is the request's buffer (READ fills it,
    WRITE's payload is in it). Returns BLOCK_STATUS's allocation runs, else None. Raises
    what the backend raises."""
    command = request.command
    fua = bool(request.flags & C.CMD_FLAG_FUA)
    if command == C.CMD_READ:
        backend.read_into(request.offset, view)
    elif command == C.CMD_WRITE:
        backend.write_from(request.offset, view, fua)
    elif command == C.CMD_FLUSH:
        backend.flush()
    elif command == C.CMD_TRIM:
        backend.trim(request.offset, request.length, fua)
    elif command == C.CMD_WRITE_ZEROES:
        may_trim = not request.flags & C.CMD_FLAG_NO_HOLE
        fast = bool(request.flags & C.CMD_FLAG_FAST_ZERO)
        backend.write_zeroes(request.offset, request.length, may_trim, fua, fast=fast)
    elif command == C.CMD_CACHE:
        backend.cache(request.offset, request.length)
    elif command == C.CMD_BLOCK_STATUS:
        # With REQ_ONE one run is all the reply may carry: no need to find more.
        limit = 1 if request.flags & C.CMD_FLAG_REQ_ONE else MAX_EXTENTS
        return backend.allocation(request.offset, request.length, limit)
    return None


class Execution:
    def __init__(self, counters: Counters, peer: str, export, sender: ReplySender,
                 structured: bool, inflight: threading.BoundedSemaphore,
                 allocation_context: Optional[int] = None) -> None:
        self._counters = counters
        self._peer = peer
        self._export = export
        self._sender = sender
        self._structured = structured  # structured replies negotiated
        self._inflight = inflight  # one slot per request between "read" and "replied"
        self._allocation_context = allocation_context  # base:allocation's id, if selected

    def execute(self, request: Request, buffer, throttle, started: int) -> None:
        """Run `request` (a worker job) and queue its reply."""
        error = 0
        data = header = None
        try:
            view = buffer.view if buffer is not None else None
            runs = run_on_backend(self._export.backend, request, view)
            if request.command == C.CMD_READ:
                data = view
            elif request.command == C.CMD_BLOCK_STATUS:
                count = encode_extents(view, request, runs)
                data = view[: DESCRIPTOR_SIZE * count]
                header = block_status_header(request.cookie, self._allocation_context, count)
        except OSError as exc:
            data = header = None
            error = self.io_error(request, exc)
        except Exception:
            data = header = None
            error = C.EIO
            self._counters.inc(BACKEND_ERRORS, f"{request.name}:{error}")
            log.exception("%s: %r on %r failed", self._peer, request, self._export.name)
        self.reply(request, error, data, started, buffer, throttle, header)

    def flush(self, request: Request, throttle, started: int) -> None:
        """Start a FLUSH and return: the backend's group commit (exports/groupcommit.py)
        replies from its flusher thread once a sync that began after this call succeeded.
        Not on a worker: a worker held for a whole fdatasync delayed the requests queued
        behind it, and many FLUSHes in a row each waited for a sync of their own."""
        def synced(error) -> None:
            code = 0
            if isinstance(error, OSError):
                code = self.io_error(request, error)
            elif error is not None:
                code = C.EIO
                self._counters.inc(BACKEND_ERRORS, f"{request.name}:{code}")
                log.error("%s: %r on %r failed", self._peer, request, self._export.name,
                          exc_info=error)
            self.reply(request, code, None, started, None, throttle)

        try:
            self._export.backend.flush_then(synced)
        except OSError as exc:  # refused before it was queued (the backend is closing)
            synced(exc)

    def io_error(self, request: Request, exc: OSError) -> int:
        """Count and log a failed backend call; the NBD error its reply carries."""
        error = nbd_error_from_os(exc)
        if error == C.ENOTSUP and request.flags & C.CMD_FLAG_FAST_ZERO:
            # The answer FAST_ZERO asks for ("no faster than writing"), not a storage
            # failure: the client writes the zeros itself. Counted by the reply
            # (netswap_request_errors_total{op="write_zeroes", errno="ENOTSUP"}).
            log.debug("%s: %r on %r: %s", self._peer, request, self._export.name, exc)
            return error
        self._counters.inc(BACKEND_ERRORS, f"{request.name}:{error}")
        log.warning("%s: %r on %r failed: %s", self._peer, request, self._export.name, exc)
        return error

    def reply(self, request: Request, error: int, data: Optional[memoryview], started: int,
              buffer=None, throttle=None, header: Optional[bytes] = None) -> None:
        """Queue the reply (`header`, or the usual one for `request` and `error`, then `data`);
        once it is sent (or the client is gone) the request's buffer, throttle and in-flight
        slot are released."""
        done = self.completion(request, error, started, buffer, throttle)
        try:
            if header is None:
                header = reply_header(request, error, self._structured)
            parts = (header,) if data is None else (header, data)
        except BaseException:
            done()
            raise
        self._sender.send(parts, done)

    def completion(self, request: Request, error: int, started: int, buffer=None,
                   throttle=None) -> functools.partial:
        """What to call once the reply of `request` is sent: see `replied`."""
        return functools.partial(self.replied, request, error, started, buffer, throttle)

    def replied(self, request: Request, error: int, started: int, buffer, throttle) -> None:
        try:
            if buffer is not None:
                buffer.release()
            if throttle is not None:
                throttle.release()
            # Accounted before the slot is released, so a connection that has ended has
            # all its requests in the statistics.
            self._counters.requests.observe(self._export.name, request.command,
                                            request.length, error,
                                            time.perf_counter_ns() - started)
        finally:
            self._inflight.release()
