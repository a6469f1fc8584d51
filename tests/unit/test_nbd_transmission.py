"""The sans-I/O transmission layer: request parsing, checking and reply writers."""

import struct

import pytest

from netswap.nbd import constants as C
from netswap.nbd.errors import ProtocolError
from netswap.nbd.transmission import (
    BLOCK_STATUS_BUFFER,
    MAX_EXTENTS,
    ExportLimits,
    Request,
    RequestParser,
    block_status_header,
    check_request,
    encode_extents,
    refusal,
    reply_header,
    simple_reply,
    structured_done,
    structured_error,
    structured_read_prefix,
)

LIMITS = ExportLimits(size=1 << 20, read_only=False, minimum_block=1, maximum_payload=32 << 20,
                      structured_replies=False)
# base:allocation selected (which needs structured replies).
STATUS = ExportLimits(size=1 << 20, read_only=False, minimum_block=1, maximum_payload=32 << 20,
                      structured_replies=True, block_status=True)
RO_STATUS = ExportLimits(1 << 20, True, 1, 32 << 20, True, True)
HOLE_ZERO = C.STATE_HOLE | C.STATE_ZERO


def header(command, offset=0, length=0, flags=0, cookie=7, magic=C.REQUEST_MAGIC):
    return struct.pack(">IHHQQI", magic, flags, command, cookie, offset, length)


def test_parses_one_header_and_needs_more_data():
    parser = RequestParser()
    data = header(C.CMD_READ, 4096, 512, cookie=0xDEADBEEF)
    parser.receive_data(data[:27])
    assert parser.next_request() is None
    parser.receive_data(data[27:])
    request = parser.next_request()
    assert (request.command, request.offset, request.length, request.cookie) == (C.CMD_READ, 4096, 512, 0xDEADBEEF)
    assert parser.next_request() is None


def test_many_headers_from_one_receive():
    parser = RequestParser()
    parser.receive_data(b"".join(header(C.CMD_READ, cookie=i, length=1) for i in range(32)))
    assert [parser.next_request().cookie for _ in range(32)] == list(range(32))
    assert parser.next_request() is None


def test_bad_magic_is_a_protocol_error():
    parser = RequestParser()
    parser.receive_data(header(C.CMD_READ, magic=0x12345678))
    with pytest.raises(ProtocolError) as err:
        parser.next_request()
    assert err.value.reason == "bad_request_magic"


def test_write_payload_buffered_part_copied_rest_received_directly():
    parser = RequestParser()
    payload = bytes(range(256)) * 4
    parser.receive_data(header(C.CMD_WRITE, length=len(payload)) + payload[:100])
    request = parser.next_request()
    assert request.has_payload and parser.payload_left == 1024
    with pytest.raises(RuntimeError):
        parser.next_request()
    dest = memoryview(bytearray(1024))
    assert parser.take_payload(dest) == 100
    dest[100:] = payload[100:]  # what the transport's recv_into would do
    parser.payload_received(924)
    assert bytes(dest) == payload and parser.payload_left == 0
    assert parser.next_request() is None


def test_payload_followed_by_next_header_in_the_same_receive():
    parser = RequestParser()
    parser.receive_data(header(C.CMD_WRITE, length=4, cookie=1) + b"abcd" + header(C.CMD_FLUSH, cookie=2))
    parser.next_request()
    dest = memoryview(bytearray(4))
    assert parser.take_payload(dest) == 4 and bytes(dest) == b"abcd"
    assert parser.next_request().cookie == 2


def test_window_slides_partial_header_to_the_front():
    parser = RequestParser(window=64)
    parser.receive_data(header(C.CMD_READ, length=1, cookie=1) + header(C.CMD_READ, length=1, cookie=2)[:10])
    assert parser.next_request().cookie == 1
    window = parser.recv_window()
    assert len(window) >= C.REQUEST_HEADER_SIZE
    parser.receive_data(header(C.CMD_READ, length=1, cookie=2)[10:])
    assert parser.next_request().cookie == 2


def test_payload_received_beyond_declared_length_is_refused():
    parser = RequestParser()
    parser.receive_data(header(C.CMD_WRITE, length=4))
    parser.next_request()
    with pytest.raises(ValueError):
        parser.payload_received(5)


def req(command, offset=0, length=512, flags=0):
    return Request(flags, command, 1, offset, length)


