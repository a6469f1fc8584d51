"""Bytes for and from the sans-I/O NBD server handshake: fake exports, options, replies."""

import struct
from dataclasses import dataclass

from netswap.nbd import constants as C
from netswap.nbd.handshake import BlockLimits


@dataclass
class FakeExport:
    name: str
    size: int = 1 << 20
    read_only: bool = False
    description: str = "a test export"


EXPORTS = {"disk": FakeExport("disk"), "ro": FakeExport("ro", read_only=True, description="read only")}
LIMITS = BlockLimits(1, 4096, 32 << 20)


def option(opt, data=b""):
    return struct.pack(">QII", C.IHAVEOPT, opt, len(data)) + data


def info_data(name: bytes, infos=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos
    )


def parse_replies(data: bytes):
    """Split option replies into (option, type, payload) tuples."""
    out = []
    while data:
        magic, opt, rtype, length = struct.unpack_from(">QIII", data)
        assert magic == C.OPTION_REPLY_MAGIC
        out.append((opt, rtype, data[20 : 20 + length]))
        data = data[20 + length :]
    return out

