"""The Python side of the C call loop (cext/nfsfast.c) of one NFS connection: a swap node's
calls on its own swap file, and anyone's READs and WRITEs of scratch files.

Why it exists: served in Python, a 4 KiB swap-file READ or WRITE costs ~85-125 µs of CPU
under the GIL (record, parse, resolve, pack, send, statistics) where a C server spends half
that. A swap node's calls on its own swap file need none of Python's decisions once Python
has verified the file handle for this connection's peer (the peer is fixed, so the per-call
node check is per connection), so the C loop serves them on the connection's reader thread
without the GIL, as nbd/fastloop.py does for NBD.

What stays in Python, by construction: the loop peeks at each record and stops at the
first one it does not serve, leaving it unread in the socket, so Python receives, parses,
checks and answers it exactly as without the loop: every other procedure, program or
version, other credential flavors, several fragments, garbage, a handle not in this
connection's table (the first call on a handle, scratch files, another node's handle, a
handle made stale by a scrub), a WRITE past the end of the file, a node not attached (the
attach is Python's), no pool memory without waiting (Python waits, or takes the node's
reserve under the drop rule), and a READ that would wait for the disk or a stable WRITE
while other calls are queued (those go to the workers, in parallel). A record the loop
received whose I/O then failed is handed to Python whole, which runs it again and answers
the error its way.

The handle table: the reader offers the handle of each READ or WRITE it hands to Python
(offer); before the loop runs again, Python adds it if it resolves, for this peer, to the
node's own swap file (register_offered); the entry holds a dup of the file's descriptor
(never a number another close frees) and the swap files' scrub epoch at the time it was
verified, before the resolve: a scrub changes the epoch and voids every entry at once. A
WRITE the loop took on before a scrub began (its body may come in as slowly as the client
likes) looks at the epoch again just before it writes, and a scrub waits for writes past
that look before it zeroes the file (ScrubState): no write lands after a wipe.
The table is changed only on the reader thread between two runs of the loop, which reads
it only while it runs on that thread: no lock.

Scratch files (any connection, a node's or not): served in Python, a 4 KiB scratch READ or
WRITE cost ~66 µs of server CPU against nfs-ganesha's ~45-65 (bench/RESULTS.md). Python
adds a scratch file's handle the same way, if it resolves for this peer (the scratch export
has no per-peer rule beyond that), with a dup of the descriptor
exports.py keeps open, whether that is open for writing, and the file's path, device and
inode. As resolve() does on every call, the loop lstat()s the path before each call and
serves it only if it is still a regular file of that device and inode (the descriptor keeps
the inode alive, so no other file can take its number meanwhile); else it voids the entry
and leaves the call to Python, which answers what the handle names now (NFS3ERR_STALE for a
removed file). A scratch WRITE is served only up to the largest file size and only through
a descriptor open for writing; everything else (errors, FBIG, a read-only file, a short
read) goes to Python as for swap files. The loop takes normal pool memory only, never a
reserve: without it the call is Python's, which waits (or, on a node's connection, takes
the reserve and answers a non-swap call JUKEBOX, the drop rule).
"""

from __future__ import annotations

import logging
import os
import struct
from collections import deque

from netswap._pool import ffi, lib

from ..counters import LATENCY_BUCKETS, declare
from ..rpc import constants as RC
from ..transport.sender import skip_sent
from .exports import NfsError

log = logging.getLogger("netswap.nfs")

_BOUNDS_NS = [round(bound * 1e9) for bound in LATENCY_BUCKETS]
assert len(_BOUNDS_NS) == lib.FAST_LOOP_BOUNDS, "cext/fastloop.h and counters.py disagree"
PROGRAM, READ, WRITE = RC.PROG_NFS, 6, 7  # NFSv3 and its READ and WRITE (nfs3.py)
_OPS = ((0, "read"), (1, "write"))  # the loop's stats index, and the procedure's name
_CALL_HEAD = struct.Struct(">6I")  # xid, CALL, RPC version, program, version, procedure
_WORD = struct.Struct(">I")
# A handle table entry's kind (cext/nfsfast.h).
SWAP_FILE, SCRATCH_FILE = lib.NFS_FAST_SWAP_FILE, lib.NFS_FAST_SCRATCH_FILE
# The largest file (codec.MAX_FILE_SIZE): a scratch WRITE ending past it is Python's (FBIG).
MAX_FILE_SIZE = 2**63 - 1

