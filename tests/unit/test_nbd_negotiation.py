"""Negotiation driven over a scripted channel: what is sent, counted and returned, with no
socket (the handshake's own option paths are in test_nbd_handshake.py)."""

import logging
import socket
import struct
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from netswap.counters import Counters
from netswap.nbd import constants as C
from netswap.nbd.errors import ProtocolError
from netswap.nbd.handshake import GREETING, BlockLimits
from netswap.nbd.negotiation import negotiate
from netswap.nbd.refusallevel import RefusalLogLevel

CLIENT_FLAGS = struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE | C.CLIENT_FLAG_NO_ZEROES)


@dataclass
class FakeExport:
    name: str
    size: int = 1 << 20
    read_only: bool = False
    description: str = "a test export"


class FakeAccess:
    """The export table as AccessControl shows it; records who asked."""

    def __init__(self, exports, broken=()):
        self.exports = exports
        self.broken = broken  # names whose lookup fails like an export that cannot open
        self.identities = []
        self.attached = []

    def lookup(self, name, identity):
        self.identities.append(identity)
        if name in self.broken:
            raise OSError(28, "No space left on device")
        return self.exports.get(name)

    def list(self, identity):
        self.identities.append(identity)
        return [(e.name, e.description) for e in self.exports.values()]

    def attach(self, export, identity):
        self.identities.append(identity)
        self.attached.append(export.name)
        return f"attachment of {export.name}"

    def describe(self, export):
        return f"{export.description}, as access describes it"


class ScriptedChannel:
    """A channel whose client sends `incoming`, one chunk per read, then closes (b"")."""

    def __init__(self, *incoming):
        self.incoming = list(incoming)
        self.sent = b""
        self.timeouts = []
        self.tls = None

    def sendall(self, data):
        self.sent += data

    def settimeout(self, seconds):
        self.timeouts.append(seconds)

    def recv_handshake(self):
        if not self.incoming:
            return b""
        chunk = self.incoming.pop(0)
        if isinstance(chunk, Exception):
            raise chunk
        return chunk


def option(opt, data=b""):
    return struct.pack(">QII", C.IHAVEOPT, opt, len(data)) + data


def go(name: bytes):
    return option(C.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))


def context(access, timeout=10.0):
    return SimpleNamespace(access=access, counters=Counters(),
                           block_limits=BlockLimits(1, 4096, 32 << 20), tls_context=None,
                           settings=SimpleNamespace(handshake_timeout=timeout))


def run(channel, access=None, timeout=10.0, tls_mode="off"):
    access = access if access is not None else FakeAccess({"disk": FakeExport("disk")})
    ctx = context(access, timeout)
    result = negotiate(ctx, channel, "peer", "the identity", tls_mode, RefusalLogLevel())
    return result, ctx


def test_go_enters_transmission_with_the_attachment_and_pipelined_requests():
    pipelined = b"\x25\x60\x95\x13" + bytes(24)  # a request header sent right behind GO
    channel = ScriptedChannel(CLIENT_FLAGS, go(b"disk") + pipelined)
    access = FakeAccess({"disk": FakeExport("disk")})
    negotiated, _ = run(channel, access)
    assert negotiated.ready.export.name == "disk"
    assert negotiated.ready.attachment == "attachment of disk"
    assert negotiated.early_requests == pipelined
    assert channel.sent.startswith(GREETING)
    assert access.identities and set(access.identities) == {"the identity"}
    # Transmission has no deadline: the handshake's is lifted when it ends.
    assert channel.timeouts[-1] is None


def test_info_describes_an_export_as_access_does():
    name = b"disk"
    info = option(C.OPT_INFO, struct.pack(">I", len(name)) + name
                  + struct.pack(">HH", 1, C.INFO_DESCRIPTION))
    channel = ScriptedChannel(CLIENT_FLAGS, info + option(C.OPT_ABORT))
    assert run(channel)[0] is None
    assert b"a test export, as access describes it" in channel.sent


def test_a_clean_close_in_the_handshake_is_counted_as_closed():
    negotiated, ctx = run(ScriptedChannel(CLIENT_FLAGS))
    assert negotiated is None
    assert ctx.counters.get("handshake_failed", "closed") == 1
    assert ctx.counters.get("handshake_failed", "truncated") == 0


def test_a_close_in_the_middle_of_a_message_is_a_truncation():
    negotiated, ctx = run(ScriptedChannel(CLIENT_FLAGS, go(b"disk")[:10]))
    assert negotiated is None
    assert ctx.counters.get("handshake_failed", "truncated") == 1


def test_abort_ends_the_handshake_without_transmission():
    negotiated, ctx = run(ScriptedChannel(CLIENT_FLAGS, option(C.OPT_ABORT)))
    assert negotiated is None
    assert ctx.counters.get("handshake_failed", "closed") == 0


def test_refused_options_are_counted_and_only_the_first_is_logged_at_info(caplog):
    channel = ScriptedChannel(CLIENT_FLAGS, go(b"nope"), go(b"nope"), go(b"disk"))
    with caplog.at_level(logging.DEBUG, logger="netswap.nbd"):
        negotiated, ctx = run(channel)
    assert negotiated.ready.export.name == "disk"
    assert ctx.counters.get("options_refused", "unknown_export") == 2
    levels = [r.levelno for r in caplog.records if "refused (unknown_export)" in r.getMessage()]
    assert levels == [logging.INFO, logging.DEBUG]


def test_an_export_that_cannot_open_is_counted():
    access = FakeAccess({"disk": FakeExport("disk")}, broken={"disk"})
    negotiated, ctx = run(ScriptedChannel(CLIENT_FLAGS, go(b"disk")), access)
    assert negotiated is None
    assert ctx.counters.get("export_open_failures") == 1
    assert ctx.counters.get("options_refused", "export_unavailable") == 1


def test_options_refused_for_want_of_tls_are_counted():
    channel = ScriptedChannel(CLIENT_FLAGS, go(b"disk"))
    negotiated, ctx = run(channel, tls_mode="require")
    assert negotiated is None
    assert ctx.counters.get("tls_required_refusals") == 1


def test_a_client_that_stalls_is_dropped_at_the_deadline():
    channel = ScriptedChannel(CLIENT_FLAGS, socket.timeout("timed out"))
    with pytest.raises(ProtocolError) as caught:
        run(channel)
    assert caught.value.reason == "handshake_timeout"
    assert 0 < channel.timeouts[0] <= 10.0


def test_a_spent_deadline_drops_the_client_before_it_reads_again():
    channel = ScriptedChannel(CLIENT_FLAGS)
    with pytest.raises(ProtocolError) as caught:
        run(channel, timeout=0.0)
    assert caught.value.reason == "handshake_timeout"
    assert channel.incoming == [CLIENT_FLAGS]  # nothing was read
