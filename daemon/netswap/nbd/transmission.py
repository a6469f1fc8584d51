"""The transmission phase of NBD, without any I/O: request parsing, checking and replies.

Receiving. `RequestParser` owns a fixed receive window. The transport `recv_into`s
`recv_window()` and reports the count with `advance(n)`; `next_request()` then returns a
`Request`, or None when a whole 28-byte header is not buffered yet. Reading whatever the
socket has into one window lets a single recv carry many queued headers (32 requests in
flight cost one syscall, not 32), and the window is never grown, so a client cannot make us
buffer more than its size.

A WRITE header is followed by its payload. The parser then refuses to return another
request until the payload has been consumed: `take_payload(dest)` copies whatever part of it
is already buffered into `dest` (a pool buffer), and the transport receives the rest straight
into `dest` and reports it with `payload_received(n)`. Payload bytes therefore never pass
through a per-request heap object.

Checking. `check_request` decides a request's error value from the spec's rules, without
touching the export (`refusal` also says what is wrong, for the log); the transport executes
only requests it passes.

Replying. `simple_reply` and the `structured_*` writers make reply headers; the READ payload
itself is sent by the transport from the pool buffer next to the header (sendmsg). A
BLOCK_STATUS reply is one NBD_REPLY_TYPE_BLOCK_STATUS chunk: `encode_extents` writes its
descriptors into a pool buffer of BLOCK_STATUS_BUFFER bytes, enforcing the spec's rules on
whatever the backend reported, and `block_status_header` makes the header in front of them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Optional

from ..transport.window import DEFAULT_WINDOW
from . import constants as C
from .errors import ProtocolError

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK_HEADER = struct.Struct(">IHHQI")
_OFFSET_DATA_PREFIX = struct.Struct(">IHHQIQ")
_ERROR_CHUNK = struct.Struct(">IHHQIIH")
_BLOCK_STATUS_PREFIX = struct.Struct(">IHHQII")  # chunk header, then the context id
_DESCRIPTOR = struct.Struct(">II")  # extent length, status flags
DESCRIPTOR_SIZE = _DESCRIPTOR.size

# Descriptors in one BLOCK_STATUS reply. The spec allows 2^20; fewer keep a reply's pool buffer
# small (8 KiB) and a worker's time bounded on a badly fragmented export, and a client asks
# again from where the reply ended (nbdinfo, nbdcopy and qemu all do).
MAX_EXTENTS = 1024
BLOCK_STATUS_BUFFER = MAX_EXTENTS * _DESCRIPTOR.size


class Request:
    """One transmission request, as its header said it."""

    __slots__ = ("flags", "command", "cookie", "offset", "length")

    def __init__(self, flags: int, command: int, cookie: int, offset: int, length: int) -> None:
        self.flags = flags
        self.command = command
        self.cookie = cookie
        self.offset = offset
        self.length = length

    @property
    def has_payload(self) -> bool:
        return self.command == C.CMD_WRITE

    @property
    def name(self) -> str:
        return C.COMMAND_NAMES.get(self.command, f"cmd{self.command}")

    def __repr__(self) -> str:
        return (
            f"Request({self.name}, flags={self.flags:#x}, cookie={self.cookie:#x}, "
            f"offset={self.offset}, length={self.length})"
        )


class RequestParser:
    """Turns the bytes a client sends in transmission into `Request`s."""

    def __init__(self, window: int | memoryview = DEFAULT_WINDOW) -> None:
        """`window` is a size, or the memory to use (the transport passes a pool buffer, so
        that even the receive window of a swap connection is backed by its reserve)."""
        view = memoryview(bytearray(window)) if isinstance(window, int) else window
        if len(view) < C.REQUEST_HEADER_SIZE:
            raise ValueError("window smaller than a request header")
        self._view = view
        self._start = 0
        self._end = 0
        self._payload_left = 0

    @property
    def buffered(self) -> int:
        return self._end - self._start

    @property
    def payload_left(self) -> int:
        """Bytes of the current WRITE's payload not yet consumed."""
        return self._payload_left

    def recv_window(self) -> memoryview:
        """The free space the transport should receive into."""
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._view) - self._end < C.REQUEST_HEADER_SIZE:
            # Slide the partial header to the front so a whole one always fits.
            count = self._end - self._start
            self._view[:count] = self._view[self._start : self._end]
            self._start, self._end = 0, count
        return self._view[self._end :]

    def advance(self, count: int) -> None:
        """`count` bytes were received into `recv_window()`."""
        if count < 0 or self._end + count > len(self._view):
            raise ValueError("advance past the receive window")
        self._end += count

    def receive_data(self, data: bytes) -> None:
        """Copy `data` in (for tests and fuzzing; the transport uses the window)."""
        data = memoryview(data)
        while data:
            window = self.recv_window()
            if not window:
                raise ValueError("receive window full: consume requests first")
            count = min(len(window), len(data))
            window[:count] = data[:count]
            self.advance(count)
            data = data[count:]

    def next_request(self) -> Optional[Request]:
        """The next request, or None if a whole header is not buffered yet."""
        if self._payload_left:
            raise RuntimeError("the previous WRITE's payload has not been consumed")
        if self._end - self._start < C.REQUEST_HEADER_SIZE:
            return None
        magic, flags, command, cookie, offset, length = _REQUEST.unpack_from(
            self._view, self._start
        )
        if magic != C.REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#010x}", "bad_request_magic")
        self._start += C.REQUEST_HEADER_SIZE
        request = Request(flags, command, cookie, offset, length)
        if request.has_payload:
            self._payload_left = length
        return request

    def lend_window(self) -> tuple[int, int]:
        """Where the buffered bytes lie in the window, (start, end), for another parser of
        the same protocol over the same memory (the C request loop); it gives the window
        back with `take_window_back` before this parser is used again."""
        if self._payload_left:
            raise RuntimeError("the previous WRITE's payload has not been consumed")
        return self._start, self._end

    def take_window_back(self, start: int, end: int) -> None:
        """The window after the other parser consumed requests from it (see lend_window)."""
        if not 0 <= start <= end <= len(self._view):
            raise ValueError(f"window state {start}..{end} outside 0..{len(self._view)}")
        self._start, self._end = start, end

    def take_payload(self, dest: memoryview) -> int:
        """Copy the buffered part of the current payload into `dest`; return the count."""
        count = min(len(dest), self._end - self._start, self._payload_left)
        if count:
            dest[:count] = self._view[self._start : self._start + count]
            self._start += count
            self._payload_left -= count
        return count

    def discard_payload(self) -> int:
        """Drop the buffered part of the current payload (a rejected WRITE); return the count."""
        count = min(self._end - self._start, self._payload_left)
        self._start += count
        self._payload_left -= count
        return count

    def payload_received(self, count: int) -> None:
        """The transport received `count` payload bytes directly, past the window."""
        if count > self._payload_left:
            raise ValueError("more payload received than the request declared")
        self._payload_left -= count


