"""XDR (RFC 4506) encoding and decoding with `struct`, no I/O.

Every XDR item is a whole number of 4-byte big-endian units (§3): int, unsigned int, enum and
bool take one (§4.1-4.4), hyper and unsigned hyper two (§4.5). Opaque data and strings are a
length followed by the bytes and zero padding to the next unit (§4.9-4.11); an optional `*T` is
a bool followed by T when TRUE (§4.19). The stdlib's `xdrlib` was removed in Python 3.13.

Decoding (`Unpacker`) reads untrusted bytes from the network, so it is written to be cheap to
attack: every length is compared with what is left of the buffer before anything is sliced,
opaque data comes back as a memoryview slice of the caller's buffer (a WRITE's payload is never
copied here), and an array's count is bounded by the bytes left before the first element is
read (a forged count of 2^32-1 costs one comparison). Any violation raises `XdrError`, which the
RPC layer answers with GARBAGE_ARGS. Padding bytes are not checked for zero: RFC 4506 asks the
sender to zero them, but nothing in them can change the meaning of the message, and strict
peers gain nothing from a server that refuses a sloppy client.

Encoding (`Packer`) builds our own replies; a value out of its type's range there is a bug of
ours and raises a plain ValueError. Bulk data (READ payloads) does not go through the Packer:
the transport sends it from the pool buffer next to the header, followed by `padding(n)`.
"""

from __future__ import annotations

import struct
from typing import Callable, Iterable, Optional, TypeVar

T = TypeVar("T")

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")

U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1

_ZEROS = bytes(3)


class XdrError(ValueError):
    """The bytes are not a valid encoding of what was expected (truncated, a length over its
    bound, a bool that is neither 0 nor 1, an enum value not allowed, bytes left over)."""


def padded(length: int) -> int:
    """`length` rounded up to a whole number of XDR units."""
    return (length + 3) & ~3


def padding(length: int) -> bytes:
    """The zero bytes that follow `length` bytes of opaque data on the wire."""
    return _ZEROS[: -length & 3]


class Unpacker:
    """Reads XDR items in order from a buffer it does not copy."""

    __slots__ = ("_view", "_pos", "_end")

    def __init__(self, buffer) -> None:
        view = memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._view = view
        self._pos = 0
        self._end = len(view)

    @property
    def offset(self) -> int:
        """Bytes consumed so far."""
        return self._pos

    @property
    def remaining(self) -> int:
        """Bytes not consumed yet."""
        return self._end - self._pos

    def rest(self) -> memoryview:
        """The bytes not consumed yet, as a slice of the buffer (they stay unconsumed)."""
        return self._view[self._pos :]

    def done(self) -> None:
        """Raise XdrError unless every byte was consumed."""
        if self._pos != self._end:
            raise XdrError(f"{self._end - self._pos} bytes left over")

    def _take(self, size: int) -> int:
        """Consume `size` bytes; return where they start."""
        pos = self._pos
        if size > self._end - pos:
            raise XdrError(f"need {size} bytes at offset {pos}, {self._end - pos} left")
        self._pos = pos + size
        return pos

    def unpack(self, shape: struct.Struct) -> tuple:
        """Several fixed-size items in one step (`shape` a precompiled big-endian Struct whose
        size is a multiple of 4): the data path's headers are read this way."""
        return shape.unpack_from(self._view, self._take(shape.size))

    def uint(self) -> int:
        return _U32.unpack_from(self._view, self._take(4))[0]

    def int(self) -> int:
        return _I32.unpack_from(self._view, self._take(4))[0]

    def uhyper(self) -> int:
        return _U64.unpack_from(self._view, self._take(8))[0]

    def hyper(self) -> int:
        return _I64.unpack_from(self._view, self._take(8))[0]

    def bool(self) -> bool:
        value = _U32.unpack_from(self._view, self._take(4))[0]
        if value > 1:
            raise XdrError(f"bool is {value}, not 0 or 1")
        return value == 1

    def enum(self, allowed=None) -> int:
        """An enum (a signed int on the wire, §4.3); with `allowed` (a container of ints) any
        other value raises XdrError."""
        value = _I32.unpack_from(self._view, self._take(4))[0]
        if allowed is not None and value not in allowed:
            raise XdrError(f"enum value {value} not allowed")
        return value

    def fixed_opaque(self, length: int) -> memoryview:
        """`length` bytes of fixed-length opaque data (§4.9), padding skipped."""
        start = self._take(padded(length))
        return self._view[start : start + length]

    def opaque(self, max_length: int = U32_MAX) -> memoryview:
        """Variable-length opaque data `opaque<max_length>` (§4.10), as a slice of the buffer."""
        length = _U32.unpack_from(self._view, self._take(4))[0]
        if length > max_length:
            raise XdrError(f"opaque length {length} over its bound {max_length}")
        start = self._take(padded(length))
        return self._view[start : start + length]

    def string(self, max_length: int = U32_MAX) -> bytes:
        """A `string<max_length>` (§4.11). Bytes, not str: names on the wire (file names,
        export paths, machine names) are byte strings and are compared as such."""
        return bytes(self.opaque(max_length))

    def optional(self, unpack_item: Callable[[], T]) -> Optional[T]:
        """An optional-data `*T` (§4.19): None when its bool is FALSE."""
        return unpack_item() if self.bool() else None

    def array(self, unpack_item: Callable[[], T], max_count: int = U32_MAX) -> list[T]:
        """A variable-length array `T<max_count>` (§4.13). Every element takes at least one
        unit, so a count larger than the units left is refused before any element is read."""
        count = _U32.unpack_from(self._view, self._take(4))[0]
        if count > max_count:
            raise XdrError(f"array count {count} over its bound {max_count}")
        if count > (self._end - self._pos) >> 2:
            raise XdrError(f"array count {count} larger than the {self._end - self._pos} bytes left")
        return [unpack_item() for _ in range(count)]


