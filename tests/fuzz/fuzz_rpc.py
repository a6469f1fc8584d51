"""Coverage-guided fuzz target (atheris) for the sans-I/O ONC RPC layer.

One input is a whole client byte stream on an NFS or MOUNT connection: fragment headers go
through a RecordAssembler, each completed record through parse_call, and a refused call's
reply() is built, as the transport will do. RecordError, NotACall and CallRejected are the
documented outcomes; anything else is a finding.

    python3 tests/fuzz/fuzz_rpc.py -runs=100000          # a while
    python3 tests/fuzz/fuzz_rpc.py -max_total_time=600   # ten minutes
"""

import sys

import atheris

with atheris.instrument_imports():
    from netswap.rpc.message import (
        AuthSys, CallRejected, NotACall, RecordAssembler, RecordError, call_header,
        fragment_header, parse_call,
    )

MAX_RECORD = 1024


def one_input(data: bytes) -> None:
    assembler = RecordAssembler(MAX_RECORD)
    record = bytearray(MAX_RECORD)
    view, pos = memoryview(data), 0
    try:
        while len(view) - pos >= 4:
            start = assembler.received
            length = assembler.begin_fragment(view[pos:pos + 4])
            pos += 4
            body = view[pos:pos + length]
            record[start:start + len(body)] = body
            pos += len(body)
            if len(body) < length:
                return  # the stream ended inside a fragment
            done = assembler.end_fragment()
            if done is None:
                continue
            try:
                parse_call(memoryview(record)[:done])
            except CallRejected as exc:
                exc.reply()
            except NotACall:
                return
    except RecordError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


# A useful start for a corpus: an NFS GETATTR-shaped call with AUTH_SYS, in two fragments.
_CALL = call_header(1, 100003, 3, 1, AuthSys(0, "node", 0, 0, (0,))) + b"\0\0\0\x08handle!!"
SEED = (fragment_header(20, last=False) + _CALL[:20]
        + fragment_header(len(_CALL) - 20) + _CALL[20:])

if __name__ == "__main__":
    main()
