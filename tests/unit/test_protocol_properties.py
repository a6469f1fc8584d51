"""Property-based tests (hypothesis) over the sans-I/O NBD parsers: whatever bytes arrive, in
whatever pieces, they yield the same events or a ProtocolError, never another exception."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from netswap.nbd import constants as C
from netswap.nbd.errors import ProtocolError
from netswap.nbd.handshake import BlockLimits, ServerHandshake
from netswap.nbd.transmission import ExportLimits, Request, RequestParser, check_request
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
    st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 11, 0x7654321]),
    st.one_of(st.binary(max_size=64),
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
       structured=st.booleans())
def test_check_request_never_lets_a_request_leave_the_export(flags, command, offset, length, size,
                                                             read_only, structured):
    limits = ExportLimits(size, read_only, 1, 32 << 20, structured)
    error = check_request(Request(flags, command, 1, offset, length), limits)
    if error:
        assert error in (C.EINVAL, C.ENOSPC, C.EPERM)
        return
    assert command in (C.CMD_READ, C.CMD_WRITE, C.CMD_FLUSH, C.CMD_TRIM, C.CMD_CACHE,
                       C.CMD_WRITE_ZEROES, C.CMD_DISC)
    if command in (C.CMD_READ, C.CMD_WRITE, C.CMD_TRIM, C.CMD_CACHE, C.CMD_WRITE_ZEROES):
        assert 0 < length and offset + length <= size
    if command in (C.CMD_READ, C.CMD_WRITE):
        assert length <= 32 << 20
    if read_only:
        assert command not in (C.CMD_WRITE, C.CMD_TRIM, C.CMD_WRITE_ZEROES)


def test_block_limits_fixture_is_the_default():
    assert LIMITS == BlockLimits(1, 4096, 32 << 20)
