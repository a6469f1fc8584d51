"""Coverage-guided fuzz target (atheris) for the sans-I/O NBD parsers.

One input is a whole client byte stream: the handshake machine eats it until it ends or
refuses, and whatever follows a successful GO/EXPORT_NAME goes through the request parser
and check_request, as the transport would do. Anything but ProtocolError is a finding.

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
    from netswap.nbd.transmission import ExportLimits, RequestParser, check_request

EXPORTS = {
    "disk": SimpleNamespace(name="disk", description="d", size=1 << 20, read_only=False),
    "ro": SimpleNamespace(name="ro", description="r", size=4096, read_only=True),
}
LIMITS = BlockLimits(1, 4096, 32 << 20)


def feed_transmission(data: bytes, limits: ExportLimits) -> None:
    parser = RequestParser(4096)
    view = memoryview(data)
    scratch = memoryview(bytearray(4096))

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
                return
            continue
        check_request(request, limits)
        while parser.payload_left:
            if not parser.take_payload(scratch) and not receive():
                return


def one_input(data: bytes) -> None:
    handshake = ServerHandshake(EXPORTS.get, lambda: [("disk", "d"), ("ro", "r")], LIMITS)
    try:
        handshake.receive_data(data)
        while (event := handshake.next_event()) is not None:
            if isinstance(event, Ready):
                export = event.export
                feed_transmission(handshake.trailing_data, ExportLimits(
                    export.size, export.read_only, 1, 32 << 20, event.structured_replies,
                    event.allocation_context is not None))
                return
    except ProtocolError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


# A useful start for a corpus: a valid GO for "disk" followed by one READ.
SEED = (struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE)
        + struct.pack(">QII", C.IHAVEOPT, C.OPT_GO, 10) + struct.pack(">I", 4) + b"disk"
        + struct.pack(">H", 0)
        + struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, 1, 0, 512))

if __name__ == "__main__":
    main()
