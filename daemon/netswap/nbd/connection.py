"""One client connection: the socket side of the handshake and of transmission.

The reader (this connection's own thread) parses requests, takes each payload buffer from
the pool, receives WRITE payloads straight into it and hands the request to the shared
worker pool. A worker executes it on the export's backend and sends the reply under the
connection's send lock, so replies go out in completion order, each as one sendmsg of header
and data. The buffer goes back to the pool when the reply has been sent.

Bounds: at most `max_inflight` requests per connection are between "read" and "replied";
past that, and while the pool has no buffer, the reader stops reading, so the client's
excess waits in TCP buffers (backpressure), not in our memory.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Optional

from . import constants as C
from .errors import ProtocolError, nbd_error_from_os
from .handshake import Abort, Ready, Reply, ServerHandshake
from .transmission import ExportLimits, Request, RequestParser, check_request, reply_header

if TYPE_CHECKING:
    from .server import NbdServer

log = logging.getLogger("netswap.nbd")

# How long a blocked pool allocation waits before it checks whether the daemon is stopping.
_ALLOC_POLL = 0.5
# Rejected WRITE payloads are drained through a scratch buffer of at most this size.
_DRAIN_CHUNK = 256 * 1024


class _Stopping(Exception):
    """The daemon is shutting down while this connection waited for the pool."""


class Connection:
    def __init__(self, server: "NbdServer", sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.export = None
        self._send_lock = threading.Lock()
        self._inflight = threading.BoundedSemaphore(server.config.nbd.max_inflight)
        self._stopping = False
        self._broken = False  # a send failed: the client is gone, replies are pointless
        self._structured = False
        self._limits: Optional[ExportLimits] = None

    # Lifecycle ------------------------------------------------------------------

    def run(self) -> None:
        counters = self.server.counters
        try:
            if self._handshake():
                counters.inc("connections_transmission")
                self._transmission()
        except ProtocolError as exc:
            counters.inc("protocol_errors", exc.reason)
            log.warning("%s: closing: %s", self.peer, exc)
        except _Stopping:
            log.info("%s: closing for shutdown", self.peer)
        except (ConnectionError, TimeoutError, OSError) as exc:
            counters.inc("connection_lost", type(exc).__name__)
            log.info("%s: connection lost: %s", self.peer, exc)
        except Exception:
            # A bug of ours: it costs this one connection, never the daemon or other clients.
            counters.inc("internal_errors")
            log.exception("%s: internal error, closing the connection", self.peer)
        finally:
            self._finish()

    def stop(self) -> None:
        """Stop reading new requests; in-flight ones still complete and get replies."""
        self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # already closed by the peer

    def _finish(self) -> None:
        # Wait for every in-flight request: its worker still needs the socket to reply,
        # and its buffer must be back in the pool before the connection is gone.
        for _ in range(self.server.config.nbd.max_inflight):
            self._inflight.acquire()
        try:
            self.sock.close()
        finally:
            self.server.connection_closed(self)

    # Handshake ------------------------------------------------------------------

    def _handshake(self) -> bool:
        """Haggle options; True when the connection enters transmission."""
        server = self.server
        handshake = ServerHandshake(server.registry.lookup, server.registry.list, server.block_limits)
        try:
            return self._haggle(handshake)
        finally:
            if handshake.lookup_failures:
                server.counters.inc("export_open_failures", amount=handshake.lookup_failures)

    def _haggle(self, handshake: ServerHandshake) -> bool:
        deadline = time.monotonic() + self.server.config.nbd.handshake_timeout
        self.sock.sendall(handshake.greeting())
        while True:
            event = handshake.next_event()
            if event is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProtocolError("handshake timed out", "handshake_timeout")
                self.sock.settimeout(remaining)
                try:
                    data = self.sock.recv(4096)
                except socket.timeout:
                    raise ProtocolError("handshake timed out", "handshake_timeout") from None
                if not data:
                    log.debug("%s: closed during the handshake", self.peer)
                    return False
                handshake.receive_data(data)
                continue
            self.sock.sendall(event.data)
            if isinstance(event, Reply):
                continue
            if isinstance(event, Abort):
                log.debug("%s: client aborted the handshake", self.peer)
                return False
            assert isinstance(event, Ready)
            self.sock.settimeout(None)
            self._enter_transmission(event)
            return True

    def _enter_transmission(self, ready: Ready) -> None:
        export = ready.export
        nbd = self.server.config.nbd
        self.export = export
        self._structured = ready.structured_replies
        self._limits = ExportLimits(
            size=export.size,
            read_only=export.read_only,
            minimum_block=nbd.block_size_min,
            maximum_payload=nbd.max_request,
            structured_replies=ready.structured_replies,
        )
        log.info(
            "%s: attached to export %r (%d bytes%s%s)", self.peer, export.name, export.size,
            ", read-only" if export.read_only else "",
            ", structured replies" if ready.structured_replies else "",
        )

    # Transmission -----------------------------------------------------------------

    def _transmission(self) -> None:
        parser = RequestParser()
        sock = self.sock
        while not self._stopping:
            request = parser.next_request()
            if request is None:
                received = sock.recv_into(parser.recv_window())
                if not received:
                    return  # the client closed (or stop() shut the read side)
                parser.advance(received)
                continue
            if request.command == C.CMD_DISC:
                log.debug("%s: disconnect requested", self.peer)
                return  # _finish() completes what is in flight before closing
            self._dispatch(request, parser)

    def _dispatch(self, request: Request, parser: RequestParser) -> None:
        error = check_request(request, self._limits)
        if error:
            self.server.counters.inc("request_errors", f"{request.name}:{error}")
            if request.has_payload:
                self._drain_payload(request, parser)
            log.debug("%s: %r rejected with error %d", self.peer, request, error)
            self._inflight.acquire()
            self._reply(request, error, None)
            return

        self._inflight.acquire()
        buffer = None
        try:
            if request.command in (C.CMD_READ, C.CMD_WRITE):
                buffer = self._alloc(request.length)
            if request.has_payload:
                self._receive_payload(parser, buffer.view)
        except BaseException:
            if buffer is not None:
                buffer.release()
            self._inflight.release()
            raise
        self.server.workers.submit(self._execute, request, buffer)

    def _alloc(self, size: int):
        """A pool buffer; waits (and so stops reading the socket) while the pool is empty."""
        pool = self.server.pool
        while True:
            buffer = pool.alloc(size, timeout=_ALLOC_POLL)
            if buffer is not None:
                return buffer
            if self._stopping or self.server.stopping:
                raise _Stopping()
            self.server.counters.inc("pool_waits")

    def _receive_payload(self, parser: RequestParser, view: memoryview) -> None:
        received = parser.take_payload(view)
        while received < len(view):
            count = self.sock.recv_into(view[received:])
            if not count:
                raise ConnectionError("client closed in the middle of a WRITE payload")
            parser.payload_received(count)
            received += count

    def _drain_payload(self, request: Request, parser: RequestParser) -> None:
        """Consume a rejected WRITE's payload so the stream stays in sync.

        Up to the larger of 32 MiB (which the spec says is never a denial of service) and our
        maximum request, the payload is read through a scratch pool buffer and discarded;
        beyond that the connection is closed without reading (or allocating) it.
        """
        limit = max(C.DOS_SAFE_PAYLOAD, self.server.config.nbd.max_request)
        if request.length > limit:
            raise ProtocolError(
                f"WRITE payload of {request.length} bytes exceeds the drain limit {limit}",
                "write_too_large",
            )
        if not parser.payload_left:
            return  # a zero-length WRITE has nothing to drain
        scratch = self._alloc(min(request.length, _DRAIN_CHUNK))
        try:
            view = scratch.view
            while parser.payload_left:
                chunk = view[: min(len(view), parser.payload_left)]
                if parser.take_payload(chunk):
                    continue
                count = self.sock.recv_into(chunk)
                if not count:
                    raise ConnectionError("client closed in the middle of a WRITE payload")
                parser.payload_received(count)
        finally:
            scratch.release()

    # Execution (worker threads) ---------------------------------------------------

    def _execute(self, request: Request, buffer) -> None:
        backend = self.export.backend
        command = request.command
        fua = bool(request.flags & C.CMD_FLAG_FUA)
        error = 0
        try:
            if command == C.CMD_READ:
                backend.read_into(request.offset, buffer.view)
            elif command == C.CMD_WRITE:
                backend.write_from(request.offset, buffer.view, fua)
            elif command == C.CMD_FLUSH:
                backend.flush()
            elif command == C.CMD_TRIM:
                backend.trim(request.offset, request.length, fua)
            elif command == C.CMD_WRITE_ZEROES:
                may_trim = not request.flags & C.CMD_FLAG_NO_HOLE
                backend.write_zeroes(request.offset, request.length, may_trim, fua)
            elif command == C.CMD_CACHE:
                backend.cache(request.offset, request.length)
        except OSError as exc:
            error = nbd_error_from_os(exc)
            self.server.counters.inc("io_errors", f"{request.name}:{error}")
            log.warning("%s: %r on %r failed: %s", self.peer, request, self.export.name, exc)
        except Exception:
            error = C.EIO
            self.server.counters.inc("io_errors", f"{request.name}:{error}")
            log.exception("%s: %r on %r failed", self.peer, request, self.export.name)
        data = buffer.view if command == C.CMD_READ and not error else None
        try:
            self._reply(request, error, data)
        finally:
            if buffer is not None:
                buffer.release()

    def _reply(self, request: Request, error: int, data: Optional[memoryview]) -> None:
        """Send the reply and release the request's in-flight slot."""
        try:
            header = reply_header(request, error, self._structured)
            with self._send_lock:
                if self._broken:
                    return
                try:
                    if data is None:
                        self.sock.sendall(header)
                    else:
                        _sendmsg_all(self.sock, header, data)
                except OSError as exc:
                    self._broken = True
                    log.info("%s: reply not sent, client gone: %s", self.peer, exc)
        finally:
            self._inflight.release()


def _sendmsg_all(sock: socket.socket, header: bytes, data: memoryview) -> None:
    """Send header and data with as few syscalls as the socket allows (usually one)."""
    sent = sock.sendmsg([header, data])
    total = len(header) + len(data)
    if sent == total:
        return
    if sent < len(header):
        sock.sendall(header[sent:])
        sent = len(header)
    sock.sendall(data[sent - len(header) :])