@dataclass(frozen=True)
class ExportLimits:
    """What `check_request` needs to know about the export and the connection."""

    size: int
    read_only: bool
    minimum_block: int
    maximum_payload: int
    structured_replies: bool
    block_status: bool = False  # base:allocation was selected for this export


_WRITING = frozenset({C.CMD_WRITE, C.CMD_TRIM, C.CMD_WRITE_ZEROES})
_RANGED = frozenset({C.CMD_READ, C.CMD_WRITE, C.CMD_TRIM, C.CMD_WRITE_ZEROES, C.CMD_CACHE,
                     C.CMD_BLOCK_STATUS})
_SERVED = _RANGED | {C.CMD_FLUSH, C.CMD_DISC}
# FUA may come with any command (the server may ignore it where nothing is written).
_FLAGS_ALLOWED = {
    C.CMD_READ: C.CMD_FLAG_FUA | C.CMD_FLAG_DF,
    C.CMD_WRITE_ZEROES: C.CMD_FLAG_FUA | C.CMD_FLAG_NO_HOLE | C.CMD_FLAG_FAST_ZERO,
    C.CMD_BLOCK_STATUS: C.CMD_FLAG_FUA | C.CMD_FLAG_REQ_ONE,
}


def check_request(request: Request, limits: ExportLimits) -> int:
    """The NBD error value the request must get, or 0 if it may be executed."""
    return refusal(request, limits)[0]


def refusal(request: Request, limits: ExportLimits) -> tuple[int, str]:
    """`check_request`'s error value and, for the log, what is wrong ("" when nothing is)."""
    command = request.command
    if command not in _SERVED:
        # "SHOULD return NBD_EINVAL if it receives an unknown command"
        return C.EINVAL, f"unknown command {command}"
    if command == C.CMD_BLOCK_STATUS and not limits.block_status:
        # "Servers SHOULD reply with NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS
        # without selecting at least one metadata context."
        return C.EINVAL, "BLOCK_STATUS without a metadata context selected (SET_META_CONTEXT)"
    allowed = _FLAGS_ALLOWED.get(command, C.CMD_FLAG_FUA)
    if not limits.structured_replies:
        allowed &= ~C.CMD_FLAG_DF  # DF is only defined with structured replies
    if limits.read_only:
        # SEND_FAST_ZERO is advertised only where WRITE_ZEROES is (transmission_flags).
        allowed &= ~C.CMD_FLAG_FAST_ZERO
    if request.flags & ~allowed:
        return C.EINVAL, f"flags {request.flags & ~allowed:#x} not allowed on {request.name}"
    if command not in _RANGED:
        return 0, ""  # FLUSH and DISC: offset and length are reserved and ignored
    if command in _WRITING and limits.read_only:
        return C.EPERM, "read-only export"
    length, offset = request.length, request.offset
    if length == 0:
        return C.EINVAL, "zero length"
    if command in (C.CMD_READ, C.CMD_WRITE) and length > limits.maximum_payload:
        return C.EINVAL, f"length {length} exceeds the maximum payload {limits.maximum_payload}"
    if offset % limits.minimum_block or length % limits.minimum_block:
        return C.EINVAL, f"not aligned to the minimum block size {limits.minimum_block}"
    if offset + length > limits.size:
        # Writing past the end is "no space"; reading, trimming or asking the status past it
        # is invalid.
        error = C.ENOSPC if command in (C.CMD_WRITE, C.CMD_WRITE_ZEROES) else C.EINVAL
        return error, f"past the end of the export ({limits.size} bytes)"
    return 0, ""


