"""The NFS front end: TCP listeners for RPC programs (NFSv3, MOUNT v3, the portmapper), one
thread per connection, on the transport's FrontEnd (accept, admission, stop/join).

A connection reads RPC records (RFC 5531 §11 record marking): each fragment header is
checked against the record cap (nfs.max_io plus room for the call's headers) before
anything is allocated, so a forged 2 GiB header costs four bytes; the record is received
into a pool buffer (the pool is the only source of payload memory, as on the NBD side).
Once a record has begun, the client has `nfs.record_timeout` to send the rest of it (the
time it waits for pool memory is ours and not counted): a client that trickles a record,
or stops halfway, would otherwise hold its buffer for as long as it likes, one per
connection. It is disconnected, logged and counted; an NFS client sends the call again on a
new connection. Between records a client may be idle as long as it likes: it holds nothing.
The call is parsed (rpc/message.py), handed to its program (mount.py, nfs3.py), and the
reply goes back through a ReplySender (transport/sender.py: non-blocking, a client that stops
reading throttles only itself). Calls of one connection run on the daemon's workers, so
several are in flight and replies go out in completion order, matched by xid.

A call that arrives alone (none of the connection's calls between received and replied, no
bytes of another waiting in the socket) runs on the connection's own thread instead: a
client with one call in flight (libnfs's sync API, a lightly swapping node) would otherwise
pay a wake-up of a worker and a GIL hand-off per call, a good part of a 4 KiB call's cost. It
takes nothing from other connections' share of the workers (it uses none). While it runs,
this connection reads no further calls, so one that blocks (an fdatasync, a pool wait)
delays those sent meanwhile by that long; they then find each other queued and go to the
workers, in parallel, as before. The NBD side's C loop serves on the reader thread by the
same rule.

A connection has a C loop of its own (fastloop.py, cext/nfsfast.c) that serves READs and
WRITEs of the node's swap file (a swap node's connection) and of scratch files (any
connection) on this thread without the GIL; it peeks at each record and leaves every one it
does not serve unread, for the path above.
"""

from __future__ import annotations

import fcntl
import logging
import math
import select
import socket
import termios
import threading
import time
from typing import Optional

from ..access import ACCESS_DENIED
from ..counters import declare
from ..netpolicy import SOCKET_TAG_FAILURES, tag_emergency
from ..nfs.nfs3 import NFS_BYTES, NFS_CALLS
from ..reserve.tree import POOL_WAITS
from ..rpc import constants as RC
from ..rpc import message as rpc
from ..rpc import xdr
from ..rpc.message import RPC_PROTOCOL_ERRORS
from ..transport.admission import ConnectionLimits
from ..transport.backpressure import wait_for_buffer
from ..transport.frontend import C_LOOP_HANDOFFS, INTERNAL_ERRORS, FrontEnd
from ..transport.listeners import keep_alive, tcp_listener
from ..transport.sender import ReplySender, SendPoller
from . import fastloop
from .exports import Peer

RPC_CONNECTIONS = declare(
    "nfs", "rpc_connections", "netswap_rpc_connections_total",
    "NFS and MOUNT connections accepted, by service.",
    label="service")

RECORD_TIMEOUTS = declare(
    "nfs", "record_timeouts", "netswap_rpc_record_timeouts_total",
    "NFS, MOUNT and portmapper connections closed because a record did not arrive whole "
    "within nfs.record_timeout of its first byte (a client trickling a record holds a pool "
    "buffer), by service.",
    label="service")

log = logging.getLogger("netswap.nfs")

# Room for an RPC call's headers on top of its payload: xid .. verifier (AUTH_SYS bodies are
# at most 400 bytes each), a file handle of 64 bytes, offsets and counts.
RECORD_SLACK = 4096
# Calls of one connection between "received" and "replied"; past it the reader stops reading
# (TCP backpressure). The Linux client keeps up to its slot table (65 by default) in flight.
MAX_INFLIGHT_CALLS = 64