@pytest.mark.parametrize(
    "request_, limits, expected",
    [
        (req(C.CMD_READ), LIMITS, 0),
        (req(C.CMD_WRITE, flags=C.CMD_FLAG_FUA), LIMITS, 0),
        (req(C.CMD_FLUSH, 0, 0), LIMITS, 0),
        (req(C.CMD_FLUSH, 5, 5), LIMITS, 0),  # reserved fields are ignored
        (req(C.CMD_TRIM, length=4096), LIMITS, 0),
        (req(C.CMD_WRITE_ZEROES, flags=C.CMD_FLAG_NO_HOLE | C.CMD_FLAG_FUA), LIMITS, 0),
        (req(C.CMD_CACHE), LIMITS, 0),
        (req(C.CMD_BLOCK_STATUS), LIMITS, C.EINVAL),  # not negotiated: unknown
        (req(99), LIMITS, C.EINVAL),
        (req(C.CMD_READ, flags=0x40), LIMITS, C.EINVAL),
        (req(C.CMD_WRITE, flags=C.CMD_FLAG_NO_HOLE), LIMITS, C.EINVAL),
        (req(C.CMD_READ, flags=C.CMD_FLAG_DF), LIMITS, C.EINVAL),  # DF needs structured replies
        (req(C.CMD_WRITE_ZEROES, flags=C.CMD_FLAG_FAST_ZERO), LIMITS, 0),
        (req(C.CMD_WRITE_ZEROES, flags=C.CMD_FLAG_FAST_ZERO | C.CMD_FLAG_NO_HOLE), LIMITS, 0),
        (req(C.CMD_WRITE, flags=C.CMD_FLAG_FAST_ZERO), LIMITS, C.EINVAL),
        (req(C.CMD_TRIM, flags=C.CMD_FLAG_FAST_ZERO), LIMITS, C.EINVAL),
        # BLOCK_STATUS, once base:allocation was selected
        (req(C.CMD_BLOCK_STATUS), STATUS, 0),
        (req(C.CMD_BLOCK_STATUS, flags=C.CMD_FLAG_REQ_ONE), STATUS, 0),
        (req(C.CMD_BLOCK_STATUS, flags=C.CMD_FLAG_REQ_ONE | C.CMD_FLAG_FUA), STATUS, 0),
        (req(C.CMD_BLOCK_STATUS), RO_STATUS, 0),  # a read: fine on a read-only export
        (req(C.CMD_BLOCK_STATUS, length=(1 << 20)), STATUS, 0),  # no payload: any length
        (req(C.CMD_BLOCK_STATUS, flags=C.CMD_FLAG_DF), STATUS, C.EINVAL),
        (req(C.CMD_BLOCK_STATUS, flags=C.CMD_FLAG_NO_HOLE), STATUS, C.EINVAL),
        (req(C.CMD_BLOCK_STATUS, flags=0x20), STATUS, C.EINVAL),
        (req(C.CMD_BLOCK_STATUS, length=0), STATUS, C.EINVAL),
        (req(C.CMD_BLOCK_STATUS, offset=(1 << 20) - 511), STATUS, C.EINVAL),
        (req(C.CMD_BLOCK_STATUS, offset=1 << 20, length=1), STATUS, C.EINVAL),
        (req(C.CMD_BLOCK_STATUS, offset=(1 << 64) - 1), STATUS, C.EINVAL),
        (req(C.CMD_READ, flags=C.CMD_FLAG_REQ_ONE), STATUS, C.EINVAL),
        (req(C.CMD_READ, length=0), LIMITS, C.EINVAL),
        (req(C.CMD_READ, length=(32 << 20) + 1), LIMITS, C.EINVAL),
        (req(C.CMD_READ, offset=(1 << 20) - 511), LIMITS, C.EINVAL),
        (req(C.CMD_TRIM, offset=(1 << 20) - 511), LIMITS, C.EINVAL),
        (req(C.CMD_WRITE, offset=(1 << 20) - 511), LIMITS, C.ENOSPC),
        (req(C.CMD_WRITE_ZEROES, offset=(1 << 20) - 511), LIMITS, C.ENOSPC),
        (req(C.CMD_READ, offset=(1 << 64) - 1), LIMITS, C.EINVAL),  # would overflow u64
        (req(C.CMD_WRITE, offset=(1 << 64) - 1), LIMITS, C.ENOSPC),
    ],
)
def test_check_request(request_, limits, expected):
    assert check_request(request_, limits) == expected