class Packer:
    """Appends XDR items to a growing buffer; `bytes()` returns what was packed."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def bytes(self) -> bytes:
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def pack(self, shape: struct.Struct, *values) -> None:
        """Several fixed-size items in one step (the counterpart of `Unpacker.unpack`)."""
        try:
            self._buf += shape.pack(*values)
        except struct.error as exc:
            raise ValueError(f"cannot pack {values} as {shape.format}: {exc}") from None

    def uint(self, value: int) -> None:
        if not 0 <= value <= U32_MAX:
            raise ValueError(f"unsigned int out of range: {value}")
        self._buf += _U32.pack(value)

    def int(self, value: int) -> None:
        if not I32_MIN <= value <= I32_MAX:
            raise ValueError(f"int out of range: {value}")
        self._buf += _I32.pack(value)

    def uhyper(self, value: int) -> None:
        if not 0 <= value <= U64_MAX:
            raise ValueError(f"unsigned hyper out of range: {value}")
        self._buf += _U64.pack(value)

    def hyper(self, value: int) -> None:
        if not I64_MIN <= value <= I64_MAX:
            raise ValueError(f"hyper out of range: {value}")
        self._buf += _I64.pack(value)

    def bool(self, value) -> None:
        # Only real truth values: a stray integer such as a count would otherwise be sent as
        # TRUE without anyone noticing.
        if value is not True and value is not False and value not in (0, 1):
            raise ValueError(f"bool must be True/False or 0/1, not {value!r}")
        self._buf += _U32.pack(1 if value else 0)

    def enum(self, value: int) -> None:
        self.int(value)

    def fixed_opaque(self, data, length: Optional[int] = None) -> None:
        """Fixed-length opaque data; with `length`, `data` must be exactly that long."""
        data = memoryview(data).cast("B")
        if length is not None and len(data) != length:
            raise ValueError(f"fixed opaque of {len(data)} bytes, expected {length}")
        self._buf += data
        self._buf += padding(len(data))

    def opaque(self, data, max_length: int = U32_MAX) -> None:
        data = memoryview(data).cast("B")
        if len(data) > max_length or len(data) > U32_MAX:
            raise ValueError(f"opaque of {len(data)} bytes over its bound {max_length}")
        self._buf += _U32.pack(len(data))
        self._buf += data
        self._buf += padding(len(data))

    def string(self, value, max_length: int = U32_MAX) -> None:
        """A string<max_length>: bytes as they are, str encoded as UTF-8."""
        self.opaque(value.encode() if isinstance(value, str) else value, max_length)

    def optional(self, value: Optional[T], pack_item: Callable[[T], None]) -> None:
        """`*T`: FALSE for None, else TRUE and the item."""
        if value is None:
            self._buf += _U32.pack(0)
        else:
            self._buf += _U32.pack(1)
            pack_item(value)

    def array(self, items: Iterable[T], pack_item: Callable[[T], None],
              max_count: int = U32_MAX) -> None:
        items = list(items)
        if len(items) > max_count:
            raise ValueError(f"array of {len(items)} items over its bound {max_count}")
        self._buf += _U32.pack(len(items))
        for item in items:
            pack_item(item)
