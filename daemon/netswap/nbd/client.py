"""The client side of the NBD fixed-newstyle handshake and the one request netswap-node makes
itself, without any I/O.

netswap-node negotiates each socket in user space and then hands it to the kernel's nbd
driver, which speaks transmission from the first byte after the handshake and reads simple
replies only: so no structured replies are asked for, NO_ZEROES is, and the export is chosen
with NBD_OPT_GO asking for its block sizes (proto.md, "Fixed newstyle negotiation").

`ClientHandshake` takes the server's bytes (`receive_data`) and gives back what to send
(`data_to_send`); once `export` is set, transmission may begin. A refusal (ERR_POLICY: the
server's reserve is full, ERR_UNKNOWN: no such export) raises `OptionRefused` with the server's
message; a server that breaks the protocol raises `ProtocolError`. Before a socket goes to
the kernel, the agent reads the swap header through it: `read_request` and
`SimpleReplyReader` are that one READ.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import constants as C
from .errors import ProtocolError

_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
# An honest option reply is a few hundred bytes (an INFO item, an error message); more is a
# server we should not buffer for.
MAX_REPLY_DATA = 64 * 1024

_ERROR_NAMES = {
    C.REP_ERR_UNSUP: "ERR_UNSUP", C.REP_ERR_POLICY: "ERR_POLICY",
    C.REP_ERR_INVALID: "ERR_INVALID", C.REP_ERR_PLATFORM: "ERR_PLATFORM",
    C.REP_ERR_TLS_REQD: "ERR_TLS_REQD", C.REP_ERR_UNKNOWN: "ERR_UNKNOWN",
    C.REP_ERR_SHUTDOWN: "ERR_SHUTDOWN", C.REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD",
    C.REP_ERR_TOO_BIG: "ERR_TOO_BIG",
}


@dataclass(frozen=True)
class ExportInfo:
    name: str
    size: int
    transmission_flags: int
    block_minimum: int = 1
    block_preferred: int = 4096
    block_maximum: int = 32 * 1024 * 1024


class OptionRefused(Exception):
    """The server answered GO with an error reply."""

    def __init__(self, reply_type: int, message: str) -> None:
        self.reply_type = reply_type
        self.name = _ERROR_NAMES.get(reply_type, f"error {reply_type:#x}")
        super().__init__(f"{self.name}: {message}" if message else self.name)


class ClientHandshake:
    def __init__(self, export: str) -> None:
        self._name = export.encode()
        if len(self._name) > 4096:
            raise ValueError("an export name is at most 4096 bytes")
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._state = "greeting"
        self._size: int | None = None
        self._flags = 0
        self._blocks: tuple[int, int, int] | None = None
        self.export: ExportInfo | None = None

    def data_to_send(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        self._buffer += data
        while self.export is None and self._step():
            pass
        if self.export is not None and self._buffer:
            # The kernel owns the socket from here: anything the server sent early is lost.
            raise ProtocolError("server sent data after the GO reply", "unexpected_data")

    def _step(self) -> bool:
        if self._state == "greeting":
            if len(self._buffer) < _GREETING.size:
                return False
            magic, option_magic, flags = _GREETING.unpack_from(self._buffer)
            del self._buffer[:_GREETING.size]
            if magic != C.NBDMAGIC or option_magic != C.IHAVEOPT:
                raise ProtocolError("not a fixed-newstyle NBD server", "bad_magic")
            if not flags & C.FLAG_FIXED_NEWSTYLE:
                raise ProtocolError("server is not fixed newstyle", "not_fixed_newstyle")
            client_flags = C.CLIENT_FLAG_FIXED_NEWSTYLE
            if flags & C.FLAG_NO_ZEROES:
                client_flags |= C.CLIENT_FLAG_NO_ZEROES
            go = (struct.pack(">I", len(self._name)) + self._name
                  + struct.pack(">HH", 1, C.INFO_BLOCK_SIZE))
            self._outgoing += struct.pack(">I", client_flags)
            self._outgoing += _OPTION.pack(C.IHAVEOPT, C.OPT_GO, len(go)) + go
            self._state = "go"
            return True
        if len(self._buffer) < _REPLY_HEADER.size:
            return False
        magic, option, reply_type, length = _REPLY_HEADER.unpack_from(self._buffer)
        if magic != C.OPTION_REPLY_MAGIC or option != C.OPT_GO:
            raise ProtocolError("bad option reply header", "bad_reply")
        if length > MAX_REPLY_DATA:
            raise ProtocolError(f"option reply of {length} bytes", "reply_too_long")
        if len(self._buffer) < _REPLY_HEADER.size + length:
            return False
        data = bytes(self._buffer[_REPLY_HEADER.size:_REPLY_HEADER.size + length])
        del self._buffer[:_REPLY_HEADER.size + length]
        if reply_type & C.REP_FLAG_ERROR:
            raise OptionRefused(reply_type, data.decode("utf-8", "replace"))
        if reply_type == C.REP_INFO:
            self._info(data)
        elif reply_type == C.REP_ACK:
            if self._size is None:
                raise ProtocolError("GO acknowledged without NBD_INFO_EXPORT", "no_export_info")
            self.export = ExportInfo(self._name.decode(errors="replace"), self._size,
                                     self._flags, *(self._blocks or ()))
        else:
            raise ProtocolError(f"unexpected reply type {reply_type} to GO", "bad_reply")
        return True

    def _info(self, data: bytes) -> None:
        if len(data) < 2:
            raise ProtocolError("empty NBD_REP_INFO", "bad_info")
        (kind,) = struct.unpack_from(">H", data)
        if kind == C.INFO_EXPORT:
            if len(data) != 12:
                raise ProtocolError("NBD_INFO_EXPORT of the wrong length", "bad_info")
            self._size, self._flags = struct.unpack_from(">QH", data, 2)
        elif kind == C.INFO_BLOCK_SIZE:
            if len(data) != 14:
                raise ProtocolError("NBD_INFO_BLOCK_SIZE of the wrong length", "bad_info")
            self._blocks = struct.unpack_from(">III", data, 2)
        # Other items (name, description) are allowed and not needed.


def read_request(cookie: int, offset: int, length: int) -> bytes:
    return _REQUEST.pack(C.REQUEST_MAGIC, 0, C.CMD_READ, cookie, offset, length)


class SimpleReplyReader:
    """The simple reply to one READ of `length` bytes: feed bytes until `data` is set."""

    def __init__(self, cookie: int, length: int) -> None:
        self._cookie = cookie
        self._length = length
        self._buffer = bytearray()
        self.data: bytes | None = None

    def receive_data(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) < _SIMPLE_REPLY.size:
            return
        magic, error, cookie = _SIMPLE_REPLY.unpack_from(self._buffer)
        if magic != C.SIMPLE_REPLY_MAGIC or cookie != self._cookie:
            raise ProtocolError("not the simple reply to our READ", "bad_reply")
        if error:
            raise OSError(error, f"the server answered the READ with error {error}")
        end = _SIMPLE_REPLY.size + self._length
        if len(self._buffer) > end:
            raise ProtocolError("more data than the READ asked for", "unexpected_data")
        if len(self._buffer) == end:
            self.data = bytes(self._buffer[_SIMPLE_REPLY.size:])