def _nothing() -> None:
    pass


# Received records the C loop hands over to be run again, and their hand-over reason.
_RUN_AGAIN = {fastloop.HANDOFF: "nfs_io_error", fastloop.VOIDED: "nfs_scrubbed",
              fastloop.MOVED: "nfs_scratch_moved"}


class RecordTimeout(Exception):
    """A record the client began did not arrive whole within nfs.record_timeout."""


class RpcServer:
    """Listeners and connections for a set of RPC programs, on the addresses given."""

    def __init__(self, name: str, addresses, programs: dict, pool, counters, workers,
                 send_poller: SendPoller, max_record: int, key: str,
                 swap_nodes=None, limits: Optional[ConnectionLimits] = None,
                 keepalive: Optional[float] = None, fast_loop=None,
                 record_timeout: Optional[float] = None) -> None:
        """`swap_nodes`, for the NFS port (swapnodes.SwapNodes): a swap node's connection is
        tagged and may use the node's reserve while the node is attached. `limits`: the
        connection limits to count in (None: none); `keepalive`: seconds of silence before
        TCP probes a client (None: no keepalive). `fast_loop(connection)`: the C call loop
        (nfs/fastloop.py) for a connection, or None (also as its result) for the Python path
        only.
        `record_timeout`: seconds a client has to send a record whole once it began it
        (nfs.record_timeout; None: as long as it likes)."""
        self.name = name  # "nfs" or "mount", for thread names and log lines
        self._addresses = addresses
        self.programs = programs  # program number -> an object with .call (see _answer)
        self.pool = pool
        self.counters = counters
        self.workers = workers
        self.send_poller = send_poller
        self.max_record = max_record
        self._key = key
        self.swap_nodes = swap_nodes
        self._keepalive = keepalive
        self.fast_loop = fast_loop
        self.record_timeout = record_timeout
        self.frontend = FrontEnd(name, log, counters, limits, self._open,
                                 client_of=lambda sock, address: Peer(address[0], address[1]))
        self.refusals = self.frontend.refusals  # refused calls too: never a log flood

    def start(self) -> None:
        self.frontend.start(tcp_listener(host, port, self._key) for host, port in self._addresses)
        for listener in self.frontend.listeners:
            host, port = listener.getsockname()[:2]
            # Not "listening on": the daemon logs that once everything is up, and tools
            # (tests, scripts) wait for it.
            log.info("%s served on %s", self.name, f"[{host}]:{port}" if ":" in host
                     else f"{host}:{port}")

    def stop(self, timeout: float) -> bool:
        """Stop accepting, close every connection, and wait up to `timeout` seconds for
        their threads: a connection thread ends only when its calls have replied, and until
        then it uses pool buffers and the exports' files. True if all ended in time."""
        return self.frontend.stop(RpcConnection.close, timeout)

    @property
    def connection_count(self) -> int:
        return self.frontend.connection_count

    @property
    def stopping(self) -> bool:
        return self.frontend.stopping

    @property
    def ports(self) -> list[int]:
        return [listener.getsockname()[1] for listener in self.frontend.listeners]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of each listener, as bound: a dual-stack wildcard ("" or "*" in the
        config, bound to "::" without IPV6_V6ONLY) is ("0.0.0.0", port) and ("::", port)."""
        bound = []
        for listener in self.frontend.listeners:
            host, port = listener.getsockname()[:2]
            if listener.family == socket.AF_INET6 and not listener.getsockopt(
                    socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
                bound.append(("0.0.0.0", port))
            bound.append((host, port))
        return bound

    def _open(self, listener: socket.socket, sock: socket.socket, address, peer: Peer):
        """The RpcConnection for an admitted socket, and what its thread runs."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._keepalive is not None:
            keep_alive(sock, self._keepalive)
        node = self.swap_nodes.node_of(peer) if self.swap_nodes is not None else None
        if node is None and self.swap_nodes is not None and self.swap_nodes.node_of(str(peer)):
            # A node's address from an unprivileged port (nfs.node_ports): any user on the
            # node could bind that, so it gets no node's swap, only the other exports.
            self.counters.inc(ACCESS_DENIED, "nfs:unprivileged_port")
            self.refusals.log("unprivileged_port", logging.WARNING,
                               "%s %s: source port %d is not below 1024: not trusted as node "
                               "%r (nfs.node_ports)", self.name, peer, peer.port,
                               self.swap_nodes.node_of(str(peer)))
        if node is not None:
            # A swap node's connection carries its swap file's I/O: tagged from accept (the
            # SK_MEMALLOC socket). Its reserve is the node's, attached while the node swaps
            # (swapnodes.py), not while this connection is open.
            for problem in tag_emergency(sock, self.swap_nodes.socket_policy):
                self.counters.inc(SOCKET_TAG_FAILURES)
                log.warning("%s %s: socket tagging incomplete: %s", self.name, peer, problem)
        connection = RpcConnection(self, sock, peer, node)
        self.counters.inc(RPC_CONNECTIONS, self.name)
        return connection, connection.run

    def close_node(self, node: str) -> int:
        """Close the connections of swap node `node`; return how many."""
        connections = [c for c in self.frontend.connections() if c.node == node]
        for connection in connections:
            connection.close()
        return len(connections)

    def connection_closed(self, connection: "RpcConnection") -> None:
        self.frontend.closed(connection, connection.peer)


