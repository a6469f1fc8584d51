"""One client connection's life: negotiate, then serve requests, then close.

The connection's own thread runs it all. Negotiation (negotiation.py) drives the sans-I/O
handshake over the socket, upgrading it to TLS on STARTTLS; a client that enters
transmission is served by a `RequestReader` (reader.py), whose requests workers execute and
reply to (execution.py). Whatever ends the connection (the client, a protocol error, a
lost socket, shutdown, a bug of ours) ends this connection alone: it is counted, logged,
and everything the connection held goes back once its requests in flight are replied.

Everything the connection needs from the server that accepted it comes in its
`ConnectionContext` (context.py).

The reserve (the seed's parts 1, 2 and 4). A connection is *tagged* emergency when it
attaches to a swap export, or at accept when its peer is in `swap.node_networks` (the
SK_MEMALLOC socket: tagged before anyone knows what it will carry). A tagged connection's
buffers may fall back to its group's reservation when the normal budget is gone; untagged
ones wait or get ENOMEM, never the reserve (allocation.py).
"""

from __future__ import annotations

import logging
import socket
from typing import Optional

from ..counters import declare
from ..netpolicy import SOCKET_TAG_FAILURES, tag_emergency
from ..protect import shorten_slice
from ..transport.frontend import INTERNAL_ERRORS
from .allocation import Stopping
from .channel import Channel
from .context import ConnectionContext
from .errors import ProtocolError
from .negotiation import HANDSHAKE_FAILED, Negotiated, negotiate
from .reader import PROTOCOL_ERRORS, RequestReader
from .refusallevel import RefusalLogLevel

CONNECTION_LOST = declare(
    "nbd", "connection_lost", "netswap_connections_lost_total",
    "Connections ended by a socket error, by exception.",
    label="reason")
CONNECTIONS_TAGGED = declare(
    "nbd", "connections_tagged", "netswap_swap_connections_tagged_total",
    "NBD swap connections whose buffers may come from the reserve (tagged at accept or on "
    "attaching a swap export).")
HANDSHAKES_COMPLETED = declare(
    "nbd", "connections_transmission", "netswap_handshakes_completed_total",
    "NBD connections that finished their handshake and entered transmission.")

log = logging.getLogger("netswap.nbd")


class Connection:
    def __init__(self, context: ConnectionContext, sock: socket.socket, peer: str,
                 client: str, identity, tagged: bool = False) -> None:
        self.context = context
        self.sock = sock
        self.peer = peer
        self.client = client  # the address connection limits count by
        self.identity = identity  # access.ClientIdentity, read at accept
        self.export = None  # set once the handshake attached one
        self._channel = Channel(sock)
        # Fixed for the connection's life: a reload changes it for new connections only.
        self._tls_mode = context.settings.tls_mode(unix=sock.family == socket.AF_UNIX)
        self._refusals = RefusalLogLevel()  # shared by refused options and requests
        self._reader: Optional[RequestReader] = None  # made when transmission begins
        self._attachment = None
        self._stopping = False
        self.tagged = False  # may this connection's buffers come from the reserve?
        if tagged:
            self._tag()

    # Lifecycle ------------------------------------------------------------------

    def run(self) -> None:
        counters = self.context.counters
        try:
            negotiated = negotiate(self.context, self._channel, self.peer, self.identity,
                                   self._tls_mode, self._refusals)
            if negotiated is not None:
                self._enter_transmission(negotiated)
                counters.inc(HANDSHAKES_COMPLETED)
                self._reader.run(negotiated.early_requests)
        except ProtocolError as exc:
            counters.inc(PROTOCOL_ERRORS, exc.reason)
            if self.export is None:  # still in the handshake
                counters.inc(HANDSHAKE_FAILED, exc.reason)
            log.warning("%s: closing: %s", self.peer, exc)
        except Stopping:
            log.info("%s: closing for shutdown", self.peer)
        except (ConnectionError, TimeoutError, OSError) as exc:
            counters.inc(CONNECTION_LOST, type(exc).__name__)
            if self.export is None:
                counters.inc(HANDSHAKE_FAILED, "connection_lost")
            log.info("%s: connection lost: %s", self.peer, exc)
        except Exception:
            # A bug of ours: it costs this one connection, never the daemon or other clients.
            counters.inc(INTERNAL_ERRORS)
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
        try:
            if self._reader is not None:
                self._reader.close()  # waits for every request in flight
            self._channel.close()
            if self._attachment is not None:
                self._attachment.release()
        finally:
            self.context.closed(self)

    def _tag(self) -> None:
        """Mark this connection as serving swap, here and in the kernel (priority, DSCP, mark,
        socket buffers sized for its in-flight data)."""
        if self.tagged:
            return
        self.tagged = True
        self.context.counters.inc(CONNECTIONS_TAGGED)
        for problem in tag_emergency(self.sock, self.context.swap_socket_policy):
            self.context.counters.inc(SOCKET_TAG_FAILURES)
            log.warning("%s: socket tagging incomplete: %s", self.peer, problem)

    def _enter_transmission(self, negotiated: Negotiated) -> None:
        ready = negotiated.ready
        export = ready.export
        self.export = export
        self._attachment = ready.attachment
        if ready.attachment is not None and ready.attachment.is_swap:
            self._tag()
            shorten_slice()  # this thread: a page fault of the node waits on it
        self._reader = RequestReader(self.context, self._channel, self.peer, self.client, ready,
                                     tagged=self.tagged, refusals=self._refusals,
                                     stopping=lambda: self._stopping)
        log.info(
            "%s: attached to export %r (%d bytes%s%s)", self.peer, export.name, export.size,
            ", read-only" if export.read_only else "",
            ", structured replies" if ready.structured_replies else "",
        )