SCRATCH_CALLS = declare(
    "nfs", "nfs_c_loop_scratch_calls", "netswap_nfs_c_loop_scratch_calls_total",
    "Scratch-file READs and WRITEs the NFS C call loop served (also counted in "
    "netswap_nfs_calls_total), by procedure.",
    label="procedure")

# What serve() returns (see cext/nfsfast.h).
CLOSED = lib.NFS_FAST_CLOSED
FALLBACK = lib.NFS_FAST_FALLBACK
PARTIAL = lib.NFS_FAST_PARTIAL
HANDOFF = lib.NFS_FAST_HANDOFF
SOCKET_ERROR = lib.NFS_FAST_SOCKET_ERROR
RECORD_CUT = lib.NFS_FAST_RECORD_CUT
FLUSH = lib.NFS_FAST_FLUSH
RECORD_TIMEOUT = lib.NFS_FAST_RECORD_TIMEOUT
VOIDED = lib.NFS_FAST_VOIDED
MOVED = lib.NFS_FAST_MOVED


class ScrubState:
    """The swap files' scrub state every C loop shares (struct nfs_fast_swap): a scrub
    (swapfiles.py) voids the loops' handle entries, then waits until no loop is in a write."""

    def __init__(self) -> None:
        self.c = ffi.new("struct nfs_fast_swap *")

    @property
    def epoch(self) -> int:
        return self.c.epoch

    def void_handles(self) -> None:
        lib.nfs_fast_void_handles(self.c)

    def writers(self) -> int:
        """Loops writing now through an entry they checked."""
        return lib.nfs_fast_writers(self.c)


class NodeClock:
    """A swap node's state shared with the C loops of its connections: whether it is
    attached (else the loops leave its calls to Python, which attaches it), and when a loop
    last served one of its swap-file calls (the idle clock, time.monotonic's clock)."""

    def __init__(self) -> None:
        self.c = ffi.new("struct nfs_fast_node *")

    @property
    def attached(self) -> bool:
        return bool(self.c.attached)

    @attached.setter
    def attached(self, value: bool) -> None:
        self.c.attached = int(value)

    @property
    def last_io(self) -> float:
        """time.monotonic() of the loops' last call on the node's swap file (0: none)."""
        return self.c.last_io_ns / 1e9


class _LiveCounts:
    """nfs_calls and nfs_bytes of one loop, for Counters.add_live."""

    def __init__(self, stats, scratch) -> None:
        self._stats = stats
        self._scratch = scratch

    def counts(self) -> dict:
        values = {}
        for index, name in _OPS:
            source = self._stats[index]
            calls = sum(source.buckets)
            if calls:  # no series for a procedure never called, as with Counters.inc
                values[("nfs_calls", name)] = calls
                values[("nfs_bytes", name)] = source.bytes
            scratch = self._scratch[index]
            if scratch:
                values[(SCRATCH_CALLS.key, name)] = scratch
        return values


