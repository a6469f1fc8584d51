"""NBD negotiation over a connection: the sans-I/O `ServerHandshake` driven on its channel.

`negotiate` sends the greeting, feeds the client's bytes to the handshake and sends what it
answers, upgrades the channel to TLS at STARTTLS, and ends when the client enters
transmission (a `Negotiated`), aborts or closes (None). The whole of it, TLS included, has
`nbd.handshake_timeout`: a client that stalls is dropped with a ProtocolError. Refused
options, export lookups that failed and TLS handshakes are counted here.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Optional

from ..counters import declare
from . import constants as C
from .channel import Channel
from .context import ConnectionContext
from .errors import ProtocolError
from .handshake import Abort, Ready, Reply, ServerHandshake, StartTls
from .refusallevel import RefusalLogLevel
from .tls import TlsHandshakeError

HANDSHAKE_FAILED = declare(
    "nbd", "handshake_failed", "netswap_handshakes_failed_total",
    "Connections that ended in the handshake without GO, EXPORT_NAME or ABORT, by reason (a "
    "protocol error's reason, connection_lost, closed, or truncated: closed in the middle of a "
    "message).",
    label="reason")
OPTIONS_REFUSED = declare(
    "nbd", "options_refused", "netswap_options_refused_total",
    "Handshake options answered with an error reply, by reason (unsupported_option, "
    "malformed_option, needs_structured_replies, unknown_export, export_unavailable, "
    "attach_refused).",
    label="reason")
EXPORT_OPEN_FAILURES = declare(
    "nbd", "export_open_failures", "netswap_export_open_failures_total",
    "Exports that exist but could not be opened for a client.")
TLS_HANDSHAKES = declare(
    "nbd", "tls_handshakes", "netswap_tls_handshakes_total",
    "TLS sessions established after STARTTLS, by TLS version.",
    label="version")
TLS_HANDSHAKE_FAILURES = declare(
    "nbd", "tls_handshake_failures", "netswap_tls_handshake_failures_total",
    "TLS handshakes after STARTTLS that failed (the connection was closed), by reason.",
    label="reason")
TLS_REQUIRED_REFUSALS = declare(
    "nbd", "tls_required_refusals", "netswap_tls_required_refusals_total",
    "Options refused with ERR_TLS_REQD (or EXPORT_NAME closed) because the listener requires "
    "TLS.")

log = logging.getLogger("netswap.nbd")


@dataclass(frozen=True)
class Negotiated:
    ready: Ready  # the export, its attachment, and what the client negotiated
    early_requests: bytes  # requests the client pipelined behind its GO


def negotiate(context: ConnectionContext, channel: Channel, peer: str, identity,
              tls_mode: str, refusals: RefusalLogLevel) -> Optional[Negotiated]:
    """Haggle options with the client `identity` at `peer`; a `Negotiated` when the
    connection enters transmission, None when the client ended the handshake."""
    access, counters = context.access, context.counters

    # The export table as this client may see it: its identity is bound in here, so the
    # sans-I/O handshake never learns about sockets or peers.
    def lookup(name):
        return access.lookup(name, identity)

    def listing():
        return access.list(identity)

    def attach(export):
        return access.attach(export, identity)

    handshake = ServerHandshake(lookup, listing, context.block_limits, attach, tls=tls_mode,
                                describe=access.describe)
    try:
        return _haggle(context, channel, peer, handshake, refusals)
    finally:
        if handshake.lookup_failures:
            counters.inc(EXPORT_OPEN_FAILURES, amount=handshake.lookup_failures)
        if handshake.tls_refusals:
            counters.inc(TLS_REQUIRED_REFUSALS, amount=handshake.tls_refusals)
            log.info("%s: %d option(s) refused before TLS (TLS is required)", peer,
                     handshake.tls_refusals)


def _haggle(context: ConnectionContext, channel: Channel, peer: str,
            handshake: ServerHandshake, refusals: RefusalLogLevel) -> Optional[Negotiated]:
    deadline = time.monotonic() + context.settings.handshake_timeout
    channel.sendall(handshake.greeting())
    while True:
        event = handshake.next_event()
        if event is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProtocolError("handshake timed out", "handshake_timeout")
            channel.settimeout(remaining)
            try:
                data = channel.recv_handshake()
            except socket.timeout:
                raise ProtocolError("handshake timed out", "handshake_timeout") from None
            if not data:
                _closed_in_handshake(context, peer, handshake.partial_message)
                return None
            handshake.receive_data(data)
            continue
        if isinstance(event, StartTls):
            channel.sendall(event.data)  # the ACK, the last thing in the clear
            _start_tls(context, channel, peer, deadline)
            handshake.tls_established()
            continue
        channel.sendall(event.data)
        if isinstance(event, Reply):
            if event.refused:
                _option_refused(context, peer, event, refusals)
            continue
        if isinstance(event, Abort):
            log.debug("%s: client aborted the handshake", peer)
            return None
        assert isinstance(event, Ready)
        channel.settimeout(None)
        return Negotiated(event, handshake.trailing_data)


def _option_refused(context: ConnectionContext, peer: str, reply: Reply,
                    refusals: RefusalLogLevel) -> None:
    context.counters.inc(OPTIONS_REFUSED, reply.refused)
    name = C.OPTION_NAMES.get(reply.option, f"option {reply.option}")
    log.log(refusals.next(), "%s: %s refused (%s): %s", peer, name, reply.refused,
            reply.message)


def _closed_in_handshake(context: ConnectionContext, peer: str, partial: int) -> None:
    # A client must end the handshake with GO, EXPORT_NAME or ABORT; one that just
    # closes is counted, and one that closes in the middle of a message is a truncation.
    if partial:
        context.counters.inc(HANDSHAKE_FAILED, "truncated")
        log.warning("%s: closed in the middle of a handshake message (%d bytes of it sent)",
                    peer, partial)
    else:
        context.counters.inc(HANDSHAKE_FAILED, "closed")
        log.info("%s: closed during the handshake", peer)


def _start_tls(context: ConnectionContext, channel: Channel, peer: str, deadline: float) -> None:
    try:
        session = channel.start_tls(context.tls_context, deadline)
    except TlsHandshakeError as exc:
        context.counters.inc(TLS_HANDSHAKE_FAILURES, exc.failure)
        raise  # the connection logs it and closes alone
    context.counters.inc(TLS_HANDSHAKES, session.version)
    subject = session.peer_subject
    log.info("%s: %s established%s", peer, session.version,
             f", client certificate {subject}" if subject else "")
