"""The NFS side's transport: TCP listeners for NFSv3 and MOUNT v3, one thread per connection.

A connection reads RPC records (RFC 5531 §11 record marking): each fragment header is
checked against the record cap (nfs.max_io plus room for the call's headers) before
anything is allocated, so a forged 2 GiB header costs four bytes; the record is received
into a pool buffer (the pool is the only source of payload memory, as on the NBD side).
The call is parsed (rpc/message.py), handed to its program (mount.py, nfs3.py), and the
reply goes back through a ReplySender (nbd/sender.py: non-blocking, a client that stops
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
"""

from __future__ import annotations

import fcntl
import logging
import selectors
import socket
import termios
import threading
from typing import Optional

from ..errors import AttachRefused
from ..nbd.sender import ReplySender, SendPoller
from ..netpolicy import tag_emergency
from ..nbd.server import tcp_listener
from ..rpc import constants as RC
from ..rpc import message as rpc
from . import mount, nfs3
from .exports import NfsExports

log = logging.getLogger("netswap.nfs")

# Room for an RPC call's headers on top of its payload: xid .. verifier (AUTH_SYS bodies are
# at most 400 bytes each), a file handle of 64 bytes, offsets and counts.
RECORD_SLACK = 4096
# Calls of one connection between "received" and "replied"; past it the reader stops reading
# (TCP backpressure). The Linux client keeps up to its slot table (65 by default) in flight.
MAX_INFLIGHT_CALLS = 64


class RpcServer:
    """Listeners and connections for a set of RPC programs, on the addresses given."""

    def __init__(self, name: str, addresses, programs: dict, pool, counters, workers,
                 send_poller: SendPoller, max_record: int, key: str,
                 swap_nodes=None) -> None:
        """`swap_nodes`, for the NFS port: an object with .node_of(peer), .attach(node)
        and .socket_policy; a swap node's connection is tagged and may use its reserve."""
        self.name = name  # "nfs" or "mount", for thread names and log lines
        self._addresses = addresses
        self.programs = programs  # program number -> an object with .call(call, client)
        self.pool = pool
        self.counters = counters
        self.workers = workers
        self.send_poller = send_poller
        self.max_record = max_record
        self._key = key
        self.swap_nodes = swap_nodes
        self._listeners: list[socket.socket] = []
        self._connections: set[RpcConnection] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._acceptor: Optional[threading.Thread] = None

    def start(self) -> None:
        try:
            for host, port in self._addresses:
                self._listeners.append(tcp_listener(host, port, key=self._key))
        except BaseException:
            self._close_listeners()
            raise
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept",
                                          daemon=True)
        self._acceptor.start()
        for listener in self._listeners:
            host, port = listener.getsockname()[:2]
            # Not "listening on": the daemon logs that once everything is up, and tools
            # (tests, scripts) wait for it.
            log.info("%s served on %s", self.name, f"[{host}]:{port}" if ":" in host
                     else f"{host}:{port}")

    def stop(self) -> None:
        self._stopping = True
        self._close_listeners()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close()

    @property
    def ports(self) -> list[int]:
        return [listener.getsockname()[1] for listener in self._listeners]

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()

    def _accept_loop(self) -> None:
        selector = selectors.DefaultSelector()
        for listener in self._listeners:
            selector.register(listener, selectors.EVENT_READ)
        while not self._stopping:
            for key, _ in selector.select(timeout=0.5):
                try:
                    sock, address = key.fileobj.accept()
                except OSError:
                    continue  # closed by stop(), or the client went away
                self._start_connection(sock, address[0])
        selector.close()

    def _start_connection(self, sock: socket.socket, peer: str) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        attachment = None
        if self.swap_nodes is not None and (node := self.swap_nodes.node_of(peer)) is not None:
            # A swap node's connection carries its swap file's I/O: tagged from accept (the
            # SK_MEMALLOC socket) and attached to the node's reserve (the seed's swapon).
            try:
                attachment = self.swap_nodes.attach(node)
            except AttachRefused as exc:
                log.warning("%s %s: node %r not attached: %s", self.name, peer, node, exc)
            else:
                for problem in tag_emergency(sock, self.swap_nodes.socket_policy):
                    self.counters.inc("socket_tag_failures")
                    log.warning("%s %s: socket tagging incomplete: %s", self.name, peer, problem)
        connection = RpcConnection(self, sock, peer, attachment)
        with self._lock:
            self._connections.add(connection)
        self.counters.inc("rpc_connections", self.name)
        threading.Thread(target=connection.run, name=f"{self.name} {peer}", daemon=True).start()

    def connection_closed(self, connection: "RpcConnection") -> None:
        with self._lock:
            self._connections.discard(connection)


