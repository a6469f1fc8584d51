"""The sans-I/O handshake: every option path, byte for byte, with no socket."""

import struct

import pytest

from netswap.nbd import constants as C
from netswap.nbd.errors import ProtocolError
from netswap.nbd.handshake import (
    MAX_OPTION_DATA,
    MAX_OPTIONS,
    Abort,
    Ready,
    Reply,
    ServerHandshake,
)
from support.handshake import EXPORTS, LIMITS, info_data, option, parse_replies


def make(client_flags=C.CLIENT_FLAG_FIXED_NEWSTYLE | C.CLIENT_FLAG_NO_ZEROES):
    hs = ServerHandshake(EXPORTS.get, lambda: [(e.name, e.description) for e in EXPORTS.values()], LIMITS)
    hs.receive_data(struct.pack(">I", client_flags))
    return hs


def send(hs, opt, data=b""):
    hs.receive_data(option(opt, data))
    return hs.next_event()


def test_greeting_is_fixed_newstyle_with_no_zeroes():
    magic, ihaveopt, flags = struct.unpack(">QQH", ServerHandshake.greeting())
    assert (magic, ihaveopt) == (C.NBDMAGIC, C.IHAVEOPT)
    assert flags == C.FLAG_FIXED_NEWSTYLE | C.FLAG_NO_ZEROES


def test_needs_more_data_is_none_not_an_error():
    hs = ServerHandshake(EXPORTS.get, lambda: [], LIMITS)
    assert hs.next_event() is None
    hs.receive_data(b"\x00\x00")
    assert hs.next_event() is None
    hs.receive_data(b"\x00\x03")
    whole = option(C.OPT_LIST)
    for i in range(len(whole) - 1):
        hs.receive_data(whole[i : i + 1])
        assert hs.next_event() is None
    hs.receive_data(whole[-1:])
    assert isinstance(hs.next_event(), Reply)


@pytest.mark.parametrize("flags", [0, 0x4, C.CLIENT_FLAG_FIXED_NEWSTYLE | 0x80])
def test_bad_client_flags_close(flags):
    hs = make(flags)
    with pytest.raises(ProtocolError):
        hs.next_event()


def test_bad_option_magic_closes():
    hs = make()
    hs.receive_data(struct.pack(">QII", 0x1234, C.OPT_LIST, 0))
    with pytest.raises(ProtocolError) as err:
        hs.next_event()
    assert err.value.reason == "bad_option_magic"


def test_oversized_option_closes_without_buffering():
    hs = make()
    hs.receive_data(struct.pack(">QII", C.IHAVEOPT, C.OPT_GO, MAX_OPTION_DATA + 1))
    with pytest.raises(ProtocolError) as err:
        hs.next_event()
    assert err.value.reason == "option_too_long"


def test_option_count_is_bounded():
    hs = make()
    for _ in range(MAX_OPTIONS):
        assert isinstance(send(hs, C.OPT_STARTTLS), Reply)
    with pytest.raises(ProtocolError):
        send(hs, C.OPT_STARTTLS)


# STARTTLS has its own replies (tests/daemon/test_tls.py).
# (LIST_META_CONTEXT and SET_META_CONTEXT: test_nbd_meta_context.py.)
@pytest.mark.parametrize("opt", [C.OPT_PEEK_EXPORT, C.OPT_EXTENDED_HEADERS, 0x7654321])
def test_unsupported_options_get_err_unsup_and_haggling_continues(opt):
    hs = make()
    event = send(hs, opt, b"xyz")
    assert isinstance(event, Reply)
    [(echo, rtype, message)] = parse_replies(event.data)
    assert echo == opt and rtype == C.REP_ERR_UNSUP and message
    assert isinstance(send(hs, C.OPT_LIST), Reply)


def test_abort_acks_then_closes():
    hs = make()
    event = send(hs, C.OPT_ABORT)
    assert isinstance(event, Abort)
    assert parse_replies(event.data) == [(C.OPT_ABORT, C.REP_ACK, b"")]
    assert hs.done


def test_list_names_every_export_then_acks():
    event = send(make(), C.OPT_LIST)
    replies = parse_replies(event.data)
    assert replies[-1] == (C.OPT_LIST, C.REP_ACK, b"")
    names = []
    for opt, rtype, payload in replies[:-1]:
        assert rtype == C.REP_SERVER
        (n,) = struct.unpack_from(">I", payload)
        names.append((payload[4 : 4 + n].decode(), payload[4 + n :].decode()))
    assert names == [("disk", "a test export"), ("ro", "read only")]


def test_list_with_data_is_invalid():
    [(_, rtype, _)] = parse_replies(send(make(), C.OPT_LIST, b"x").data)
    assert rtype == C.REP_ERR_INVALID


