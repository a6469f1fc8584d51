"""The Python side of the C request loop (cext/nbdfast.c) of one connection.

Why it exists: served in Python, every request costs a few dozen interpreter steps under
one GIL shared by all connections (parse, checks, pool, fair queue, worker hand-off,
reply, statistics), so the daemon topped out at one busy core while the C servers used
half as much CPU for two to three times the IOPS. Plain READs and WRITEs on a file export
need none of Python's decisions, so a C loop serves them on the connection's own reader
thread without the GIL: preadv2(RWF_NOWAIT) for reads the page cache holds (and a plain
pread for one it does not when no other request is queued behind it), pwrite into the page
cache for writes, one sendmsg of header and data, pool buffers as everywhere.

What stays in Python, by construction: the C loop stops at the first request it does not
serve and leaves it in the receive window, so Python parses, checks, refuses, queues
(fairly, on the workers) and replies to everything else exactly as before: other commands,
any flag (FUA, DF), every request the spec refuses, an empty pool (Python waits or answers
ENOMEM, and takes reserve memory only where the drop rule allows), reads that would wait
for the disk while more requests are queued, TLS connections, memory exports, a failed backend, non-swap requests under
memory pressure. A plain FLUSH is served in C too (cext/nbdfast.h): the backend's group commit
record (cext/commit.h) is shared with Python's flushers, so neither skips a sync the other
still runs; a sync that fails there comes back as SYNC_FAILED, the backend fails here, and
Python answers that FLUSH (EIO) as it would have. Requests handed to Python run on the workers while the loop goes on with
the next ones; replies from both share the socket through the sender's gate
(transport/sender.py, cext/sendgate.c), so each goes out whole.
"""

from __future__ import annotations

import os
import time
from netswap._pool import ffi, lib

from ..counters import LATENCY_BUCKETS, declare
from . import constants as C
from ..transport.sender import skip_sent
from .transmission import ExportLimits, Request, RequestParser

_BOUNDS_NS = [round(bound * 1e9) for bound in LATENCY_BUCKETS]
assert len(_BOUNDS_NS) == lib.FAST_LOOP_BOUNDS, "cext/fastloop.h and counters.py disagree"
_OPS = ((0, C.CMD_READ), (1, C.CMD_WRITE), (2, C.CMD_FLUSH))  # the loop's stats index, and its command

PLACEMENTS = declare(
    "nbd", "c_loop_placements", "netswap_c_loop_placements_total",
    "What the NBD C loops did with their threads' CPUs (nbd.follow_receiving_cpu), by "
    "event (moved: held on the CPU receiving a client that sends one request at a time; "
    "released: given every CPU back because requests queued up; crowded: given back, for a "
    "second, because waiting for that CPU cost more than a wake-up elsewhere).",
    label="event")
_PLACEMENT_EVENTS = ("moves", "moved"), ("releases", "released"), ("crowded", "crowded")

REQUEST_POLLS = declare(
    "nbd", "c_loop_request_polls", "netswap_c_loop_request_polls_total",
    "Times an NBD C loop polled for a client's next request before sleeping (a client that "
    "sends one request at a time, each soon after the last reply), by outcome (won: the "
    "request came during the poll; lost: the loop slept after all).",
    label="outcome")
_POLL_OUTCOMES = ("polls_won", "won"), ("polls_lost", "lost")

# What serve() returns (see cext/nbdfast.h).
CLOSED = lib.NBD_FAST_CLOSED
FALLBACK = lib.NBD_FAST_FALLBACK
PARTIAL = lib.NBD_FAST_PARTIAL
WRITE_ERROR = lib.NBD_FAST_WRITE_ERROR
CHECK = lib.NBD_FAST_CHECK
SOCKET_ERROR = lib.NBD_FAST_SOCKET_ERROR
PAYLOAD_CUT = lib.NBD_FAST_PAYLOAD_CUT
SYNC_FAILED = lib.NBD_FAST_SYNC_FAILED
RECHECK = lib.NBD_FAST_RECHECK