def test_check_read_only_refuses_every_write():
    ro = ExportLimits(1 << 20, True, 1, 32 << 20, False)
    for command in (C.CMD_WRITE, C.CMD_TRIM, C.CMD_WRITE_ZEROES):
        assert check_request(req(command), ro) == C.EPERM
    assert check_request(req(C.CMD_READ), ro) == 0
    # FAST_ZERO is not advertised on a read-only export: the flag itself is invalid there.
    assert check_request(req(C.CMD_WRITE_ZEROES, flags=C.CMD_FLAG_FAST_ZERO), ro) == C.EINVAL


def test_block_status_without_a_selected_context_is_einval_and_says_so():
    for limits in (LIMITS, ExportLimits(1 << 20, False, 1, 32 << 20, True)):
        error, problem = refusal(req(C.CMD_BLOCK_STATUS), limits)
        assert error == C.EINVAL and "metadata context" in problem


def test_block_status_alignment_to_minimum_block():
    aligned = ExportLimits(1 << 20, False, 4096, 32 << 20, True, True)
    assert check_request(req(C.CMD_BLOCK_STATUS, 4096, 8192), aligned) == 0
    assert check_request(req(C.CMD_BLOCK_STATUS, 512, 4096), aligned) == C.EINVAL


def test_check_alignment_to_minimum_block():
    aligned = ExportLimits(1 << 20, False, 512, 32 << 20, False)
    assert check_request(req(C.CMD_READ, 512, 512), aligned) == 0
    assert check_request(req(C.CMD_READ, 1, 512), aligned) == C.EINVAL
    assert check_request(req(C.CMD_READ, 0, 100), aligned) == C.EINVAL


def test_df_allowed_with_structured_replies():
    structured = ExportLimits(1 << 20, False, 1, 32 << 20, True)
    assert check_request(req(C.CMD_READ, flags=C.CMD_FLAG_DF), structured) == 0


def test_simple_reply_layout():
    assert simple_reply(0x1122334455667788, 22) == struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, 22, 0x1122334455667788)


def test_structured_layouts():
    magic, flags, rtype, cookie, length, offset = struct.unpack(">IHHQIQ", structured_read_prefix(9, 4096, 512))
    assert (magic, flags, rtype, cookie, length, offset) == (
        C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE, C.REPLY_TYPE_OFFSET_DATA, 9, 520, 4096)
    assert struct.unpack(">IHHQI", structured_done(9)) == (
        C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE, C.REPLY_TYPE_NONE, 9, 0)
    chunk = structured_error(9, C.EIO, "disk on fire")
    magic, flags, rtype, cookie, length, error, msglen = struct.unpack_from(">IHHQIIH", chunk)
    assert (rtype, length, error, msglen) == (C.REPLY_TYPE_ERROR, 6 + 12, C.EIO, 12)
    assert chunk[26:] == b"disk on fire"


def test_reply_header_never_structured_unless_negotiated():
    for command in (C.CMD_READ, C.CMD_WRITE):
        for error in (0, C.EIO):
            data = reply_header(req(command), error, structured=False)
            assert struct.unpack_from(">I", data)[0] == C.SIMPLE_REPLY_MAGIC
            data = reply_header(req(command), error, structured=True)
            assert struct.unpack_from(">I", data)[0] == C.STRUCTURED_REPLY_MAGIC


def test_parser_runs_on_a_window_it_is_given():
    window = memoryview(bytearray(64))
    parser = RequestParser(window)
    parser.receive_data(header(C.CMD_READ, length=1, cookie=1) + header(C.CMD_READ, length=1, cookie=2)[:10])
    assert parser.next_request().cookie == 1
    parser.receive_data(header(C.CMD_READ, length=1, cookie=2)[10:])
    assert parser.next_request().cookie == 2
    assert bytes(window[:4]) == struct.pack(">I", C.REQUEST_MAGIC)  # the bytes really live there


def test_discard_payload_drops_only_the_payload():
    parser = RequestParser()
    parser.receive_data(header(C.CMD_WRITE, length=6, cookie=1) + b"abc")
    parser.next_request()
    assert parser.discard_payload() == 3 and parser.payload_left == 3
    parser.receive_data(b"def" + header(C.CMD_FLUSH, cookie=2))
    assert parser.discard_payload() == 3 and parser.payload_left == 0
    assert parser.next_request().cookie == 2