def test_info_returns_requested_items_and_stays_in_handshake():
    hs = make()
    event = send(hs, C.OPT_INFO, info_data(b"disk", [C.INFO_BLOCK_SIZE, C.INFO_NAME, C.INFO_DESCRIPTION, 999]))
    assert isinstance(event, Reply) and not hs.done
    replies = parse_replies(event.data)
    assert replies[-1][1] == C.REP_ACK
    infos = {struct.unpack_from(">H", p)[0]: p[2:] for _, t, p in replies[:-1] if t == C.REP_INFO}
    size, flags = struct.unpack(">QH", infos[C.INFO_EXPORT])
    assert size == 1 << 20
    assert flags & C.TFLAG_HAS_FLAGS and flags & C.TFLAG_SEND_FLUSH and flags & C.TFLAG_SEND_FUA
    assert flags & C.TFLAG_SEND_TRIM and flags & C.TFLAG_SEND_WRITE_ZEROES and flags & C.TFLAG_CAN_MULTI_CONN
    assert flags & C.TFLAG_SEND_CACHE and not flags & C.TFLAG_READ_ONLY
    assert flags & C.TFLAG_SEND_FAST_ZERO
    assert infos[C.INFO_NAME] == b"disk"
    assert infos[C.INFO_DESCRIPTION] == b"a test export"
    assert struct.unpack(">III", infos[C.INFO_BLOCK_SIZE]) == (1, 4096, 32 << 20)
    assert 999 not in infos


def description_of(event) -> bytes:
    infos = {struct.unpack_from(">H", p)[0]: p[2:]
             for _, t, p in parse_replies(event.data) if t == C.REP_INFO}
    return infos[C.INFO_DESCRIPTION]


def test_the_description_is_asked_for_at_each_request():
    free = iter([3, 2])
    hs = ServerHandshake(EXPORTS.get, lambda: [], LIMITS,
                         describe=lambda export: f"{export.name}: {next(free)} of 8 free")
    hs.receive_data(struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE))
    ask = info_data(b"disk", [C.INFO_DESCRIPTION])
    assert description_of(send(hs, C.OPT_INFO, ask)) == b"disk: 3 of 8 free"
    assert description_of(send(hs, C.OPT_GO, ask)) == b"disk: 2 of 8 free"


def test_go_like_the_kernel_client_no_info_requests():
    hs = make(C.CLIENT_FLAG_FIXED_NEWSTYLE)
    event = send(hs, C.OPT_GO, info_data(b"disk"))
    assert isinstance(event, Ready) and hs.done
    assert not event.structured_replies
    replies = parse_replies(event.data)
    assert [r[1] for r in replies] == [C.REP_INFO, C.REP_ACK]
    assert struct.unpack_from(">H", replies[0][2])[0] == C.INFO_EXPORT


def test_go_read_only_export_advertises_read_only_and_no_write_commands():
    event = send(make(), C.OPT_GO, info_data(b"ro"))
    assert event.transmission_flags & C.TFLAG_READ_ONLY
    assert not event.transmission_flags & (C.TFLAG_SEND_TRIM | C.TFLAG_SEND_WRITE_ZEROES
                                           | C.TFLAG_SEND_FUA | C.TFLAG_SEND_FAST_ZERO)


@pytest.mark.parametrize("name", [b"nope", b"swap/../etc", b"\xff\xfe", b"disk\x00"])
def test_go_unknown_export_is_err_unknown_and_haggling_continues(name):
    hs = make()
    event = send(hs, C.OPT_GO, info_data(name))
    assert isinstance(event, Reply)
    [(_, rtype, message)] = parse_replies(event.data)
    assert rtype == C.REP_ERR_UNKNOWN and message
    assert isinstance(send(hs, C.OPT_GO, info_data(b"disk")), Ready)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x00\x00", struct.pack(">I", 100) + b"disk\x00\x00",
     info_data(b"disk")[:-1], info_data(b"disk") + b"\x00", info_data(b"disk", [1])[:-2]],
)
def test_malformed_info_is_err_invalid(data):
    [(_, rtype, _)] = parse_replies(send(make(), C.OPT_INFO, data).data)
    assert rtype == C.REP_ERR_INVALID


def test_structured_reply_negotiation():
    hs = make()
    assert parse_replies(send(hs, C.OPT_STRUCTURED_REPLY).data)[0][1] == C.REP_ACK
    assert parse_replies(send(hs, C.OPT_STRUCTURED_REPLY).data)[0][1] == C.REP_ERR_INVALID
    event = send(hs, C.OPT_GO, info_data(b"disk"))
    assert event.structured_replies
    assert event.transmission_flags & C.TFLAG_SEND_DF


