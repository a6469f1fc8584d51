"""One client connection: the socket side of the handshake and of transmission.

The reader (this connection's own thread) parses requests, takes each payload buffer from
the pool, receives WRITE payloads straight into it and hands the request to the shared
worker pool, queued under the connection's flow (its swap node, or its client address) so
that workers are shared fairly between nodes. A worker executes it on the export's backend
and hands the reply to the connection's `ReplySender`: replies go out in completion order,
each as one sendmsg of header and data, and a client slow to read them never holds a
worker. The buffer goes back to the pool when the reply has been sent.

On a plain (non-TLS) connection to a file export, the reader first lets the C request loop
(fastloop.py) serve what it can: plain READs and WRITEs, on this thread, without the GIL.
It stops at the first request that needs anything decided here and leaves it to the path
above, then takes over again; replies of both paths share the socket through the
sender's gate.

Bounds: at most `max_inflight` requests per connection are between "read" and "replied";
past that, and while the pool has no buffer, the reader stops reading, so the client's
excess waits in TCP buffers (backpressure), not in our memory.

The reserve (the seed's parts 1, 2 and 4). A connection is *tagged* emergency when it
attaches to a swap export, or at accept when its peer is in `swap.node_networks` (the
SK_MEMALLOC socket: tagged before anyone knows what it will carry). A tagged connection's
buffers may fall back to its group's reservation when the normal budget is gone; untagged
ones wait or get ENOMEM, never the reserve. Receiving and routing are separate steps, as in
the kernel: a buffer filled from the reserve that turns out to serve a non-swap export is
released unprocessed and counted (the skb->emergency drop rule).
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Optional

from ..exports.backends import FileBackend
from ..netpolicy import tag_emergency
from ..protect import shorten_slice
from . import constants as C
from . import fastloop
from .errors import ProtocolError, nbd_error_from_os
from .handshake import Abort, Ready, Reply, ServerHandshake, StartTls
from .sender import ReplySender
from .tls import TlsHandshakeError, TlsSession
from .transmission import (
    DEFAULT_WINDOW,
    ExportLimits,
    Request,
    RequestParser,
    refusal,
    reply_header,
)

if TYPE_CHECKING:
    from .server import NbdServer

log = logging.getLogger("netswap.nbd")

# How long a blocked pool allocation waits before it checks whether the daemon is stopping.
_ALLOC_POLL = 0.5


class _Stopping(Exception):
    """The daemon is shutting down while this connection waited for the pool."""


class Connection:
    def __init__(self, server: "NbdServer", sock: socket.socket, peer: str, tagged: bool = False) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.client = peer  # the address connection limits count by (set by the server)
        self.identity = None  # access.ClientIdentity, read at accept (set by the server)
        self.export = None
        self._sender: Optional[ReplySender] = None  # made when transmission begins
        self._flow = None  # whose fair share of the workers this connection's requests use
        # Fixed for the connection's life: a reload changes it for new connections only.
        self._max_inflight = server.config.nbd.max_inflight
        self._inflight = threading.BoundedSemaphore(self._max_inflight)
        self._fast: Optional[fastloop.FastLoop] = None  # the C request loop, where it applies
        self._tls_mode = server.config.nbd.tls_mode(unix=sock.family == socket.AF_UNIX)
        self._tls_context = server.tls_context
        self._tls: Optional[TlsSession] = None  # set once STARTTLS succeeded
        self._stopping = False
        self._structured = False
        self._limits: Optional[ExportLimits] = None
        self._attachment = None
        self._early_requests = b""
        self._window = None  # the pool buffer the request parser receives into
        self._is_swap = False
        self._refusal_logged = False  # see _refusal_log_level
        self.tagged = False  # may this connection's buffers come from the reserve?
        self._group = None  # the pool group an emergency allocation is charged to
        if tagged:
            self._tag()

    # Lifecycle ------------------------------------------------------------------

    def run(self) -> None:
        counters = self.server.counters
        try:
            if self._handshake():
                counters.inc("connections_transmission")
                self._transmission()
        except ProtocolError as exc:
            counters.inc("protocol_errors", exc.reason)
            if self.export is None:  # still in the handshake
                counters.inc("handshake_failed", exc.reason)
            log.warning("%s: closing: %s", self.peer, exc)
        except _Stopping:
            log.info("%s: closing for shutdown", self.peer)
        except (ConnectionError, TimeoutError, OSError) as exc:
            counters.inc("connection_lost", type(exc).__name__)
            if self.export is None:
                counters.inc("handshake_failed", "connection_lost")
            log.info("%s: connection lost: %s", self.peer, exc)
        except Exception:
            # A bug of ours: it costs this one connection, never the daemon or other clients.
            counters.inc("internal_errors")
            log.exception("%s: internal error, closing the connection", self.peer)
        finally:
            self._finish()

    def stop(self) -> None:
        """Stop reading new requests; in-flight ones still complete and get replies."""
        self._shut(socket.SHUT_RD)

    def close_now(self) -> None:
        """Cut the connection (an operator's detach): requests still in flight complete on
        the backend, but their replies have nowhere to go."""
        self._shut(socket.SHUT_RDWR)

    def _shut(self, how: int) -> None:
        self._stopping = True
        try:
            self.sock.shutdown(how)
        except OSError:
            pass  # already closed by the peer

    def _finish(self) -> None:
        # Wait for every in-flight request: its worker still needs the socket to reply,
        # and its buffer must be back in the pool before the connection is gone.
        for _ in range(self._max_inflight):
            self._inflight.acquire()
        try:
            if self._sender is not None:
                self.server.send_poller.forget(self._sender)
            if self._fast is not None:
                self._fast.close()
            if self._tls is not None:
                self._tls.close()
            self.sock.close()
            if self._window is not None:
                self._window.release()
            if self._attachment is not None:
                self._attachment.release()
        finally:
            self.server.connection_closed(self)

    def _tag(self) -> None:
        """Mark this connection as serving swap, here and in the kernel (priority, DSCP, mark,
        socket buffers sized for its in-flight data)."""
        if self.tagged:
            return
        self.tagged = True
        self.server.counters.inc("connections_tagged")
        for problem in tag_emergency(self.sock, self.server.swap_socket_policy):
            self.server.counters.inc("socket_tag_failures")
            log.warning("%s: socket tagging incomplete: %s", self.peer, problem)

    # Handshake ------------------------------------------------------------------

    def _handshake(self) -> bool:
        """Haggle options; True when the connection enters transmission."""
        server = self.server
        access, client = server.access, self.identity

        # The export table as this client may see it: its identity is bound in here, so the
        # sans-I/O handshake never learns about sockets or peers.
        def lookup(name):
            return access.lookup(name, client)

        def listing():
            return access.list(client)

        def attach(export):
            return access.attach(export, client)

        handshake = ServerHandshake(lookup, listing, server.block_limits, attach,
                                    tls=self._tls_mode)
        try:
            return self._haggle(handshake)
        finally:
            if handshake.lookup_failures:
                server.counters.inc("export_open_failures", amount=handshake.lookup_failures)
            if handshake.tls_refusals:
                server.counters.inc("tls_required_refusals", amount=handshake.tls_refusals)
                log.info("%s: %d option(s) refused before TLS (TLS is required)", self.peer,
                         handshake.tls_refusals)

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
                    data = self._recv_handshake()
                except socket.timeout:
                    raise ProtocolError("handshake timed out", "handshake_timeout") from None
                if not data:
                    self._closed_in_handshake(handshake.partial_message)
                    return False
                handshake.receive_data(data)
                continue
            if isinstance(event, StartTls):
                self.sock.sendall(event.data)  # the ACK, the last thing in the clear
                self._start_tls(deadline)
                handshake.tls_established()
                continue
            self._send_plain_or_tls(event.data)
            if isinstance(event, Reply):
                if event.refused:
                    self._option_refused(event)
                continue
            if isinstance(event, Abort):
                log.debug("%s: client aborted the handshake", self.peer)
                return False
            assert isinstance(event, Ready)
            self.sock.settimeout(None)
            self._enter_transmission(event)
            self._early_requests = handshake.trailing_data
            return True

    def _option_refused(self, reply: Reply) -> None:
        self.server.counters.inc("options_refused", reply.refused)
        name = C.OPTION_NAMES.get(reply.option, f"option {reply.option}")
        log.log(self._refusal_log_level(), "%s: %s refused (%s): %s", self.peer, name,
                reply.refused, reply.message)

    def _refusal_log_level(self) -> int:
        """A connection's first refused option or request is logged at info, later ones at
        debug: bad input shows at the default level, but a client sending it in a loop
        cannot flood the log (its counters still count every one)."""
        if self._refusal_logged:
            return logging.DEBUG
        self._refusal_logged = True
        return logging.INFO

    def _closed_in_handshake(self, partial: int) -> None:
        # A client must end the handshake with GO, EXPORT_NAME or ABORT; one that just
        # closes is counted, and one that closes in the middle of a message is a truncation.
        if partial:
            self.server.counters.inc("handshake_failed", "truncated")
            log.warning("%s: closed in the middle of a handshake message (%d bytes of it sent)",
                        self.peer, partial)
        else:
            self.server.counters.inc("handshake_failed", "closed")
            log.info("%s: closed during the handshake", self.peer)

    def _start_tls(self, deadline: float) -> None:
        session = TlsSession(self._tls_context, self.sock)
        try:
            session.handshake(deadline)
        except TlsHandshakeError as exc:
            self.server.counters.inc("tls_handshake_failures", exc.failure)
            raise  # run() logs it and closes this connection alone
        self._tls = session
        self.server.counters.inc("tls_handshakes", session.version)
        subject = session.peer_subject
        log.info("%s: %s established%s", self.peer, session.version,
                 f", client certificate {subject}" if subject else "")

    def _send_plain_or_tls(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.sendall([data])
        else:
            self.sock.sendall(data)

    def _recv_handshake(self) -> bytes:
        if self._tls is None:
            return self.sock.recv(4096)
        buffer = bytearray(4096)
        return bytes(buffer[: self._tls.recv_into(memoryview(buffer))])

    def _recv_into(self, view: memoryview) -> int:
        """The transmission phase's one way to receive: through TLS once it is on."""
        if self._tls is not None:
            return self._tls.recv_into(view)
        return self.sock.recv_into(view)

    def _enter_transmission(self, ready: Ready) -> None:
        export = ready.export
        nbd = self.server.config.nbd
        self.export = export
        self._attachment = ready.attachment
        self._structured = ready.structured_replies
        self._sender = ReplySender(self.sock, self.server.send_poller, self.peer,
                                   seal=self._tls.seal if self._tls is not None else None)
        self._flow = ("client", self.client)
        if ready.attachment is not None and ready.attachment.is_swap:
            self._is_swap = True
            self._flow = ("node", export.node)
            self._tag()
            shorten_slice()  # this thread: a page fault of the node waits on it
            self._group = ready.attachment.requests
            window_group = ready.attachment.windows
        elif self.tagged:
            # Tagged by its peer address but serving a non-swap export: what it receives
            # before routing is charged to the unrouted group, and dropped at routing.
            self._group = window_group = self.server.lifecycle.unrouted
        else:
            window_group = None
        self._window = self._alloc(DEFAULT_WINDOW, window_group, wait=True)
        self._limits = ExportLimits(
            size=export.size,
            read_only=export.read_only,
            minimum_block=nbd.block_size_min,
            maximum_payload=nbd.max_request,
            structured_replies=ready.structured_replies,
        )
        if nbd.c_loop and self._tls is None and isinstance(export.backend, FileBackend):
            self._fast = fastloop.FastLoop(
                sock_fd=self.sock.fileno(), backend=export.backend, pool=self.server.pool,
                window=self._window, limits=self._limits, group=self._group,
                gate=self._sender.gate,
                reserve=self._is_swap,
                # Swap requests never pass the pressure throttle; non-swap ones do.
                run_gate=None if self._is_swap else self.server.non_swap_fast_gate,
                stats=self.server.counters.requests, export_name=export.name)
        log.info(
            "%s: attached to export %r (%d bytes%s%s)", self.peer, export.name, export.size,
            ", read-only" if export.read_only else "",
            ", structured replies" if ready.structured_replies else "",
        )

    # Transmission -----------------------------------------------------------------

    def _transmission(self) -> None:
        parser = RequestParser(self._window.view)
        # Requests the client pipelined behind its GO arrived with the handshake's last read.
        parser.receive_data(self._early_requests)
        while not self._stopping:
            if self._fast is not None:
                if not self._serve_fast(parser):
                    return  # the client closed (or stop() shut the read side)
            request = parser.next_request()
            if request is None:
                received = self._recv_into(parser.recv_window())
                if not received:
                    return  # the client closed (or stop() shut the read side)
                parser.advance(received)
                continue
            if request.command == C.CMD_DISC:
                log.debug("%s: disconnect requested", self.peer)
                if parser.buffered:
                    # The client MUST NOT send after DISC; what it did is not served.
                    self.server.counters.inc("protocol_errors", "requests_after_disc")
                    log.warning("%s: %d bytes sent after DISC ignored", self.peer, parser.buffered)
                return  # _finish() completes what is in flight before closing
            # A request's latency runs from here (its header parsed) to its reply sent.
            self._dispatch(request, parser, time.perf_counter_ns())

    def _serve_fast(self, parser: RequestParser) -> bool:
        """Let the C loop serve requests until one needs Python (then it is buffered for the
        parser) or it hands one back half done; False when the client closed."""
        fast = self._fast
        while True:
            reason = fast.serve(parser)
            if reason == fastloop.CHECK:
                continue  # the backend's periodic check is done: go on
            if reason == fastloop.FALLBACK:
                self.server.counters.inc("c_loop_handoffs", "python")
                return True
            if reason == fastloop.CLOSED:
                return False
            if reason == fastloop.SOCKET_ERROR:
                raise fast.error
            if reason == fastloop.PAYLOAD_CUT:
                raise ConnectionError("client closed in the middle of a WRITE payload")
            break
        # A request the loop received but hands over: from here on it is Python's, as if
        # dispatched here (it takes an in-flight slot like any other).
        request, buffer, started = fast.request(), fast.buffer(), fast.started_ns
        self._inflight.acquire()
        self.server.counters.inc("c_loop_handoffs",
                                 "queued_reply" if reason == fastloop.PARTIAL else "write_error")
        if reason == fastloop.PARTIAL:
            # Replies were queued, or the socket took only part of this one: the sender
            # finishes it (its rest first, if part is on the wire), then frees the buffer.
            done = functools.partial(self._replied, request, 0, started, buffer, None)
            if fast.sent:
                self._sender.resume(fast.unsent_reply(buffer), done)
            else:
                self._sender.send(fast.unsent_reply(buffer), done)
        else:
            assert reason == fastloop.WRITE_ERROR, reason
            error = fast.error
            self.export.backend.write_failed(error)
            self._reply(request, self._io_error(request, error), None, started, buffer)
        return True

    def _dispatch(self, request: Request, parser: RequestParser, started: int) -> None:
        # Every request holds an in-flight slot from here until its reply is sent.
        self._inflight.acquire()
        buffer = None
        throttle = None
        try:
            error, problem = refusal(request, self._limits)
            if error:
                # Labelled by a bounded name: a client must not mint a counter per command number.
                op = C.COMMAND_NAMES.get(request.command, "unknown")
                self.server.counters.inc("request_errors", f"{op}:{error}")
                log.log(self._refusal_log_level(), "%s: %r rejected with error %d: %s",
                        self.peer, request, error, problem)
                self._refuse(request, parser, error, started)
                return
            if request.command in (C.CMD_READ, C.CMD_WRITE):
                buffer = self._alloc(request.length, self._group,
                                     wait=self._is_swap or self.server.non_swap_waits)
                if buffer is None:
                    # Non-swap, normal budget gone, and the policy is to fail rather than wait.
                    self.server.counters.inc("enomem", self.export.name)
                    self._refuse(request, parser, C.ENOMEM, started)
                    return
            if request.has_payload:
                self._receive_payload(parser, buffer.view)
            if buffer is not None and buffer.emergency and not self._is_swap:
                # Routing: reserve memory bound for a non-swap consumer is released unprocessed.
                self.server.counters.inc("emergency_dropped", self.export.name)
                log.info("%s: dropped %r: reserve memory bound for non-swap export %r",
                         self.peer, request, self.export.name)
                buffer.release()
                buffer = None
                self._reply(request, C.ENOMEM, None, started)
                return
            throttle = self._throttle()
        except BaseException:
            if buffer is not None:
                buffer.release()
            self._inflight.release()
            raise
        cost = request.length if request.command in (C.CMD_READ, C.CMD_WRITE) else 0
        self.server.workers.submit_for(self._flow, cost, self._execute, request, buffer,
                                       throttle, started)

    def _refuse(self, request: Request, parser: RequestParser, error: int, started: int) -> None:
        """Reply `error` to a request that will not be executed, keeping the stream in sync.
        The caller holds the request's in-flight slot; the reply releases it."""
        if request.has_payload:
            self._drain_payload(request, parser)
        self._reply(request, error, None, started)

    def _throttle(self):
        """Under memory pressure, non-swap requests run one at a time daemon-wide; swap
        requests never wait here. Returns the semaphore to release after the reply, or None."""
        pressure = self.server.pressure
        if self._is_swap or pressure is None or not pressure.emergency:
            return None
        self.server.counters.inc("pressure_throttled", self.export.name)
        self.server.non_swap_throttle.acquire()
        return self.server.non_swap_throttle

    def _alloc(self, size: int, group, wait: bool):
        """A pool buffer, from the reserve if this connection is tagged and normal memory is
        gone. With `wait`, waits while the pool has nothing (and so stops reading the socket:
        TCP backpressure); without, returns None at once."""
        pool = self.server.pool
        emergency = self.tagged and group is not None
        group = group if emergency else None
        buffer = pool.alloc(size, emergency=emergency, group=group)
        if buffer is not None or not wait:
            return buffer
        # Held back: counted once per request, by who was held.
        self.server.counters.inc("pool_waits", "swap" if self._is_swap else "non_swap")
        while buffer is None:
            if self._stopping or self.server.stopping:
                raise _Stopping()
            buffer = pool.alloc(size, timeout=_ALLOC_POLL, emergency=emergency, group=group)
        return buffer

    def _receive_payload(self, parser: RequestParser, view: memoryview) -> None:
        received = parser.take_payload(view)
        while received < len(view):
            count = self._recv_into(view[received:])
            if not count:
                raise ConnectionError("client closed in the middle of a WRITE payload")
            parser.payload_received(count)
            received += count

    def _drain_payload(self, request: Request, parser: RequestParser) -> None:
        """Consume a refused WRITE's payload so the stream stays in sync.

        Up to the larger of 32 MiB (which the spec says is never a denial of service) and our
        maximum request, the payload passes through the connection's receive window (a pool
        buffer) and is discarded; beyond that the connection is closed without reading (or
        allocating) it.
        """
        limit = max(C.DOS_SAFE_PAYLOAD, self.server.config.nbd.max_request)
        if request.length > limit:
            raise ProtocolError(
                f"WRITE payload of {request.length} bytes exceeds the drain limit {limit}",
                "write_too_large",
            )
        while parser.payload_left:
            if parser.discard_payload():
                continue
            count = self._recv_into(parser.recv_window())
            if not count:
                raise ConnectionError("client closed in the middle of a WRITE payload")
            parser.advance(count)

    # Execution (worker threads) ---------------------------------------------------

    def _execute(self, request: Request, buffer, throttle, started: int) -> None:
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
            error = self._io_error(request, exc)
        except Exception:
            error = C.EIO
            self.server.counters.inc("io_errors", f"{request.name}:{error}")
            log.exception("%s: %r on %r failed", self.peer, request, self.export.name)
        data = buffer.view if command == C.CMD_READ and not error else None
        self._reply(request, error, data, started, buffer, throttle)

    def _io_error(self, request: Request, exc: OSError) -> int:
        """Count and log a failed backend call; the NBD error its reply carries."""
        error = nbd_error_from_os(exc)
        self.server.counters.inc("io_errors", f"{request.name}:{error}")
        log.warning("%s: %r on %r failed: %s", self.peer, request, self.export.name, exc)
        return error

    def _reply(self, request: Request, error: int, data: Optional[memoryview], started: int,
               buffer=None, throttle=None) -> None:
        """Queue the reply; once it is sent (or the client is gone) the request's buffer,
        throttle and in-flight slot are released."""
        done = functools.partial(self._replied, request, error, started, buffer, throttle)
        try:
            header = reply_header(request, error, self._structured)
            parts = (header,) if data is None else (header, data)
        except BaseException:
            done()
            raise
        self._sender.send(parts, done)

    def _replied(self, request: Request, error: int, started: int, buffer, throttle) -> None:
        try:
            if buffer is not None:
                buffer.release()
            if throttle is not None:
                throttle.release()
            # Accounted before the slot is released, so a connection that has ended has
            # all its requests in the statistics.
            self.server.counters.requests.observe(self.export.name, request.command,
                                                  request.length, error,
                                                  time.perf_counter_ns() - started)
        finally:
            self._inflight.release()
