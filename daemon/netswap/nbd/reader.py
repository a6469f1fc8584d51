"""The reader side of transmission: one connection's requests, from the socket to a worker.

The reader (the connection's own thread) parses requests, takes each payload buffer from the
pool, receives WRITE payloads straight into it and hands the request to the shared worker
pool, queued under the connection's flow (its swap node, or its client address) so that
workers are shared fairly between nodes; `Execution` does the rest on the worker.

On a plain (non-TLS) connection to a file export, the reader first lets the C request loop
(fastloop.py) serve what it can: plain READs and WRITEs, on this thread, without the GIL.
It stops at the first request that needs anything decided here and leaves it to the path
above, then takes over again; replies of both paths share the socket through the sender's
gate.

Bounds: at most `nbd.max_inflight` requests are between "read" and "replied"; past that,
and while the pool has no buffer, the reader stops reading, so the client's excess waits in
TCP buffers (backpressure), not in our memory.

Receiving and routing are separate steps, as in the kernel: a buffer filled from the
reserve that turns out to serve a non-swap export is released unprocessed and counted (the
skb->emergency drop rule).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from ..counters import declare
from ..exports.backends import FileBackend
from ..reserve.tree import EMERGENCY_DROPPED
from ..transport.frontend import C_LOOP_HANDOFFS
from ..transport.sender import ReplySender
from . import constants as C
from . import fastloop
from .allocation import BufferAllocator
from .channel import Channel
from .context import ConnectionContext
from .errors import ProtocolError
from .execution import Execution
from .handshake import Ready
from .refusallevel import RefusalLogLevel
from .transmission import (BLOCK_STATUS_BUFFER, DEFAULT_WINDOW, ExportLimits, Request,
                           RequestParser, refusal)

PROTOCOL_ERRORS = declare(
    "nbd", "protocol_errors", "netswap_protocol_errors_total",
    "Connections closed for breaking the protocol.",
    label="reason")
NON_SWAP_ENOMEM = declare(
    "nbd", "enomem", "netswap_non_swap_enomem_total",
    "Non-swap requests answered ENOMEM because the normal budget was gone.",
    label="export")
PRESSURE_THROTTLED = declare(
    "nbd", "pressure_throttled", "netswap_pressure_throttled_total",
    "Non-swap requests passed one at a time under memory pressure.",
    label="export")

log = logging.getLogger("netswap.nbd")


class RequestReader:
    def __init__(self, context: ConnectionContext, channel: Channel, peer: str, client: str,
                 ready: Ready, *, tagged: bool, refusals: RefusalLogLevel,
                 stopping: Callable[[], bool]) -> None:
        """Set up transmission for the export `ready` attached: the receive window (which may
        wait for the pool: `Stopping`), the reply sender and, where it applies, the C loop.
        `stopping` says whether the connection was told to stop reading."""
        settings = context.settings
        export = ready.export
        self._context = context
        self._counters = context.counters
        self._channel = channel
        self._peer = peer
        self._refusals = refusals
        self._stopping = stopping
        self._export = export
        self._is_swap = ready.attachment is not None and ready.attachment.is_swap
        # Whose fair share of the workers this connection's requests use.
        self._flow = ("node", export.node) if self._is_swap else ("client", client)
        # The pool group an emergency allocation is charged to (requests, then the window).
        if self._is_swap:
            self._group = ready.attachment.requests
            window_group = ready.attachment.windows
        elif tagged:
            # Tagged by its peer address but serving a non-swap export: what it receives
            # before routing is charged to the unrouted group, and dropped at routing.
            self._group = window_group = context.unrouted
        else:
            self._group = window_group = None
        self._allocator = BufferAllocator(
            context.pool, context.counters, tagged=tagged, swap=self._is_swap,
            stopping=lambda: stopping() or context.stopping())
        # Fixed for the connection's life: a reload changes it for new connections only.
        self._max_inflight = settings.max_inflight
        self._inflight = threading.BoundedSemaphore(self._max_inflight)
        self._window = self._allocator.alloc(DEFAULT_WINDOW, window_group, wait=True)
        try:
            self._sender = ReplySender(channel.sock, context.send_poller, peer, seal=channel.seal)
            self._execution = Execution(context.counters, peer, export, self._sender,
                                        ready.structured_replies, self._inflight,
                                        ready.allocation_context)
            self._limits = ExportLimits(
                size=export.size,
                read_only=export.read_only,
                minimum_block=settings.block_size_min,
                maximum_payload=settings.max_request,
                structured_replies=ready.structured_replies,
                block_status=ready.allocation_context is not None,
            )
            self._fast: Optional[fastloop.FastLoop] = None
            if settings.c_loop and channel.tls is None and isinstance(export.backend, FileBackend):
                self._fast = fastloop.FastLoop(
                    sock_fd=channel.sock.fileno(), backend=export.backend, pool=context.pool,
                    window=self._window, limits=self._limits, group=self._group,
                    gate=self._sender.gate,
                    reserve=self._is_swap,
                    # Swap requests never pass the pressure throttle; non-swap ones do.
                    run_gate=None if self._is_swap else context.non_swap_fast_gate,
                    stats=context.counters.requests, export_name=export.name,
                    counters=context.counters,
                    follow_receiving_cpu=settings.follow_receiving_cpu)
        except BaseException:
            self._window.release()  # close() is only for a reader that was made
            raise

    def close(self) -> None:
        """Wait until every request read has been replied (its worker still needs the socket
        to reply, and its buffer must be back in the pool), then let go of the window, the
        C loop and the sender. The caller closes the socket after."""
        for _ in range(self._max_inflight):
            self._inflight.acquire()
        self._context.send_poller.forget(self._sender)
        if self._fast is not None:
            self._fast.close()
        self._window.release()

    # Reading ------------------------------------------------------------------------

    def run(self, early_requests: bytes) -> None:
        """Serve requests until the client disconnects or closes, or the connection stops."""
        parser = RequestParser(self._window.view)
        # Requests the client pipelined behind its GO arrived with the handshake's last read.
        parser.receive_data(early_requests)
        while not self._stopping():
            if self._fast is not None:
                if not self._serve_fast(parser):
                    return  # the client closed (or stop() shut the read side)
            request = parser.next_request()
            if request is None:
                received = self._channel.recv_into(parser.recv_window())
                if not received:
                    return  # the client closed (or stop() shut the read side)
                parser.advance(received)
                continue
            if request.command == C.CMD_DISC:
                log.debug("%s: disconnect requested", self._peer)
                if parser.buffered:
                    # The client MUST NOT send after DISC; what it did is not served.
                    self._counters.inc(PROTOCOL_ERRORS, "requests_after_disc")
                    log.warning("%s: %d bytes sent after DISC ignored", self._peer,
                                parser.buffered)
                return  # close() completes what is in flight
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
                self._counters.inc(C_LOOP_HANDOFFS, "python")
                return True
            if reason in (fastloop.SYNC_FAILED, fastloop.RECHECK):
                # A FLUSH whose sync failed or whose file changed: the backend has failed
                # (fastloop.serve), and Python's FLUSH answers it with EIO (or, had the
                # check found nothing after all, syncs again).
                request, started = fast.request(), fast.started_ns
                self._inflight.acquire()
                self._counters.inc(C_LOOP_HANDOFFS, "sync_error")
                self._execution.flush(request, None, started)
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
        self._counters.inc(C_LOOP_HANDOFFS,
                           "queued_reply" if reason == fastloop.PARTIAL else "write_error")
        if reason == fastloop.PARTIAL:
            # Replies were queued, or the socket took only part of this one: the sender
            # finishes it (its rest first, if part is on the wire), then frees the buffer.
            done = self._execution.completion(request, 0, started, buffer)
            if fast.sent:
                self._sender.resume(fast.unsent_reply(buffer), done)
            else:
                self._sender.send(fast.unsent_reply(buffer), done)
        else:
            assert reason == fastloop.WRITE_ERROR, reason
            error = fast.error
            self._export.backend.write_failed(error)
            self._execution.reply(request, self._execution.io_error(request, error), None,
                                  started, buffer)
        return True

    def _dispatch(self, request: Request, parser: RequestParser, started: int) -> None:
        # Every request holds an in-flight slot from here until its reply is sent.
        self._inflight.acquire()
        buffer = None
        throttle = None
        try:
            error, problem = refusal(request, self._limits)
            if error:
                # Counted by the reply, in netswap_request_errors_total{op, errno}.
                log.log(self._refusals.next(), "%s: %r rejected with error %d: %s",
                        self._peer, request, error, problem)
                self._refuse(request, parser, error, started)
                return
            if request.command in (C.CMD_READ, C.CMD_WRITE, C.CMD_BLOCK_STATUS):
                # A BLOCK_STATUS reply's descriptors are a payload too, of a size the server
                # bounds: from the pool, like a READ's data.
                size = (BLOCK_STATUS_BUFFER if request.command == C.CMD_BLOCK_STATUS
                        else request.length)
                buffer = self._allocator.alloc(size, self._group,
                                               wait=self._is_swap or self._context.non_swap_waits)
                if buffer is None:
                    # Non-swap, normal budget gone, and the policy is to fail rather than wait.
                    self._counters.inc(NON_SWAP_ENOMEM, self._export.name)
                    self._refuse(request, parser, C.ENOMEM, started)
                    return
            if request.has_payload:
                self._receive_payload(parser, buffer.view)
            if buffer is not None and buffer.emergency and not self._is_swap:
                # Routing: reserve memory bound for a non-swap consumer is released unprocessed.
                self._counters.inc(EMERGENCY_DROPPED, self._export.name)
                log.info("%s: dropped %r: reserve memory bound for non-swap export %r",
                         self._peer, request, self._export.name)
                buffer.release()
                buffer = None
                self._execution.reply(request, C.ENOMEM, None, started)
                return
            throttle = self._throttle()
            if request.command == C.CMD_FLUSH:
                # Off the workers: answered by the backend's group commit (execution.py).
                self._execution.flush(request, throttle, started)
                return
        except BaseException:
            if buffer is not None:
                buffer.release()
            self._inflight.release()
            raise
        cost = request.length if request.command in (C.CMD_READ, C.CMD_WRITE) else 0
        self._context.workers.submit_for(self._flow, cost, self._execution.execute, request,
                                         buffer, throttle, started)

    def _refuse(self, request: Request, parser: RequestParser, error: int, started: int) -> None:
        """Reply `error` to a request that will not be executed, keeping the stream in sync.
        The caller holds the request's in-flight slot; the reply releases it."""
        if request.has_payload:
            self._drain_payload(request, parser)
        self._execution.reply(request, error, None, started)

    def _throttle(self) -> Optional[threading.Semaphore]:
        """Under memory pressure, non-swap requests run one at a time daemon-wide; swap
        requests never wait here. Returns the semaphore to release after the reply, or None."""
        pressure = self._context.pressure
        if self._is_swap or pressure is None or not pressure.emergency:
            return None
        self._counters.inc(PRESSURE_THROTTLED, self._export.name)
        self._context.non_swap_throttle.acquire()
        return self._context.non_swap_throttle

    def _receive_payload(self, parser: RequestParser, view: memoryview) -> None:
        received = parser.take_payload(view)
        while received < len(view):
            count = self._channel.recv_into(view[received:])
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
        limit = max(C.DOS_SAFE_PAYLOAD, self._context.settings.max_request)
        if request.length > limit:
            raise ProtocolError(
                f"WRITE payload of {request.length} bytes exceeds the drain limit {limit}",
                "write_too_large",
            )
        while parser.payload_left:
            if parser.discard_payload():
                continue
            count = self._channel.recv_into(parser.recv_window())
            if not count:
                raise ConnectionError("client closed in the middle of a WRITE payload")
            parser.advance(count)