def test_structured_reply_with_data_is_invalid():
    assert parse_replies(send(make(), C.OPT_STRUCTURED_REPLY, b"x").data)[0][1] == C.REP_ERR_INVALID


def test_export_name_with_and_without_zeroes():
    event = send(make(C.CLIENT_FLAG_FIXED_NEWSTYLE), C.OPT_EXPORT_NAME, b"disk")
    assert isinstance(event, Ready)
    assert len(event.data) == 8 + 2 + 124 and event.data[10:] == bytes(124)
    size, flags = struct.unpack_from(">QH", event.data)
    assert size == 1 << 20 and flags == event.transmission_flags
    event = send(make(), C.OPT_EXPORT_NAME, b"disk")
    assert len(event.data) == 10


def test_export_name_unknown_can_only_close():
    with pytest.raises(ProtocolError) as err:
        send(make(), C.OPT_EXPORT_NAME, b"missing")
    assert err.value.reason == "unknown_export"


def test_export_name_never_gets_structured_replies():
    hs = make()
    send(hs, C.OPT_STRUCTURED_REPLY)
    assert not send(hs, C.OPT_EXPORT_NAME, b"disk").structured_replies


def test_no_data_accepted_after_transmission_starts():
    hs = make()
    send(hs, C.OPT_GO, info_data(b"disk"))
    with pytest.raises(ProtocolError):
        hs.receive_data(b"x")


def test_export_that_fails_to_open_gets_an_error_reply_not_a_dropped_connection():
    def lookup(name):
        raise OSError(28, "No space left on device")

    hs = ServerHandshake(lookup, lambda: [], LIMITS)
    hs.receive_data(struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE))
    event = send(hs, C.OPT_GO, info_data(b"swap/n1"))
    [(_, rtype, message)] = parse_replies(event.data)
    assert rtype == C.REP_ERR_UNKNOWN and b"No space left" in message
    assert hs.lookup_failures == 1 and not hs.done


def refusing_handshake():
    from netswap.errors import AttachRefused

    def attach(export):
        raise AttachRefused("the pool cannot back this node's reserve", "reserve")

    hs = ServerHandshake(EXPORTS.get, lambda: [], LIMITS, attach)
    hs.receive_data(struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE))
    return hs


def test_go_refused_attach_gets_err_policy_with_the_reason():
    hs = refusing_handshake()
    event = send(hs, C.OPT_GO, info_data(b"disk"))
    [(_, rtype, message)] = parse_replies(event.data)
    assert rtype == C.REP_ERR_POLICY and b"cannot back" in message and not hs.done
    # INFO does not attach: it only describes the export.
    assert isinstance(send(hs, C.OPT_INFO, info_data(b"disk")), Reply)


def test_export_name_refused_attach_closes():
    with pytest.raises(ProtocolError) as err:
        send(refusing_handshake(), C.OPT_EXPORT_NAME, b"disk")
    assert err.value.reason == "attach_refused"


def test_ready_carries_the_attachment():
    hs = ServerHandshake(EXPORTS.get, lambda: [], LIMITS, lambda export: ("attached", export.name))
    hs.receive_data(struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE))
    assert send(hs, C.OPT_GO, info_data(b"disk")).attachment == ("attached", "disk")


def test_requests_pipelined_behind_go_are_left_for_transmission():
    hs = make()
    first_request = struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, 1, 0, 512)
    hs.receive_data(option(C.OPT_GO, info_data(b"disk")) + first_request)
    assert isinstance(hs.next_event(), Ready)
    assert hs.trailing_data == first_request


def test_partial_message_counts_only_an_unfinished_message():
    hs = ServerHandshake(EXPORTS.get, lambda: [], LIMITS)
    assert hs.partial_message == 0
    hs.receive_data(b"\x00\x00")
    assert hs.next_event() is None and hs.partial_message == 2
    hs.receive_data(b"\x00\x01" + option(C.OPT_LIST))
    assert isinstance(hs.next_event(), Reply) and hs.partial_message == 0
    hs.receive_data(option(C.OPT_GO, b"abc")[:-1])
    assert hs.next_event() is None and hs.partial_message == 18


@pytest.mark.parametrize("opt, data, reason", [
    (0x7654321, b"", "unsupported_option"),
    (C.OPT_LIST, b"x", "malformed_option"),
    (C.OPT_GO, b"\x00\x00\x10\x00disk\x00\x00", "malformed_option"),
    (C.OPT_GO, info_data(b"swap/../disk"), "unknown_export"),
])
def test_error_replies_say_why_for_the_transport(opt, data, reason):
    event = send(make(), opt, data)
    assert isinstance(event, Reply) and event.refused == reason and event.message
    assert event.message.encode() in event.data


def test_successful_replies_are_not_refusals():
    assert send(make(), C.OPT_LIST).refused == ""
