"""Coverage-guided fuzz target (atheris) for the sans-I/O NBD parsers.

One input is a whole client byte stream: the handshake machine eats it until it ends or
refuses, and whatever follows a successful GO/EXPORT_NAME goes through the request parser
and check_request, as the transport would do; a BLOCK_STATUS that passes has its reply's
descriptors written (encode_extents) from runs the input's bytes make up, and checked
against the spec's rules. Anything but ProtocolError is a finding.

    python3 tests/fuzz/fuzz_nbd.py -runs=100000          # a while
    python3 tests/fuzz/fuzz_nbd.py -max_total_time=600   # ten minutes
"""

import struct
import sys
from types import SimpleNamespace

import atheris

with atheris.instrument_imports():
    from netswap.nbd import constants as C
    from netswap.nbd.errors import ProtocolError
    from netswap.nbd.handshake import BlockLimits, Ready, ServerHandshake
    from netswap.nbd.transmission import (BLOCK_STATUS_BUFFER, DESCRIPTOR_SIZE, ExportLimits,
                                          RequestParser, check_request, encode_extents)

EXPORTS = {
    "disk": SimpleNamespace(name="disk", description="d", size=1 << 20, read_only=False),
    "ro": SimpleNamespace(name="ro", description="r", size=4096, read_only=True),
}
LIMITS = BlockLimits(1, 4096, 32 << 20)


def feed_transmission(data: bytes, limits: ExportLimits) -> list[tuple[str, int, int]]:
    """Each request's (name, flags, error check_request gave it)."""
    parser = RequestParser(4096)
    view = memoryview(data)
    scratch = memoryview(bytearray(4096))
    descriptors = memoryview(bytearray(BLOCK_STATUS_BUFFER))
    seen = []

    def receive() -> bool:
        """Move as much of the input as fits into the parser's window; False at its end."""
        nonlocal view
        if not view:
            return False
        window = parser.recv_window()
        n = min(len(window), len(view))
        window[:n] = view[:n]
        parser.advance(n)
        view = view[n:]
        return True

    while True:
        request = parser.next_request()
        if request is None:
            if not receive():
                return seen
            continue
        error = check_request(request, limits)
        seen.append((request.name, request.flags, error))
        if not error and request.command == C.CMD_BLOCK_STATUS:
            check_extents(request, descriptors, bytes(view[:64]))
        while parser.payload_left:
            if not parser.take_payload(scratch) and not receive():
                return seen


def check_extents(request, descriptors: memoryview, noise: bytes) -> None:
    """encode_extents keeps the spec's rules whatever a backend reports: here runs of
    lengths the input's next bytes make up (zero, short, past the request)."""
    runs = [(byte * (request.length // 97 + 1) if byte % 5 else byte, bool(byte & 1))
            for byte in noise]
    count = encode_extents(descriptors, request, runs)
    pairs = [struct.unpack_from(">II", descriptors, i * DESCRIPTOR_SIZE) for i in range(count)]
    most = 1 if request.flags & C.CMD_FLAG_REQ_ONE else BLOCK_STATUS_BUFFER // DESCRIPTOR_SIZE
    assert 1 <= count <= most, pairs
    assert all(length > 0 for length, _ in pairs), pairs
    assert sum(length for length, _ in pairs) <= request.length, (request, pairs)
    assert all(a[1] != b[1] for a, b in zip(pairs, pairs[1:])), pairs
    assert all(status in (0, C.STATE_HOLE | C.STATE_ZERO) for _, status in pairs), pairs


def one_input(data: bytes) -> list[tuple[str, int, int]]:
    """The requests that followed a successful handshake, as feed_transmission says."""
    handshake = ServerHandshake(EXPORTS.get, lambda: [("disk", "d"), ("ro", "r")], LIMITS)
    try:
        handshake.receive_data(data)
        while (event := handshake.next_event()) is not None:
            if isinstance(event, Ready):
                export = event.export
                return feed_transmission(handshake.trailing_data, ExportLimits(
                    export.size, export.read_only, 1, 32 << 20, event.structured_replies,
                    event.allocation_context is not None))
    except ProtocolError:
        pass
    return []


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


def _option(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", C.IHAVEOPT, option, len(data)) + data


def _request(flags: int, command: int, cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", C.REQUEST_MAGIC, flags, command, cookie, offset, length)


_GO_DISK = _option(C.OPT_GO, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0))
# A useful start for a corpus: a valid GO for "disk" followed by one READ; and structured
# replies with base:allocation selected, then BLOCK_STATUS (plain, REQ_ONE) and a FAST_ZERO
# WRITE_ZEROES, so that mutations start from the metadata-context paths too.
SEEDS = {
    "go_read": struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE) + _GO_DISK
    + _request(0, C.CMD_READ, 1, 0, 512),
    "block_status": struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE)
    + _option(C.OPT_STRUCTURED_REPLY)
    + _option(C.OPT_LIST_META_CONTEXT, struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0))
    + _option(C.OPT_SET_META_CONTEXT, struct.pack(">I", 4) + b"disk"
              + struct.pack(">II", 1, 15) + b"base:allocation")
    + _GO_DISK
    + _request(0, C.CMD_BLOCK_STATUS, 1, 0, 1 << 20)
    + _request(C.CMD_FLAG_REQ_ONE, C.CMD_BLOCK_STATUS, 2, 4096, 512)
    + _request(C.CMD_FLAG_FAST_ZERO | C.CMD_FLAG_NO_HOLE, C.CMD_WRITE_ZEROES, 3, 0, 4096),
}

if __name__ == "__main__":
    main()