# Replies --------------------------------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply header; a successful READ's data follows it."""
    return _SIMPLE_REPLY.pack(C.SIMPLE_REPLY_MAGIC, error, cookie)


def structured_read_prefix(cookie: int, offset: int, length: int) -> bytes:
    """The header of a final OFFSET_DATA chunk carrying a whole READ; the data follows."""
    return _OFFSET_DATA_PREFIX.pack(
        C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE, C.REPLY_TYPE_OFFSET_DATA, cookie,
        8 + length, offset,
    )


def structured_done(cookie: int) -> bytes:
    """The final NONE chunk: success of a command that returns no data."""
    return _CHUNK_HEADER.pack(C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE, C.REPLY_TYPE_NONE, cookie, 0)


def structured_error(cookie: int, error: int, message: str = "") -> bytes:
    """A final ERROR chunk with an optional human-readable message (at most 4096 bytes)."""
    text = message.encode()[:4096]
    return _ERROR_CHUNK.pack(
        C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE, C.REPLY_TYPE_ERROR, cookie,
        6 + len(text), error, len(text),
    ) + text


def reply_header(request: Request, error: int, structured: bool, message: str = "") -> bytes:
    """The header of the reply to `request`: simple, or structured if negotiated."""
    if not structured:
        return simple_reply(request.cookie, error)
    if error:
        return structured_error(request.cookie, error, message)
    if request.command == C.CMD_READ:
        return structured_read_prefix(request.cookie, request.offset, request.length)
    if request.command == C.CMD_BLOCK_STATUS:
        # Its success is a BLOCK_STATUS chunk (block_status_header), never a bare NONE.
        raise ValueError("a successful BLOCK_STATUS reply needs block_status_header")
    return structured_done(request.cookie)


def encode_extents(view: memoryview, request: Request,
                   runs: Iterable[tuple[int, bool]]) -> int:
    """Write the base:allocation descriptors of a BLOCK_STATUS reply into `view` and return
    how many there are. `runs` are (length, allocated) pairs, consecutive from the request's
    offset, as a backend's `allocation` reports them; what is not allocated reads as zeros,
    so it is HOLE|ZERO, and what is allocated is status 0 (contents not known).

    The spec's rules hold whatever the runs say: every descriptor has a nonzero length and
    all of them lie within the request (the last one may not reach its end: the client asks
    again from there); neighbours of equal status are merged; there are at most MAX_EXTENTS,
    or as many as fit in `view`, and exactly one with REQ_ONE. And there is always one: when
    the runs cover nothing, the whole range gets status 0, which the spec says a server may
    always report."""
    capacity = 1 if request.flags & C.CMD_FLAG_REQ_ONE else min(MAX_EXTENTS,
                                                                len(view) // _DESCRIPTOR.size)
    left = request.length
    count = 0
    last_status = -1
    last_length = 0
    for length, allocated in runs:
        if left == 0:
            break
        length = min(length, left)
        if length <= 0:
            continue
        status = 0 if allocated else C.STATE_HOLE | C.STATE_ZERO
        if status == last_status:
            last_length += length
        elif count == capacity:
            break
        else:
            count += 1
            last_status, last_length = status, length
        _DESCRIPTOR.pack_into(view, (count - 1) * _DESCRIPTOR.size, last_length, last_status)
        left -= length
    if count == 0:
        _DESCRIPTOR.pack_into(view, 0, request.length, 0)
        count = 1
    return count


def block_status_header(cookie: int, context_id: int, count: int) -> bytes:
    """The header of the final (only) BLOCK_STATUS chunk of `count` descriptors, up to and
    including the context id; the descriptors (`encode_extents`) follow it."""
    return _BLOCK_STATUS_PREFIX.pack(
        C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE, C.REPLY_TYPE_BLOCK_STATUS, cookie,
        4 + count * _DESCRIPTOR.size, context_id,
    )