@pytest.mark.parametrize("request_, problem", [
    (Request(0, 42, 1, 0, 512), "unknown command 42"),
    (Request(0x8001, C.CMD_READ, 1, 0, 512), "flags 0x8000 not allowed on read"),
    (Request(0, C.CMD_TRIM, 1, 0, 0), "zero length"),
    (Request(0, C.CMD_READ, 1, 0, 3 << 30), "exceeds the maximum payload"),
    (Request(0, C.CMD_WRITE, 1, (1 << 64) - 4096, 8192), "past the end"),
])
def test_refusal_names_the_problem(request_, problem):
    limits = ExportLimits(1 << 20, False, 1, 32 << 20, False)
    error, text = refusal(request_, limits)
    assert error == check_request(request_, limits) != 0 and problem in text
    assert refusal(Request(0, C.CMD_READ, 1, 0, 512), limits) == (0, "")


# -- BLOCK_STATUS replies ------------------------------------------------------------------


def extents(runs, offset=0, length=1 << 20, flags=0, buffer=BLOCK_STATUS_BUFFER):
    view = memoryview(bytearray(buffer))
    count = encode_extents(view, Request(flags, C.CMD_BLOCK_STATUS, 1, offset, length), runs)
    return [struct.unpack_from(">II", view, 8 * i) for i in range(count)]


DATA, HOLE = True, False


def test_extents_map_allocation_onto_base_allocation_flags():
    assert extents([(4096, DATA), (8192, HOLE), (4096, DATA)], length=16384) == [
        (4096, 0), (8192, HOLE_ZERO), (4096, 0)]


def test_extents_merge_neighbours_of_equal_status():
    assert extents([(4096, HOLE), (4096, HOLE), (4096, DATA), (1, DATA)], length=1 << 20) == [
        (8192, HOLE_ZERO), (4097, 0)]


def test_extents_stay_within_the_request():
    # A backend run past the end of the request is cut at it; later runs are not used.
    assert extents([(4096, DATA), (1 << 30, HOLE), (4096, DATA)], length=10000) == [
        (4096, 0), (10000 - 4096, HOLE_ZERO)]
    # Runs that stop early leave the rest to the client's next request.
    assert extents([(4096, DATA)], length=1 << 20) == [(4096, 0)]


def test_req_one_gives_exactly_one_extent_within_the_length():
    assert extents([(4096, HOLE), (4096, DATA)], flags=C.CMD_FLAG_REQ_ONE) == [
        (4096, HOLE_ZERO)]
    assert extents([(4096, HOLE), (4096, HOLE), (4096, DATA)], flags=C.CMD_FLAG_REQ_ONE) == [
        (8192, HOLE_ZERO)]
    assert extents([(1 << 30, DATA)], length=512, flags=C.CMD_FLAG_REQ_ONE) == [(512, 0)]


def test_extents_are_capped():
    alternating = [(512, i % 2 == 0) for i in range(3 * MAX_EXTENTS)]
    got = extents(alternating, length=1 << 30)
    assert len(got) == MAX_EXTENTS and sum(length for length, _ in got) == 512 * MAX_EXTENTS
    # ...and never more than the buffer holds.
    assert len(extents(alternating, length=1 << 30, buffer=80)) == 10


@pytest.mark.parametrize("runs", [[], [(0, DATA)], [(-5, HOLE)], [(0, HOLE), (0, DATA)]])
def test_no_usable_run_is_the_whole_range_with_status_0(runs):
    # The spec: at least one descriptor, and status 0 is always safe to report.
    assert extents(runs, length=12345) == [(12345, 0)]
    assert extents(runs, length=12345, flags=C.CMD_FLAG_REQ_ONE) == [(12345, 0)]


def test_zero_length_runs_between_others_are_skipped():
    assert extents([(4096, DATA), (0, HOLE), (4096, DATA), (0, DATA), (4096, HOLE)],
                   length=1 << 20) == [(8192, 0), (4096, HOLE_ZERO)]


def test_block_status_header_layout():
    header = block_status_header(0x1122, 7, 3)
    assert struct.unpack(">IHHQII", header) == (
        C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE, C.REPLY_TYPE_BLOCK_STATUS, 0x1122,
        4 + 3 * 8, 7)
    assert BLOCK_STATUS_BUFFER == 8 * MAX_EXTENTS


def test_reply_header_has_no_success_for_block_status():
    # A BLOCK_STATUS succeeds only with its chunk; an error is an ordinary error chunk.
    with pytest.raises(ValueError):
        reply_header(req(C.CMD_BLOCK_STATUS), 0, structured=True)
    chunk = reply_header(req(C.CMD_BLOCK_STATUS), C.EINVAL, structured=True)
    assert struct.unpack_from(">IHHQII", chunk)[2] == C.REPLY_TYPE_ERROR
