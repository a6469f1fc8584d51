"""The sans-I/O client handshake of netswap-node, against netswapd's own sans-I/O server
handshake (no socket) and byte by byte against hand-made server replies (against a live
netswapd: tests/daemon/test_nbd_client_live.py)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from netswap.errors import AttachRefused
from netswap.nbd import constants as C
from netswap.nbd.client import (ClientHandshake, OptionRefused, SimpleReplyReader,
                                read_request)
from netswap.nbd.errors import ProtocolError
from netswap.nbd.handshake import BlockLimits, Ready, Reply, ServerHandshake


@dataclass
class Export:
    name: str
    size: int = 1 << 20
    read_only: bool = False
    description: str = "an export"


EXPORTS = {"disk": Export("disk")}
LIMITS = BlockLimits(1, 4096, 32 << 20)

GREETING = ServerHandshake.greeting()


def haggle(client: ClientHandshake, server: ServerHandshake):
    """Pass bytes between the two until the server is ready or refuses; the last event."""
    client.receive_data(GREETING)
    server.receive_data(client.data_to_send())
    while True:
        event = server.next_event()
        assert event is not None
        client.receive_data(event.data)
        if isinstance(event, Ready):
            return event
        server.receive_data(client.data_to_send())


def test_go_against_the_server_handshake_gives_size_flags_and_block_sizes():
    server = ServerHandshake(EXPORTS.get, lambda: [], LIMITS)
    client = ClientHandshake("disk")
    event = haggle(client, server)
    assert isinstance(event, Ready)
    assert not event.structured_replies  # the kernel reads simple replies only
    assert server.no_zeroes
    export = client.export
    assert (export.name, export.size) == ("disk", EXPORTS["disk"].size)
    assert export.transmission_flags == event.transmission_flags
    assert export.transmission_flags & C.TFLAG_CAN_MULTI_CONN
    assert (export.block_minimum, export.block_preferred, export.block_maximum) == (
        LIMITS.minimum, LIMITS.preferred, LIMITS.maximum_payload)


def test_the_bytes_sent_are_client_flags_then_one_go_asking_for_block_sizes():
    client = ClientHandshake("swap/n1")
    client.receive_data(GREETING)
    sent = client.data_to_send()
    name = b"swap/n1"
    go = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, C.INFO_BLOCK_SIZE)
    assert sent == (struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE | C.CLIENT_FLAG_NO_ZEROES)
                    + struct.pack(">QII", C.IHAVEOPT, C.OPT_GO, len(go)) + go)


def reply(reply_type: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", C.OPTION_REPLY_MAGIC, C.OPT_GO, reply_type, len(data)) + data


def test_a_reserve_full_server_is_an_option_refused_with_its_message():
    def refusing_attach(export):
        raise AttachRefused("pool cannot hold another node's reserve", "max_nodes")

    server = ServerHandshake(EXPORTS.get, lambda: [], LIMITS, attach=refusing_attach)
    client = ClientHandshake("disk")
    client.receive_data(GREETING)
    server.receive_data(client.data_to_send())
    event = server.next_event()
    assert isinstance(event, Reply) and event.refused
    with pytest.raises(OptionRefused) as refused:
        client.receive_data(event.data)
    assert refused.value.reply_type == C.REP_ERR_POLICY
    assert "ERR_POLICY" in str(refused.value)


def test_an_unknown_export_is_err_unknown():
    server = ServerHandshake(EXPORTS.get, lambda: [], LIMITS)
    client = ClientHandshake("nothing")
    client.receive_data(GREETING)
    server.receive_data(client.data_to_send())
    with pytest.raises(OptionRefused) as refused:
        client.receive_data(server.next_event().data)
    assert refused.value.reply_type == C.REP_ERR_UNKNOWN


@pytest.mark.parametrize("server_bytes, reason", [
    (b"NBDMAGIC" + b"x" * 10, "bad_magic"),
    (struct.pack(">QQH", C.NBDMAGIC, C.IHAVEOPT, 0), "not_fixed_newstyle"),
    (GREETING + reply(C.REP_ACK), "no_export_info"),
    (GREETING + reply(C.REP_INFO, b"\0"), "bad_info"),
    (GREETING + reply(C.REP_INFO, struct.pack(">HQ", C.INFO_EXPORT, 1)), "bad_info"),
    (GREETING + struct.pack(">QIII", C.OPTION_REPLY_MAGIC, C.OPT_GO, C.REP_INFO, 1 << 20),
     "reply_too_long"),
    (GREETING + struct.pack(">QIII", 1, C.OPT_GO, C.REP_ACK, 0), "bad_reply"),
    (GREETING + reply(C.REP_INFO, struct.pack(">HQH", C.INFO_EXPORT, 4096, 1))
     + reply(C.REP_ACK) + b"early", "unexpected_data"),
])
def test_a_server_breaking_the_protocol_is_a_protocol_error(server_bytes, reason):
    client = ClientHandshake("disk")
    with pytest.raises(ProtocolError) as error:
        for byte in range(len(server_bytes)):  # one byte at a time: no message boundary assumed
            client.receive_data(server_bytes[byte:byte + 1])
    assert error.value.reason == reason


def test_the_header_read_is_one_read_and_its_simple_reply():
    assert read_request(7, 0, 4096) == struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ,
                                                   7, 0, 4096)
    reader = SimpleReplyReader(7, 4)
    reader.receive_data(struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, 0, 7) + b"ab")
    assert reader.data is None
    reader.receive_data(b"cd")
    assert reader.data == b"abcd"
    with pytest.raises(OSError):
        SimpleReplyReader(7, 4).receive_data(struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, 5, 7))
    with pytest.raises(ProtocolError):
        SimpleReplyReader(7, 4).receive_data(struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, 0, 8))