class NfsFastLoop:
    """One connection's C loop: its state, its handle table, its statistics, and the calls
    it hands back. `node`: the swap node the peer is (its clock in `node_clock`), None for
    another peer (then `node_clock` is one never attached: only scratch files are served)."""

    def __init__(self, *, sock_fd: int, pool, max_record: int, max_io: int, exports,
                 verifier: bytes, scrub: ScrubState, node_clock: NodeClock, gate, counters,
                 service: str, peer: str, node: str | None,
                 record_timeout: float | None = None) -> None:
        """`record_timeout`: nfs.record_timeout, which the loop applies as the Python path
        does (None: no limit)."""
        self.pool = pool
        self._exports = exports
        self._scrub = scrub  # the swap files' scrub epoch, and the loops' writes
        self._counters = counters
        self._service = service
        self._peer = peer
        self._node = node
        self._node_clock = node_clock  # kept alive while the loop points at it
        self._fds = [-1] * lib.NFS_FAST_HANDLES
        self._paths: list = [None] * lib.NFS_FAST_HANDLES  # the C strings scratch entries use
        self._next_slot = 0
        # Handles of READs and WRITEs the reader handed to Python; registered by the
        # reader before the loop runs again.
        self.candidates: deque = deque()
        # Handles offered that the loop may not serve (another node's swap file, the
        # export's directory, a file not open here...): not resolved again on every call.
        # Bounded; started over when full.
        self._refused: set[bytes] = set()
        conn = self._conn = ffi.new("struct nfs_fast_conn *")
        conn.sock = sock_fd
        conn.pool = pool.handle
        conn.max_record = max_record
        conn.max_io = max_io
        conn.swap_size = exports.swap.size if exports.swap is not None else 0
        conn.max_file_size = MAX_FILE_SIZE
        conn.record_timeout_ns = (0 if record_timeout is None
                                  else max(1, round(record_timeout * 1e9)))
        conn.verifier = verifier
        conn.swap = scrub.c
        conn.node = node_clock.c
        conn.gate = gate
        conn.bounds_ns = _BOUNDS_NS
        for index, name in _OPS:
            counters.calls.add_live(service, name, conn.stats[index])
        self._live = _LiveCounts(conn.stats, conn.scratch_calls)
        counters.add_live(self._live)

    # The handle table ---------------------------------------------------------------

    def offer(self, record) -> None:
        """A record the reader hands to Python (it is received whole, not yet run): if it is
        an NFSv3 READ or WRITE, its handle may join the table. Offered here, on the reader
        thread, rather than where the call runs (maybe a worker): the loop that runs next
        knows it, so the call after it is the loop's whatever thread ran this one. Cheap:
        the checks are made in register_offered, once per handle."""
        try:
            _, kind, _, program, program_version, procedure = _CALL_HEAD.unpack_from(
                record)
            if (kind != RC.CALL or program != PROGRAM or program_version != 3
                    or procedure not in (READ, WRITE)):
                return
            at = _CALL_HEAD.size
            for _ in range(2):  # the credential, then the verifier: flavor, opaque<400>
                length = _WORD.unpack_from(record, at + 4)[0]
                if length > RC.MAX_AUTH_BYTES:
                    return
                at += 8 + ((length + 3) & ~3)
            length = _WORD.unpack_from(record, at)[0]
            handle = bytes(record[at + 4:at + 4 + length])
        except struct.error:
            return
        if (0 < length <= 64 and len(handle) == length and handle not in self._refused
                and not self._known(handle)):
            self.candidates.append(handle)

    def _known(self, handle: bytes) -> bool:
        epoch = self._scrub.epoch
        for entry in self._conn.handles:
            if (entry.length == len(handle)
                    and (entry.kind != SWAP_FILE or entry.epoch == epoch)
                    and bytes(ffi.buffer(entry.bytes, entry.length)) == handle):
                return True
        return False

    def register_offered(self) -> None:
        """The reader thread, the loop not running: add the handles offered that name, for
        this peer, this node's own swap file or a scratch file open here."""
        while self.candidates:
            handle = self.candidates.popleft()
            if self._known(handle):
                continue
            epoch = self._scrub.epoch  # before the resolve: a scrub after it voids the entry
            node = self._resolve(handle)
            if node is not None and node.scratch is not None:
                opened = node.scratch.dup()
                if opened is None and node.scratch.dropped:
                    # A worker resolving the same new handle meanwhile opened it too and
                    # replaced this one (exports.py keeps one per file): the one kept now.
                    node = self._resolve(handle)
                    opened = node.scratch.dup() if node is not None and node.scratch else None
                if opened is not None:  # else it has no descriptor: a daemon not root
                    self._add(handle, node, epoch, *opened)
                    continue
            elif (node is not None and self._node is not None and node.is_swap_file
                    and node.swap_owner == self._node and node.fd is not None
                    and node.backend.failure is None):
                self._add(handle, node, epoch, os.dup(node.fd))
                continue
            if len(self._refused) >= 64:
                self._refused.clear()
            self._refused.add(handle)

    def _resolve(self, handle: bytes):
        """What `handle` names for this peer (exports.Node), None if it names nothing."""
        try:
            return self._exports.resolve(handle, self._peer)
        except (NfsError, OSError):
            return None  # stale (a scrub: for good), or another node's

    def _add(self, handle: bytes, node, epoch: int, fd: int, writable: bool = True) -> None:
        """Put `handle` in the next slot, with `fd` (a dup, the entry's from now on)."""
        slot = self._next_slot
        self._next_slot = (slot + 1) % lib.NFS_FAST_HANDLES
        entry = self._conn.handles[slot]
        entry.length = 0
        self._close_slot(slot)
        self._fds[slot] = fd
        entry.fd = fd
        entry.fsid = node.export_id
        entry.epoch = epoch
        if node.scratch is not None:
            entry.kind = SCRATCH_FILE
            entry.writable = int(writable)
            path = self._paths[slot] = ffi.new("char[]", os.fsencode(node.path))
            entry.path = path
            # What resolve() found at the path, the same inode as the descriptor's.
            entry.dev, entry.ino = node.st.st_dev, node.st.st_ino
        else:
            entry.kind = SWAP_FILE
        ffi.memmove(entry.bytes, handle, len(handle))
        entry.length = len(handle)

    def _close_slot(self, slot: int) -> None:
        if self._fds[slot] >= 0:
            os.close(self._fds[slot])
            self._fds[slot] = -1
        self._paths[slot] = None

    def _close_voided(self) -> None:
        """Close the descriptors of the scratch entries the loop voided (the file left its
        path): a file removed on the server gets its space back."""
        conn = self._conn
        conn.voided = 0
        for slot in range(lib.NFS_FAST_HANDLES):
            if conn.handles[slot].length == 0:
                self._close_slot(slot)

    # Running ------------------------------------------------------------------------

    def serve(self) -> int:
        """Run the C loop until it stops; returns why (the module's constants). The GIL is
        released for the whole call."""
        if self._conn.voided:
            self._close_voided()
        if self.candidates:
            self.register_offered()
        return lib.nfs_fast_serve(self._conn)

    # What the loop hands back -------------------------------------------------------

    @property
    def started_ns(self) -> int:
        return self._conn.started_ns

    @property
    def sent(self) -> int:
        return self._conn.sent

    @property
    def record_length(self) -> int:
        return self._conn.record_len

    @property
    def procedure(self) -> str:
        return "read" if self._conn.proc == READ else "write"

    @property
    def bytes(self) -> int:
        return self._conn.bytes

    def buffer(self):
        """The pool Buffer of the call handed back (its record at [0:record_length]); the
        caller releases it."""
        conn = self._conn
        return self.pool.adopt(conn.block, conn.block_len, False)

    def unsent_reply(self, buffer) -> list:
        """The parts of a PARTIAL reply not sent yet."""
        conn = self._conn
        parts = [bytes(ffi.buffer(conn.reply, conn.reply_len))]
        if conn.data_len:
            parts.append(buffer.view[conn.data_offset:conn.data_offset + conn.data_len])
            if conn.data_len % 4:
                parts.append(bytes(4 - conn.data_len % 4))
        return skip_sent(parts, conn.sent)

    @property
    def error(self) -> OSError:
        err = self._conn.error
        return OSError(err, os.strerror(err))

    def close(self) -> None:
        """The connection ended: fold the statistics into the totals, close the fds."""
        for index, name in _OPS:
            self._counters.calls.retire_live(self._service, name, self._conn.stats[index])
        self._counters.retire_live(self._live)
        for slot in range(lib.NFS_FAST_HANDLES):
            self._conn.handles[slot].length = 0
            self._close_slot(slot)