class RpcConnection:
    def __init__(self, server: RpcServer, sock: socket.socket, peer: str,
                 attachment=None) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self._attachment = attachment  # a swap node's reserve, or None (never the reserve)
        self._sender = ReplySender(sock, server.send_poller, peer)
        self._assembler = rpc.RecordAssembler(server.max_record)
        # Calls between "received" and "replied", at most MAX_INFLIGHT_CALLS; the reader
        # waits on the condition at the limit, and for none at the end. (A counter rather
        # than a semaphore: the reader must also know when it is zero.)
        self._pending = 0
        self._replied = threading.Condition(threading.Lock())
        self._reader_waits = False  # only then does a reply notify (notify is not free)
        self._unread = bytearray(4)  # FIONREAD's answer

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def run(self) -> None:
        try:
            while self._serve_one():
                pass
        except rpc.RecordError as exc:
            self.server.counters.inc("rpc_protocol_errors", exc.reason)
            log.warning("%s %s: closing: %s", self.server.name, self.peer, exc)
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.info("%s %s: connection lost: %s", self.server.name, self.peer, exc)
        except Exception:
            self.server.counters.inc("internal_errors")
            log.exception("%s %s: internal error, closing the connection", self.server.name,
                          self.peer)
        finally:
            with self._replied:  # in-flight calls still reply on this socket
                while self._pending:
                    self._wait_for_reply()
            self.server.send_poller.forget(self._sender)
            self.sock.close()
            if self._attachment is not None:
                self._attachment.release()
            self.server.connection_closed(self)

    def _serve_one(self) -> bool:
        record = self._receive_record()
        if record is None:
            return False
        buffer, length = record
        with self._replied:
            while self._pending >= MAX_INFLIGHT_CALLS:
                self._wait_for_reply()
            alone = not self._pending
            self._pending += 1
        if alone and not self._bytes_waiting():
            self._execute(buffer, length)  # see the module docstring
        else:
            self.server.workers.submit_for(("rpc", self.peer), length, self._execute, buffer,
                                           length)
        return True

    def _bytes_waiting(self) -> bool:
        """Has the client sent more than we have read (another call behind this one)?"""
        try:
            fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, self._unread)
        except OSError:
            return True  # cannot tell: the workers, as before
        return self._unread != b"\0\0\0\0"

    def _receive_record(self):
        """(pool buffer, record length) for the next record, or None when the client closed
        between records. A record the assembler refuses (over the cap, empty) raises
        RecordError before anything is allocated for it."""
        header = self._recv_exact(4, allow_eof=True)
        if header is None:
            return None
        assembler = self._assembler
        length = assembler.begin_fragment(header)
        last = header[0] & 0x80  # the last-fragment bit, which begin_fragment has checked
        # One fragment (Linux and libnfs send one): a buffer of exactly its size. Several:
        # a buffer of the cap, as the total is known only at the last one.
        buffer = self._alloc(length if last else self.server.max_record)
        try:
            while True:
                start = assembler.received
                self._recv_into(buffer.view[start:start + length])
                record_length = assembler.end_fragment()
                if record_length is not None:
                    return buffer, record_length
                length = assembler.begin_fragment(self._recv_exact(4))
        except BaseException:
            buffer.release()
            raise

    def _alloc(self, size: int):
        """A record buffer. A swap node's connection may fall back to its reserve when normal
        memory is gone; others wait for normal memory (and so stop reading: backpressure)."""
        if self._attachment is not None:
            return self.server.pool.alloc(size, timeout=None, emergency=True,
                                          group=self._attachment.requests)
        return self.server.pool.alloc(size, timeout=None)

    def _recv_exact(self, count: int, allow_eof: bool = False) -> Optional[bytes]:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                if allow_eof and not data:
                    return None
                raise ConnectionError("client closed in the middle of a record")
            data += chunk
        return data

    def _recv_into(self, view: memoryview) -> None:
        received = 0
        while received < len(view):
            count = self.sock.recv_into(view[received:])
            if not count:
                raise ConnectionError("client closed in the middle of a record")
            received += count

    # Workers ------------------------------------------------------------------------

    def _execute(self, buffer, length: int) -> None:
        release: list = [buffer]
        try:
            parts = self._answer(buffer.view[:length], release)
        except Exception:
            self.server.counters.inc("internal_errors")
            log.exception("%s %s: call failed", self.server.name, self.peer)
            parts = None
        if parts is None:
            self._finished(release)
            return
        # Parts are bytes, or byte views of pool buffers: nbytes is their length on the wire.
        length = sum(part.nbytes if type(part) is memoryview else len(part) for part in parts)
        framed = [rpc.fragment_header(length), *parts]
        self._sender.send(framed, lambda: self._finished(release))

    def _finished(self, release: list) -> None:
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

    def _answer(self, record: memoryview, release: list) -> Optional[list]:
        """The reply's parts for one record, or None when it gets none."""
        counters, name = self.server.counters, self.server.name
        try:
            call = rpc.parse_call(record)
        except rpc.NotACall as exc:
            # Nothing to answer (no xid, or a REPLY): the stream cannot be trusted further.
            counters.inc("rpc_protocol_errors", exc.reason)
            log.warning("%s %s: closing: %s", name, self.peer, exc)
            self.close()
            return None
        except rpc.CallRejected as exc:
            counters.inc("rpc_protocol_errors", exc.reason)
            log.info("%s %s: call refused: %s", name, self.peer, exc)
            return [exc.reply()]
        program = self.server.programs.get(call.prog)
        if program is None:
            counters.inc("rpc_protocol_errors", "prog_unavail")
            return [rpc.accepted(call.xid, RC.PROG_UNAVAIL)]
        if call.vers != program.version:
            counters.inc("rpc_protocol_errors", "prog_mismatch")
            return [rpc.prog_mismatch(call.xid, program.version, program.version)]
        try:
            return program.call(call, self.peer, release, emergency=release[0].emergency)
        except Exception:
            # A bug of ours: the call gets SYSTEM_ERR rather than no reply, which a hard
            # mount would wait on forever.
            counters.inc("internal_errors")
            log.exception("%s %s: procedure %d failed", name, self.peer, call.proc)
            return [rpc.accepted(call.xid, RC.SYSTEM_ERR)]


