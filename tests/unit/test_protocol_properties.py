"""Property-based tests (hypothesis) over the sans-I/O NBD parsers: whatever bytes arrive, in
whatever pieces, they yield the same events or a ProtocolError, never another exception."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from netswap.nbd import constants as C
from netswap.nbd.errors import ProtocolError
from netswap.nbd.handshake import BlockLimits, ServerHandshake
from netswap.nbd.transmission import (MAX_EXTENTS, ExportLimits, Request, RequestParser,
                                      check_request, encode_extents)
from support.handshake import EXPORTS, LIMITS


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points + [len(data)]:
        pieces.append(data[start:point])
        start = point
    return [p for p in pieces if p]


def handshake_events(pieces: list[bytes]):
    """Feed pieces as a transport would (nothing more once the handshake has ended); return
    the events (as comparable tuples), how it ended, and the bytes left for transmission."""
    hs = ServerHandshake(EXPORTS.get, lambda: [(e.name, e.description) for e in EXPORTS.values()],
                         LIMITS)
    events = []
    try:
        for i, piece in enumerate(pieces):
            hs.receive_data(piece)
            while (event := hs.next_event()) is not None:
                events.append((type(event).__name__, event.data))
            if hs.done:
                return events, "done", hs.trailing_data + b"".join(pieces[i + 1:])
        return events, "ok", b""
    except ProtocolError as exc:
        return events, f"protocol error: {exc.reason}", b""


option = st.builds(
    lambda opt, data: struct.pack(">QII", C.IHAVEOPT, opt, len(data)) + data,
    st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 0x7654321]),
    st.one_of(st.binary(max_size=64),
              # LIST/SET_META_CONTEXT-shaped data
              st.builds(lambda n, qs: struct.pack(">I", len(n)) + n + struct.pack(">I", len(qs))
                        + b"".join(struct.pack(">I", len(q)) + q for q in qs),
                        st.sampled_from([b"disk", b"ro", b"nope"]),
                        st.lists(st.sampled_from([b"base:allocation", b"base:", b"x:y", b"bad",
                                                  b""]), max_size=3)),
              st.builds(lambda n, infos: struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos))
                        + b"".join(struct.pack(">H", i) for i in infos),
                        st.sampled_from([b"disk", b"ro", b"nope", b""]),
                        st.lists(st.integers(0, 5), max_size=4))),
)


@settings(max_examples=300, deadline=None)
@given(flags=st.integers(0, 3), options=st.lists(option, max_size=6), junk=st.binary(max_size=40),
       cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_handshake_is_independent_of_how_bytes_are_split(flags, options, junk, cuts):
    stream = struct.pack(">I", flags) + b"".join(options) + junk
    assert handshake_events([stream]) == handshake_events(chunked(stream, cuts))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_handshake_on_arbitrary_bytes_only_ever_raises_protocol_errors(data, cuts):
    handshake_events(chunked(data, cuts))  # any other exception fails the test


request = st.tuples(
    st.integers(0, 0xFFFF),                       # flags
    st.sampled_from([0, 1, 3, 4, 5, 6, 42]),      # command (1 = WRITE carries a payload)
    st.integers(0, 2**64 - 1),                    # cookie
    st.integers(0, 2**64 - 1),                    # offset
    st.integers(0, 300),                          # length (payload size for WRITE)
)


@settings(max_examples=300, deadline=None)
@given(requests=st.lists(request, max_size=10), cuts=st.lists(st.integers(0, 10_000), max_size=16),
       window=st.integers(28, 200))
def test_request_parser_reassembles_requests_and_payloads_whatever_the_split(requests, cuts, window):
    stream, expected = b"", []
    for flags, command, cookie, offset, length in requests:
        payload = bytes((cookie + i) % 256 for i in range(length)) if command == C.CMD_WRITE else b""
        stream += struct.pack(">IHHQQI", C.REQUEST_MAGIC, flags, command, cookie, offset, length) + payload
        expected.append((flags, command, cookie, offset, length, payload))

    parser = RequestParser(window)
    got = []
    pending = None  # (request, payload bytearray, filled)
    for piece in chunked(stream, cuts):
        piece = memoryview(piece)
        while piece:
            space = parser.recv_window()
            n = min(len(space), len(piece))
            space[:n] = piece[:n]
            parser.advance(n)
            piece = piece[n:]
            while True:
                if pending is not None:
                    req, payload, filled = pending
                    filled += parser.take_payload(memoryview(payload)[filled:])
                    if filled < len(payload):
                        pending = (req, payload, filled)
                        break
                    got.append((req.flags, req.command, req.cookie, req.offset, req.length, bytes(payload)))
                    pending = None
                req = parser.next_request()
                if req is None:
                    break
                if req.has_payload:
                    pending = (req, bytearray(req.length), 0)
                else:
                    got.append((req.flags, req.command, req.cookie, req.offset, req.length, b""))
    if pending is not None and pending[2] == len(pending[1]):
        req, payload, _ = pending
        got.append((req.flags, req.command, req.cookie, req.offset, req.length, bytes(payload)))
    assert got == expected


@settings(max_examples=500, deadline=None)
@given(flags=st.integers(0, 0xFFFF), command=st.integers(0, 0xFFFF), offset=st.integers(0, 2**64 - 1),
       length=st.integers(0, 2**32 - 1), size=st.integers(1, 2**40), read_only=st.booleans(),
       structured=st.booleans(), block_status=st.booleans())
def test_check_request_never_lets_a_request_leave_the_export(flags, command, offset, length, size,
                                                             read_only, structured,
                                                             block_status):
    block_status = block_status and structured  # a context needs structured replies
    limits = ExportLimits(size, read_only, 1, 32 << 20, structured, block_status)
    error = check_request(Request(flags, command, 1, offset, length), limits)
    if error:
        assert error in (C.EINVAL, C.ENOSPC, C.EPERM)
        return
    assert command in (C.CMD_READ, C.CMD_WRITE, C.CMD_FLUSH, C.CMD_TRIM, C.CMD_CACHE,
                       C.CMD_WRITE_ZEROES, C.CMD_DISC, C.CMD_BLOCK_STATUS)
    if command == C.CMD_BLOCK_STATUS:
        assert block_status
    if flags & C.CMD_FLAG_FAST_ZERO:
        assert command == C.CMD_WRITE_ZEROES and not read_only
    if command in (C.CMD_READ, C.CMD_WRITE, C.CMD_TRIM, C.CMD_CACHE, C.CMD_WRITE_ZEROES,
                   C.CMD_BLOCK_STATUS):
        assert 0 < length and offset + length <= size
    if command in (C.CMD_READ, C.CMD_WRITE):
        assert length <= 32 << 20
    if read_only:
        assert command not in (C.CMD_WRITE, C.CMD_TRIM, C.CMD_WRITE_ZEROES)


def test_block_limits_fixture_is_the_default():
    assert LIMITS == BlockLimits(1, 4096, 32 << 20)


@settings(max_examples=500, deadline=None)
@given(runs=st.lists(st.tuples(st.integers(-10, 1 << 33), st.booleans()), max_size=40),
       length=st.integers(1, 2**32 - 1), req_one=st.booleans(),
       capacity=st.integers(1, MAX_EXTENTS + 5))
def test_block_status_descriptors_keep_the_spec_whatever_the_backend_says(runs, length, req_one,
                                                                          capacity):
    request = Request(C.CMD_FLAG_REQ_ONE if req_one else 0, C.CMD_BLOCK_STATUS, 1, 0, length)
    view = memoryview(bytearray(8 * capacity))
    count = encode_extents(view, request, runs)
    got = [struct.unpack_from(">II", view, 8 * i) for i in range(count)]
    assert 1 <= count <= min(capacity, MAX_EXTENTS)
    if req_one:
        assert count == 1
    assert all(size > 0 for size, _ in got)  # "MUST be nonzero"
    assert sum(size for size, _ in got) <= length  # within the request
    assert all(status in (0, C.STATE_HOLE | C.STATE_ZERO) for _, status in got)
    assert all(a[1] != b[1] for a, b in zip(got, got[1:]))  # neighbours differ
    # What they say is what the runs said, for the bytes they cover.
    said = [(size, allocated) for size, allocated in runs if size > 0]
    if said:
        position, expected = 0, []
        for size, allocated in said:
            expected.extend([(position, position + size, allocated)])
            position += size
        position = 0
        for size, status in got:
            for start, end, allocated in expected:
                if start < position + size and position < end:
                    assert (status == 0) == allocated
            position += size
    else:
        assert got == [(length, 0)]