class FastLoop:
    """One connection's C loop: its state, its statistics, and the requests it hands back."""

    def __init__(self, *, sock_fd: int, backend, pool, window, limits: ExportLimits,
                 group, reserve: bool, gate, run_gate, stats, export_name: str,
                 counters, follow_receiving_cpu: bool = False) -> None:
        """`window` is the connection's receive window (a pool Buffer); `group` the pool
        group its buffers are charged to and `reserve` whether they may come from the
        reserve (swap connections); `gate` the connection's ReplySender's send gate;
        `run_gate` an int* that is 0 while requests must pass
        Python (or None); `stats` the daemon's RequestStats, which reads ours live, and
        `counters` its Counters (the placement events, live too)."""
        self.backend = backend
        self.pool = pool
        self._stats = stats
        self._export_name = export_name
        self._fd = os.dup(backend.fileno())  # never a number the backend's close() frees
        conn = self._conn = ffi.new("struct nbd_fast_conn *")
        conn.sock = sock_fd
        conn.fd = self._fd
        conn.pool = pool.handle
        conn.alloc_flags = lib.POOL_EMERGENCY if reserve and group is not None else 0
        conn.group = group.id if reserve and group is not None else -1
        conn.export_size = limits.size
        conn.min_block = limits.minimum_block
        conn.max_payload = limits.maximum_payload
        conn.read_only = int(limits.read_only)
        conn.structured = int(limits.structured_replies)
        conn.window = ffi.cast("uint8_t *", lib.pool_base(pool.handle)) + window.offset
        conn.window_size = window.size
        conn.gate = gate
        conn.backend_ok = backend.write_gate
        conn.dirty = backend.dirty
        conn.commit = backend.commit
        conn.flushes = ffi.NULL  # the loop makes its flush queue at the first FLUSH
        path, follow_symlinks, dev, ino = backend.identity
        self._path = ffi.new("char[]", os.fsencode(path))  # lives as long as the loop
        conn.path = self._path
        conn.follow_symlinks = int(follow_symlinks)
        conn.file_dev, conn.file_ino = dev, ino
        self._always = ffi.new("int *", 1)
        conn.run_ok = run_gate if run_gate is not None else self._always
        conn.bounds_ns = _BOUNDS_NS
        conn.check_due_ns = 0
        conn.placement.enabled = int(follow_receiving_cpu)  # cext/placement.h
        for index, command in _OPS:
            stats.add_live(export_name, command, conn.stats[index])
        self._counters = counters
        counters.add_live(self)

    def serve(self, parser: RequestParser) -> int:
        """Run the C loop on the parser's window until it stops; returns why (the module's
        constants). The GIL is released for the whole call."""
        conn = self._conn
        conn.start, conn.end = parser.lend_window()
        try:
            reason = lib.nbd_fast_serve(conn)
        finally:
            parser.take_window_back(conn.start, conn.end)
        if reason == SYNC_FAILED:
            # Before Python answers the FLUSH: its backend must have failed by then.
            self.backend.sync_failed(self.error)
        elif reason == RECHECK:
            # The file at the path changed after a FLUSH's sync: the full check fails the
            # backend (and logs why) before Python answers that FLUSH.
            self.backend.check_identity_now()
        elif reason == CHECK:
            self.backend.check_identity_due()
            conn.check_due_ns = time.perf_counter_ns() + round(
                self.backend.IDENTITY_CHECK_INTERVAL * 1e9)
        return reason

    def counts(self) -> dict:
        """The placement events and request polls so far, for Counters.add_live (no series
        for an event that never happened)."""
        values = {}
        for source, fields, metric in ((self._conn.placement, _PLACEMENT_EVENTS, PLACEMENTS),
                                       (self._conn, _POLL_OUTCOMES, REQUEST_POLLS)):
            for field, label in fields:
                count = getattr(source, field)
                if count:
                    values[(metric.key, label)] = count
        return values

    # What the loop hands back -------------------------------------------------------

    def request(self) -> Request:
        """The request a PARTIAL, WRITE_ERROR, SYNC_FAILED or RECHECK is about."""
        conn = self._conn
        return Request(conn.flags, conn.command, conn.cookie, conn.offset, conn.length)

    @property
    def started_ns(self) -> int:
        return self._conn.started_ns

    @property
    def sent(self) -> int:
        """Bytes of a PARTIAL reply already on the wire (0: none, it just waits its turn)."""
        return self._conn.sent

    def buffer(self):
        """The pool Buffer of that request (None for a FLUSH); the caller releases it."""
        conn = self._conn
        if conn.block < 0:
            return None
        return self.pool.adopt(conn.block, conn.length, bool(conn.emergency))

    def unsent_reply(self, buffer) -> list:
        """The parts of a PARTIAL reply not sent yet (a copy of the header, then the data's
        view)."""
        conn = self._conn
        header = bytes(ffi.buffer(conn.reply, conn.reply_len))
        parts = [header, buffer.view] if conn.command == C.CMD_READ else [header]
        return skip_sent(parts, conn.sent)

    @property
    def error(self) -> OSError:
        """The errno of a WRITE_ERROR or SOCKET_ERROR, as the OSError Python would have."""
        err = self._conn.error
        return OSError(err, os.strerror(err))

    def close(self) -> None:
        """The connection ended: wait for its FLUSHes still at the flushers (their answers
        are dropped: no one reads them), fold the statistics into the totals, close our fd
        (the flushers' syncs used it until then)."""
        flushes = self._conn.flushes
        if flushes != ffi.NULL:
            self._conn.flushes = ffi.NULL
            lib.flush_queue_free(flushes)  # the GIL is released while it waits
        for index, command in _OPS:
            self._stats.retire_live(self._export_name, command, self._conn.stats[index])
        self._counters.retire_live(self)
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