class NfsService:
    """The NFS side of the daemon: the exports, and MOUNT and NFSv3 each on its listeners."""

    def __init__(self, config, pool, counters, workers, send_poller, lifecycle,
                 socket_policy) -> None:
        nfs = config.nfs
        self._counters = counters
        self.exports = NfsExports(config, config.daemon.state_dir)
        self.swap_nodes = (_SwapNodes(nfs, lifecycle, socket_policy, self.exports.swap)
                           if nfs.swap_export else None)
        max_record = nfs.max_io + RECORD_SLACK
        self.nfs = RpcServer("nfs", nfs.listen,
                             {nfs3.PROGRAM: nfs3.Nfs3Program(self.exports, pool, counters, nfs.max_io)},
                             pool, counters, workers, send_poller, max_record, "nfs.listen",
                             swap_nodes=self.swap_nodes)
        self.mount = RpcServer("mount", nfs.mount_listen,
                               {mount.PROGRAM: mount.MountProgram(self.exports, counters)},
                               pool, counters, workers, send_poller, max_record,
                               "nfs.mount_listen")

    def start(self, wipe: bool = False) -> None:
        """Listen; with `wipe` (swap.wipe), first zero what a previous run left in every
        node's swap file, before any client can reach it."""
        if wipe and self.exports.swap is not None:
            for node in self.exports.swap.nodes():
                if self.exports.swap.scrub(node) is not None:
                    self._counters.inc("wipes", f"nfs:{node}")
        self.mount.start()
        try:
            self.nfs.start()
        except BaseException:
            self.mount.stop()
            raise

    def stop(self) -> None:
        self.nfs.stop()
        self.mount.stop()
        self.exports.close()


class _NfsSwapNode:
    """A node's NFS swap, as the lifecycle sees an export: it attaches by node name, so a
    node that also swaps over NBD shares one reserve between the two. With swap.wipe the
    lifecycle discards its contents when the node detaches for good, through `backend`."""

    is_swap = True

    def __init__(self, node: str, swap_files) -> None:
        self.node = node
        self.name = f"nfs:{node}"
        self._swap_files = swap_files
        self.size = 0  # the whole file: the scrub knows its size
        self.backend = self  # the lifecycle's wipe calls backend.write_zeroes

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        # Zeroed in place, still fully allocated (a hole would make swapon refuse it), made
        # durable, and given a new generation so that handles from before go stale.
        self._swap_files.scrub(self.node)


class _SwapNodes:
    """Which NFS clients are swap nodes, and their attach to the reserve."""

    def __init__(self, nfs, lifecycle, socket_policy, swap_files) -> None:
        self._nfs = nfs
        self._lifecycle = lifecycle
        self.socket_policy = socket_policy
        self._swap_files = swap_files

    def node_of(self, peer: str):
        return self._nfs.node_of(peer)

    def attach(self, node: str):
        return self._lifecycle.attach(_NfsSwapNode(node, self._swap_files))