class RpcConnection:
    def __init__(self, server: RpcServer, sock: socket.socket, peer: str,
                 node: Optional[str] = None) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.node = node  # the swap node this peer is, or None (never the reserve)
        self.sender = self._sender = ReplySender(sock, server.send_poller, peer)
        self._assembler = rpc.RecordAssembler(server.max_record)
        self._closing = False
        # Calls between "received" and "replied", at most MAX_INFLIGHT_CALLS; the reader
        # waits on the condition at the limit, and for none at the end. (A counter rather
        # than a semaphore: the reader must also know when it is zero.)
        self._pending = 0
        self._replied = threading.Condition(threading.Lock())
        self._reader_waits = False  # only then does a reply notify (notify is not free)
        self._unread = bytearray(4)  # FIONREAD's answer
        # Waits for the rest of a record, up to its deadline (_wait_readable).
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        # The C loop serving READs and WRITEs of this swap node's own file and of scratch
        # files (fastloop.py), or None.
        self._fast = server.fast_loop(self) if server.fast_loop is not None else None

    def close(self) -> None:
        self._closing = True  # for a reader waiting on pool memory, not on the socket
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def run(self) -> None:
        try:
            while (self._fast is None or self._serve_fast()) and self._serve_one():
                pass
        except rpc.RecordError as exc:
            self.server.counters.inc(RPC_PROTOCOL_ERRORS, exc.reason)
            log.warning("%s %s: closing: %s", self.server.name, self.peer, exc)
        except RecordTimeout:
            self.server.counters.inc(RECORD_TIMEOUTS, self.server.name)
            log.warning("%s %s: closing: a record did not arrive whole within %g s of its "
                        "first byte (nfs.record_timeout)", self.server.name, self.peer,
                        self.server.record_timeout)
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.info("%s %s: connection lost: %s", self.server.name, self.peer, exc)
        except Exception:
            self.server.counters.inc(INTERNAL_ERRORS)
            log.exception("%s %s: internal error, closing the connection", self.server.name,
                          self.peer)
        finally:
            with self._replied:  # in-flight calls still reply on this socket
                while self._pending:
                    self._wait_for_reply()
            if self._fast is not None:
                self._fast.close()
            self.server.send_poller.forget(self._sender)
            self.sock.close()
            self.server.connection_closed(self)

    def _serve_one(self) -> bool:
        record = self._receive_record()
        if record is None:
            return False
        buffer, length, loan = record
        self._dispatch(buffer, length, loan, time.perf_counter_ns())
        return True

    def _dispatch(self, buffer, length: int, loan, received: int) -> None:
        if self._fast is not None:
            self._fast.offer(buffer.view[:length])  # the C loop may serve its handle next
        with self._replied:
            while self._pending >= MAX_INFLIGHT_CALLS:
                self._wait_for_reply()
            alone = not self._pending
            self._pending += 1
        if alone and not self._bytes_waiting():
            self._execute(buffer, length, loan, received)  # see the module docstring
        else:
            self.server.workers.submit_for(("rpc", self.peer), length, self._execute, buffer,
                                           length, loan, received)

    def _serve_fast(self) -> bool:
        """Let the C loop serve calls until the next record is Python's (it is then unread
        in the socket); False when the client closed."""
        while True:
            reason = self._fast.serve()
            if reason == fastloop.FALLBACK:
                self.server.counters.inc(C_LOOP_HANDOFFS, "nfs_python")
                return True
            if reason == fastloop.CLOSED:
                return False
            self._take_from_fast(reason)  # then the loop goes on

    def _take_from_fast(self, reason: int) -> None:
        """What the C loop hands back other than a record it left unread."""
        fast, counters = self._fast, self.server.counters
        if reason == fastloop.SOCKET_ERROR:
            raise fast.error
        if reason == fastloop.RECORD_CUT:
            raise ConnectionError("client closed in the middle of a record")
        if reason == fastloop.RECORD_TIMEOUT:
            raise RecordTimeout()
        if reason == fastloop.FLUSH:
            # The loop finished a large reply while workers queued theirs behind it: the
            # sender has them, and is told to send them now.
            self._sender.resume([], _nothing)
            return
        # A call the loop received and hands over: Python's from here, as if received here.
        buffer, started = fast.buffer(), fast.started_ns
        if reason in _RUN_AGAIN:
            # A failed write, one a scrub made stale before it was written, or a scratch
            # file's that left its path while its body came in: Python runs it again and
            # answers (NFS3ERR_STALE, or what the handle names now).
            counters.inc(C_LOOP_HANDOFFS, _RUN_AGAIN[reason])
            self._dispatch(buffer, fast.record_length, None, started)
            return
        assert reason == fastloop.PARTIAL, reason
        counters.inc(C_LOOP_HANDOFFS, "nfs_queued_reply")
        with self._replied:
            while self._pending >= MAX_INFLIGHT_CALLS:
                self._wait_for_reply()
            self._pending += 1
        procedure, nbytes = fast.procedure, fast.bytes

        def done() -> None:
            counters.inc(NFS_CALLS, procedure)
            counters.inc(NFS_BYTES, procedure, nbytes)
            self._finished([buffer], procedure, started)

        # Replies were queued, or the client took nothing of this one for a while: the
        # sender finishes it (its rest first, if part is on the wire), then frees the buffer.
        if fast.sent:
            self._sender.resume(fast.unsent_reply(buffer), done)
        else:
            self._sender.send(fast.unsent_reply(buffer), done)

    def _bytes_waiting(self) -> bool:
        """Has the client sent more than we have read (another call behind this one)?"""
        try:
            fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, self._unread)
        except OSError:
            return True  # cannot tell: the workers, as before
        return self._unread != b"\0\0\0\0"

    def _receive_record(self):
        """(pool buffer, record length, reserve loan or None) for the next record, or None
        when the client closed between records. A record the assembler refuses (over the
        cap, empty) raises RecordError before anything is allocated for it; one that does
        not arrive whole in time raises RecordTimeout (see the module docstring)."""
        header = self.sock.recv(4)  # blocks: between records a client holds nothing
        if not header:
            return None
        if len(header) < 4:
            header += self._recv_exact(4 - len(header), self._deadline())
        assembler = self._assembler
        length = assembler.begin_fragment(header)
        last = header[0] & 0x80  # the last-fragment bit, which begin_fragment has checked
        # One fragment (Linux and libnfs send one): a buffer of exactly its size. Several:
        # a buffer of the cap, as the total is known only at the last one.
        buffer, loan = self._alloc(length if last else self.server.max_record)
        try:
            # The client's time starts again: how long the pool kept us waiting is not its.
            deadline = self._deadline()
            while True:
                start = assembler.received
                self._recv_into(buffer.view[start:start + length], deadline)
                record_length = assembler.end_fragment()
                if record_length is not None:
                    return buffer, record_length, loan
                length = assembler.begin_fragment(self._recv_exact(4, deadline))
        except BaseException:
            buffer.release()
            if loan is not None:
                loan.release()
            raise

    def _deadline(self) -> Optional[float]:
        """When the record being received must be in (time.monotonic), None for never."""
        timeout = self.server.record_timeout
        return None if timeout is None else time.monotonic() + timeout

    def _alloc(self, size: int):
        """(buffer, loan) for a record. A swap node's connection may fall back to the
        node's reserve when normal memory is gone, while the node is attached: the loan
        keeps it attached until the buffer is back. Others wait for normal memory (and so
        stop reading: backpressure)."""
        pool = self.server.pool
        if self.node is not None:
            swap_nodes = self.server.swap_nodes
            loan = swap_nodes.borrow_reserve(self.node)
            if loan is None:
                buffer = pool.alloc(size)  # normal memory, without waiting
                if buffer is not None:
                    return buffer, None
                # A node released for idleness that sends while normal memory is gone is
                # most likely paging: attach it again now rather than wait for memory its
                # swap-out would free. What it sent is then routed like any reserve record
                # (a non-swap call gets JUKEBOX).
                swap_nodes.swap_activity(self.node)
                loan = swap_nodes.borrow_reserve(self.node)
            if loan is not None:
                try:
                    return self._wait_for_buffer(size, emergency=True, group=loan.group), loan
                except BaseException:
                    loan.release()
                    raise
        return self._wait_for_buffer(size), None

    def _wait_for_buffer(self, size: int, **how):
        """A pool buffer, waiting as long as the pool has none (backpressure), but not past
        this connection's close or the daemon's stop."""
        buffer = self.server.pool.alloc(size, **how)
        if buffer is not None:
            return buffer
        self.server.counters.inc(POOL_WAITS, "swap" if how.get("emergency") else "non_swap")
        buffer = wait_for_buffer(self.server.pool, size, self._stopped, **how)
        if buffer is None:
            raise ConnectionError("closed while waiting for pool memory")
        return buffer

    def _stopped(self) -> bool:
        """Should a wait for pool memory on this connection's behalf give up?"""
        return self._closing or self.server.stopping

    def _recv_exact(self, count: int, deadline: Optional[float]) -> bytes:
        """`count` bytes of the record being received, by `deadline`."""
        view = memoryview(bytearray(count))
        self._recv_into(view, deadline)
        return view.obj

    def _recv_into(self, view: memoryview, deadline: Optional[float]) -> None:
        """Fill `view` with the record being received, by `deadline` (RecordTimeout)."""
        received = 0
        while received < len(view):
            # Without waiting: what has arrived is taken at once (all of it, as a rule), and
            # only a wait for more is bounded by the deadline.
            try:
                count = self.sock.recv_into(view[received:], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._wait_readable(deadline)
                continue
            if not count:
                raise ConnectionError("client closed in the middle of a record")
            received += count

    def _wait_readable(self, deadline: Optional[float]) -> None:
        """Until the socket has more to read (or was closed), or RecordTimeout at
        `deadline`."""
        if deadline is None:
            self._readable.poll()
            return
        left = deadline - time.monotonic()
        if left <= 0 or not self._readable.poll(math.ceil(left * 1000)):
            raise RecordTimeout()

    # Workers ------------------------------------------------------------------------

    def _execute(self, buffer, length: int, loan, received: int) -> None:
        """Answer one record; `received`: perf_counter_ns when it was in."""
        # Released in this order once the reply is sent: the buffer before the loan that
        # keeps its reserve group attached.
        release: list = [buffer] if loan is None else [buffer, loan]
        procedure = None
        try:
            parts, procedure = self._answer(buffer.view[:length], release)
        except Exception:
            self.server.counters.inc(INTERNAL_ERRORS)
            log.exception("%s %s: call failed", self.server.name, self.peer)
            parts = None
        if parts is None:
            self._finished(release)
            return
        # Parts are bytes, or byte views of pool buffers: nbytes is their length on the wire.
        length = sum(part.nbytes if type(part) is memoryview else len(part) for part in parts)
        framed = [rpc.fragment_header(length), *parts]
        self._sender.send(framed, lambda: self._finished(release, procedure, received))

    def _finished(self, release: list, procedure: Optional[str] = None,
                  received: int = 0) -> None:
        if procedure is not None:  # a call its program answered (not a refused record)
            self.server.counters.calls.observe(self.server.name, procedure,
                                               time.perf_counter_ns() - received)
        for buffer in release:
            buffer.release()
        with self._replied:
            self._pending -= 1
            if self._reader_waits:
                self._replied.notify()

    def _wait_for_reply(self) -> None:
        """The reader, holding self._replied, waits until a call is replied."""
        self._reader_waits = True
        try:
            self._replied.wait()
        finally:
            self._reader_waits = False

    def _answer(self, record: memoryview, release: list) -> tuple[Optional[list], Optional[str]]:
        """The reply's parts for one record (None when it gets none), and the name of the
        procedure that answered it (None for a call no program took)."""
        counters, name = self.server.counters, self.server.name
        try:
            call = rpc.parse_call(record)
        except rpc.NotACall as exc:
            # Nothing to answer (no xid, or a REPLY): the stream cannot be trusted further.
            counters.inc(RPC_PROTOCOL_ERRORS, exc.reason)
            log.warning("%s %s: closing: %s", name, self.peer, exc)
            self.close()
            return None, None
        except rpc.CallRejected as exc:
            counters.inc(RPC_PROTOCOL_ERRORS, exc.reason)
            self.server.refusals.log(exc.reason, logging.INFO, "%s %s: call refused: %s", name,
                                     self.peer, exc)
            return [exc.reply()], None
        program = self.server.programs.get(call.prog)
        if program is None:
            counters.inc(RPC_PROTOCOL_ERRORS, "prog_unavail")
            return [rpc.accepted(call.xid, RC.PROG_UNAVAIL)], None
        # A program serves one version, or a range (the portmapper: 2 to 4).
        low, high = getattr(program, "versions", (program.version, program.version))
        if not low <= call.vers <= high:
            counters.inc(RPC_PROTOCOL_ERRORS, "prog_mismatch")
            return [rpc.prog_mismatch(call.xid, low, high)], None
        procedure = program.procedure_name(call)
        try:
            return program.call(call, self.peer, release, emergency=release[0].emergency,
                                stopped=self._stopped), procedure
        except xdr.XdrError as exc:
            # Arguments the procedure could not decode (truncated, too long, a bad length):
            # GARBAGE_ARGS (RFC 5531), for every program in the one place.
            counters.inc(RPC_PROTOCOL_ERRORS, "garbage_args")
            self.server.refusals.log("garbage_args", logging.INFO,
                                     "%s %s: %s arguments malformed: %s", name, self.peer,
                                     procedure, exc)
            return [rpc.accepted(call.xid, RC.GARBAGE_ARGS)], procedure
        except Exception:
            # A bug of ours: the call gets SYSTEM_ERR rather than no reply, which a hard
            # mount would wait on forever.
            counters.inc(INTERNAL_ERRORS)
            log.exception("%s %s: procedure %d failed", name, self.peer, call.proc)
            return [rpc.accepted(call.xid, RC.SYSTEM_ERR)], procedure
