"""The server side of the NBD fixed-newstyle handshake, without any I/O.

Feed the client's bytes to `ServerHandshake.receive_data` and ask `next_event` what to do:
it returns `None` when it needs more bytes, or an event that carries the bytes to send and
says whether to carry on haggling (`Reply`), upgrade to TLS (`StartTls`), close (`Abort`)
or enter transmission (`Ready`). A peer that breaks the protocol so that no reply is possible raises
`ProtocolError`; the transport logs it, counts it and closes that one connection.

The export table is reached through callables, so this module never touches a disk or a
socket and every path through the option haggling is a plain unit test. `describe` gives an
export's description when INFO or GO asks for it, and `list_exports` the descriptions when
LIST does, so what they say can change between two requests (a swap export's says how many
node slots are free). Access control lives
behind them too: the transport binds the client's identity into them, and `lookup` raises
AccessDenied for an export this client may not open (ERR_POLICY for INFO/GO, a close for
EXPORT_NAME, which has no error reply); `list_exports` lists only what the client may open.

TLS (the spec's "TLS support"): the transport's mode is "off" (STARTTLS refused with
ERR_POLICY: the spec's NOTLS), "optional" (the client chooses: SELECTIVETLS with no TLS-only
export) or "require" (FORCEDTLS: before TLS every option but STARTTLS and ABORT gets
ERR_TLS_REQD, and EXPORT_NAME, which has no error reply, closes). After `StartTls` the
transport runs the TLS handshake and calls `tls_established()`; from then on it feeds the
decrypted bytes.

Metadata contexts (the spec's "Metadata querying"): `base:allocation` is served on every
export, and it is the only context. LIST_META_CONTEXT and SET_META_CONTEXT need structured
replies first (ERR_INVALID otherwise: block status is answered only in structured chunks);
SET replaces the selection even when it fails, STARTTLS forgets it, and `Ready` carries the
context's id only when the last SET selected it for the very export name GO names. Queries of
other namespaces are ignored, as the spec requires; a query without "namespace:" is
malformed.

Bounds (a hostile client must not make us buffer or loop without end): an option's data is
at most MAX_OPTION_DATA bytes and a client gets at most MAX_OPTIONS options; past either the
connection is closed, which the spec allows for lengths "deemed a denial of service".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol

from ..errors import AccessDenied, AttachRefused
from . import constants as C
from .errors import ProtocolError

GREETING = struct.pack(
    ">QQH", C.NBDMAGIC, C.IHAVEOPT, C.FLAG_FIXED_NEWSTYLE | C.FLAG_NO_ZEROES
)

# Export names are at most 4096 bytes (proto.md, "Option types"); an INFO/GO request is the
# name plus a short list of info ids, so 64 KiB is far beyond any honest option.
MAX_NAME_LENGTH = 4096
MAX_OPTION_DATA = 64 * 1024
MAX_OPTIONS = 256
# A metadata query is a string, at most 4096 bytes by the spec's rule for strings.
MAX_QUERY_LENGTH = 4096
# base:allocation's id in SET_META_CONTEXT replies and in block status chunks. Ids are
# opaque to the client; one fixed value, since it is the only context there is.
ALLOCATION_CONTEXT_ID = 1
# nbd-client reads option replies of at most 4095 bytes, so descriptions are cut to fit.
MAX_DESCRIPTION = 2048

_OPTION_HEADER = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QIII")
_CLIENT_FLAGS = struct.Struct(">I")
_KNOWN_CLIENT_FLAGS = C.CLIENT_FLAG_FIXED_NEWSTYLE | C.CLIENT_FLAG_NO_ZEROES


class ExportView(Protocol):
    """What the handshake needs to know of an export."""

    name: str
    description: str
    size: int
    read_only: bool


@dataclass(frozen=True)
class BlockLimits:
    """The size constraints advertised in NBD_INFO_BLOCK_SIZE."""

    minimum: int
    preferred: int
    maximum_payload: int


# Events ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Send `data` and keep reading options. An error reply also says why, for the
    transport's counter (`refused`, a short stable label) and log line (`message`)."""

    data: bytes
    option: int
    refused: str = ""
    message: str = ""


@dataclass(frozen=True)
class StartTls:
    """Send `data` (the ACK, in the clear), run the TLS handshake, then call
    `tls_established()`; everything after travels inside TLS."""

    data: bytes


@dataclass(frozen=True)
class Abort:
    """Send `data` (possibly empty) and close: the client asked to end the handshake."""

    data: bytes


@dataclass(frozen=True)
class Ready:
    """Send `data`, then the connection is in transmission on `export`."""

    data: bytes
    export: object
    transmission_flags: int
    structured_replies: bool
    attachment: object = None  # what `attach` returned; the transport releases it at close
    # base:allocation's id when the client selected it for this export (BLOCK_STATUS may be
    # served), else None.
    allocation_context: Optional[int] = None


Event = Reply | StartTls | Abort | Ready

TLS_MODES = ("off", "optional", "require")


# Writers --------------------------------------------------------------------


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _REPLY_HEADER.pack(C.OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def error_reply(option: int, reply_type: int, message: str) -> bytes:
    # The message is for humans; keep it short enough for nbd-client's 4 KiB read.
    return option_reply(option, reply_type, message.encode()[:MAX_DESCRIPTION])


def _refuse(option: int, reply_type: int, reason: str, message: str) -> Reply:
    return Reply(error_reply(option, reply_type, message), option, reason, message)


def transmission_flags(export: ExportView, structured_replies: bool) -> int:
    """Flags for an export. Writes go to one shared backend per export, and FLUSH/FUA are
    fdatasync on it, so every connection sees them: CAN_MULTI_CONN is honest."""
    flags = C.TFLAG_HAS_FLAGS | C.TFLAG_SEND_FLUSH | C.TFLAG_SEND_CACHE | C.TFLAG_CAN_MULTI_CONN
    if export.read_only:
        flags |= C.TFLAG_READ_ONLY
    else:
        # FAST_ZERO: a zeroing the backend cannot do quickly is refused at once with ENOTSUP
        # (backends.Backend.write_zeroes), so a copying client knows to write the zeros itself.
        flags |= (C.TFLAG_SEND_FUA | C.TFLAG_SEND_TRIM | C.TFLAG_SEND_WRITE_ZEROES
                  | C.TFLAG_SEND_FAST_ZERO)
    if structured_replies:
        # A READ is always answered in one chunk, so "don't fragment" is free to promise.
        flags |= C.TFLAG_SEND_DF
    return flags


def _utf8(text: str, limit: int) -> bytes:
    return text.encode()[:limit]


# The machine ------------------------------------------------------------------


class ServerHandshake:
    """One connection's option haggling, from greeting to transmission or close."""

    def __init__(
        self,
        lookup: Callable[[str], Optional[ExportView]],
        list_exports: Callable[[], Iterable[tuple[str, str]]],
        limits: BlockLimits,
        attach: Callable[[ExportView], object] = lambda export: None,
        tls: str = "off",
        describe: Callable[[ExportView], str] = lambda export: export.description,
    ) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls mode {tls!r} is not one of {TLS_MODES}")
        self._tls_mode = tls
        self._lookup = lookup
        self._attach = attach
        self._describe = describe
        self._list_exports = list_exports
        self._limits = limits
        self._buffer = bytearray()
        self._client_flags: Optional[int] = None
        self._options_seen = 0
        self._structured_replies = False
        # The export name the last SET_META_CONTEXT selected base:allocation for (None: none).
        self._meta_export: Optional[bytes] = None
        self.lookup_failures = 0  # exports that exist but failed to open (counted by the transport)
        self.tls_refusals = 0  # options refused for want of TLS (counted by the transport)
        self.tls_active = False
        self._tls_pending = False  # StartTls emitted, tls_established() not yet called
        self.done = False

    @staticmethod
    def greeting() -> bytes:
        return GREETING

    @property
    def no_zeroes(self) -> bool:
        return bool((self._client_flags or 0) & C.CLIENT_FLAG_NO_ZEROES)

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the handshake ended: a client may send its first requests
        right behind GO or EXPORT_NAME, and they belong to transmission."""
        return bytes(self._buffer) if self.done else b""

    @property
    def partial_message(self) -> int:
        """Bytes of a message not complete yet: what a client that closes now cut short
        (`next_event` leaves only an incomplete message buffered)."""
        return 0 if self.done else len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        if self.done:
            raise ProtocolError("data after the handshake ended", "late_data")
        if self._tls_pending:
            raise ProtocolError("plain-text data between STARTTLS and the TLS handshake",
                                "starttls_pipelined")
        self._buffer += data

    def tls_established(self) -> None:
        """The transport finished the TLS handshake; what it feeds from now on is decrypted."""
        if not self._tls_pending:
            raise RuntimeError("tls_established() without a StartTls event")
        self._tls_pending = False
        self.tls_active = True

    def next_event(self) -> Optional[Event]:
        """The next thing to do, or None when more bytes are needed."""
        if self.done or self._tls_pending:
            return None
        if self._client_flags is None:
            if len(self._buffer) < _CLIENT_FLAGS.size:
                return None
            (flags,) = _CLIENT_FLAGS.unpack_from(self._buffer)
            del self._buffer[: _CLIENT_FLAGS.size]
            self._check_client_flags(flags)
            self._client_flags = flags
        if len(self._buffer) < _OPTION_HEADER.size:
            return None
        magic, option, length = _OPTION_HEADER.unpack_from(self._buffer)
        if magic != C.IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}", "bad_option_magic")
        if length > MAX_OPTION_DATA:
            raise ProtocolError(
                f"option {option} declares {length} bytes of data (limit {MAX_OPTION_DATA})",
                "option_too_long",
            )
        end = _OPTION_HEADER.size + length
        if len(self._buffer) < end:
            return None
        data = bytes(self._buffer[_OPTION_HEADER.size : end])
        del self._buffer[:end]
        self._options_seen += 1
        if self._options_seen > MAX_OPTIONS:
            raise ProtocolError(f"more than {MAX_OPTIONS} options", "too_many_options")
        return self._handle_option(option, data)

    # Options ------------------------------------------------------------------

    def _check_client_flags(self, flags: int) -> None:
        # The spec says the server MUST drop a client that sends flags it does not know.
        if flags & ~_KNOWN_CLIENT_FLAGS:
            raise ProtocolError(f"unknown client flags {flags:#x}", "bad_client_flags")
        if not flags & C.CLIENT_FLAG_FIXED_NEWSTYLE:
            # Plain newstyle cannot carry error replies; netswapd serves fixed newstyle only.
            raise ProtocolError("client does not speak fixed newstyle", "not_fixed_newstyle")

    def _handle_option(self, option: int, data: bytes) -> Event:
        if option == C.OPT_STARTTLS:
            return self._starttls(data)
        if self._tls_mode == "require" and not self.tls_active and option != C.OPT_ABORT:
            return self._tls_required(option)
        if option == C.OPT_EXPORT_NAME:
            return self._export_name(data)
        if option == C.OPT_ABORT:
            self.done = True
            return Abort(option_reply(option, C.REP_ACK))
        if option == C.OPT_LIST:
            return self._list(data)
        if option in (C.OPT_INFO, C.OPT_GO):
            return self._info_or_go(option, data)
        if option == C.OPT_STRUCTURED_REPLY:
            return self._structured_reply(data)
        if option in (C.OPT_LIST_META_CONTEXT, C.OPT_SET_META_CONTEXT):
            return self._meta_context(option, data)
        name = C.OPTION_NAMES.get(option, str(option))
        return _refuse(option, C.REP_ERR_UNSUP, "unsupported_option", f"option {name} is not supported")

    def _starttls(self, data: bytes) -> Event:
        option = C.OPT_STARTTLS
        if self._tls_mode == "off":
            # The server can do TLS, this listener is configured not to: a policy.
            return _refuse(option, C.REP_ERR_POLICY, "tls_off", "TLS is off on this listener")
        if self.tls_active:
            return _refuse(option, C.REP_ERR_INVALID, "tls_already_on", "TLS is already on")
        if data:
            return _refuse(option, C.REP_ERR_INVALID, "malformed_option", "STARTTLS takes no data")
        if self._buffer:
            # The client must wait for our ACK before it starts TLS, so nothing can follow
            # STARTTLS here honestly; and what did would be plain text an attacker could have
            # injected, to be taken as if it came through TLS (the STARTTLS injection flaw).
            raise ProtocolError(f"{len(self._buffer)} bytes pipelined behind STARTTLS",
                                "starttls_pipelined")
        # The spec: no negotiation state survives STARTTLS, since it was made in the clear.
        self._structured_replies = False
        self._meta_export = None
        self._tls_pending = True
        return StartTls(option_reply(option, C.REP_ACK))

    def _tls_required(self, option: int) -> Event:
        self.tls_refusals += 1
        name = C.OPTION_NAMES.get(option, str(option))
        if option == C.OPT_EXPORT_NAME:
            # EXPORT_NAME has no error reply: the spec says to close.
            raise ProtocolError("EXPORT_NAME before STARTTLS on a TLS-only listener",
                                "tls_required")
        return Reply(error_reply(option, C.REP_ERR_TLS_REQD,
                                 f"TLS is required: send STARTTLS before {name}"), option)

    def _export_name(self, data: bytes) -> Event:
        # No error reply exists for EXPORT_NAME: an unknown export can only be a disconnect.
        name = self._decode_name(data)
        try:
            export = self._lookup(name) if name is not None else None
        except AccessDenied as exc:
            raise ProtocolError(f"EXPORT_NAME refused: {exc}", "access_denied") from exc
        if export is None:
            raise ProtocolError(f"EXPORT_NAME for unknown export {data[:64]!r}", "unknown_export")
        try:
            attachment = self._attach(export)
        except AttachRefused as exc:
            raise ProtocolError(f"EXPORT_NAME {export.name!r} refused: {exc}", "attach_refused") from exc
        self.done = True
        flags = transmission_flags(export, structured_replies=False)
        reply = struct.pack(">QH", export.size, flags)
        if not self.no_zeroes:
            reply += bytes(124)
        # EXPORT_NAME predates structured replies; a client using it gets simple replies.
        return Ready(reply, export, flags, structured_replies=False, attachment=attachment)

    def _list(self, data: bytes) -> Event:
        if data:
            return _refuse(C.OPT_LIST, C.REP_ERR_INVALID, "malformed_option", "LIST takes no data")
        parts = []
        for name, description in self._list_exports():
            encoded = _utf8(name, MAX_NAME_LENGTH)
            payload = struct.pack(">I", len(encoded)) + encoded + _utf8(description, MAX_DESCRIPTION)
            parts.append(option_reply(C.OPT_LIST, C.REP_SERVER, payload))
        parts.append(option_reply(C.OPT_LIST, C.REP_ACK))
        return Reply(b"".join(parts), C.OPT_LIST)

    def _structured_reply(self, data: bytes) -> Event:
        option = C.OPT_STRUCTURED_REPLY
        if data:
            return _refuse(option, C.REP_ERR_INVALID, "malformed_option", "STRUCTURED_REPLY takes no data")
        if self._structured_replies:
            return _refuse(option, C.REP_ERR_INVALID, "malformed_option", "structured replies already on")
        self._structured_replies = True
        return Reply(option_reply(option, C.REP_ACK), option)

    def _info_or_go(self, option: int, data: bytes) -> Event:
        request = _parse_info_request(data)
        if isinstance(request, str):
            return _refuse(option, C.REP_ERR_INVALID, "malformed_option", request)
        raw_name, info_ids = request
        export = self._find_export(option, raw_name)
        if isinstance(export, Reply):
            return export

        flags = transmission_flags(export, self._structured_replies)
        infos = [struct.pack(">HQH", C.INFO_EXPORT, export.size, flags)]
        # Only what was asked for (the client need not understand anything else).
        for info in dict.fromkeys(info_ids):
            if info == C.INFO_NAME:
                infos.append(struct.pack(">H", C.INFO_NAME) + _utf8(export.name, MAX_NAME_LENGTH))
            elif info == C.INFO_DESCRIPTION:
                infos.append(
                    struct.pack(">H", C.INFO_DESCRIPTION)
                    + _utf8(self._describe(export), MAX_DESCRIPTION)
                )
            elif info == C.INFO_BLOCK_SIZE:
                limits = self._limits
                infos.append(
                    struct.pack(
                        ">HIII", C.INFO_BLOCK_SIZE, limits.minimum, limits.preferred,
                        limits.maximum_payload,
                    )
                )
        reply = b"".join(option_reply(option, C.REP_INFO, info) for info in infos)
        reply += option_reply(option, C.REP_ACK)
        if option == C.OPT_INFO:
            return Reply(reply, option)
        try:
            # GO is where a node commits to the export: for swap, the seed's swapon.
            attachment = self._attach(export)
        except AccessDenied as exc:  # a binding checked at attach time
            return _refuse(option, C.REP_ERR_POLICY, "access_denied", str(exc))
        except AttachRefused as exc:
            return _refuse(option, C.REP_ERR_POLICY, "attach_refused", str(exc))
        self.done = True
        # The spec: BLOCK_STATUS only if the last SET_META_CONTEXT named this same export.
        selected = self._structured_replies and self._meta_export == raw_name
        return Ready(reply, export, flags, self._structured_replies, attachment,
                     ALLOCATION_CONTEXT_ID if selected else None)

    def _find_export(self, option: int, raw_name: bytes) -> ExportView | Reply:
        """The export `raw_name` names for this client, or the error reply saying why not."""
        name = self._decode_name(raw_name)
        shown = raw_name[:64].decode(errors="replace")
        try:
            export = self._lookup(name) if name is not None else None
        except OSError as exc:
            # The export exists but cannot be opened now (e.g. no space to create a node's
            # swap file): the client gets a reply that says why, not a dropped connection.
            self.lookup_failures += 1
            message = f"export {shown!r} cannot be opened: {exc.strerror or exc}"
            return _refuse(option, C.REP_ERR_UNKNOWN, "export_unavailable", message)
        except AccessDenied as exc:
            return _refuse(option, C.REP_ERR_POLICY, "access_denied", str(exc))
        if export is None:
            return _refuse(option, C.REP_ERR_UNKNOWN, "unknown_export", f"no export named {shown!r}")
        return export

    def _meta_context(self, option: int, data: bytes) -> Event:
        """LIST_META_CONTEXT or SET_META_CONTEXT (see the module docstring)."""
        setting = option == C.OPT_SET_META_CONTEXT
        if setting:
            # "Issuing this command replaces all previously-set metadata contexts (including
            # when this command fails)."
            self._meta_export = None
        name = C.OPTION_NAMES[option]
        if not self._structured_replies:
            # Block status is only ever answered in structured chunks, so a context selected
            # without them could never be used; the spec says ERR_INVALID.
            return _refuse(option, C.REP_ERR_INVALID, "needs_structured_replies",
                           f"{name} needs structured replies (STRUCTURED_REPLY) first")
        request = _parse_meta_request(data)
        if isinstance(request, str):
            return _refuse(option, C.REP_ERR_INVALID, "malformed_option", request)
        raw_name, queries = request
        export = self._find_export(option, raw_name)
        if isinstance(export, Reply):
            return export
        if setting:
            # "base:" selects nothing here (the spec: ignored in SET), nor does any other leaf.
            found = C.BASE_ALLOCATION in queries
        else:
            # No query lists every context; "base:" is the namespace's wildcard.
            found = not queries or any(query in (C.BASE_NAMESPACE + ":", C.BASE_ALLOCATION)
                                       for query in queries)
        reply = b""
        if found:
            # LIST replies carry id 0 ("reserved"); SET's id is what block status chunks use.
            context_id = ALLOCATION_CONTEXT_ID if setting else 0
            reply = option_reply(option, C.REP_META_CONTEXT,
                                 struct.pack(">I", context_id) + C.BASE_ALLOCATION.encode())
            if setting:
                self._meta_export = raw_name
        return Reply(reply + option_reply(option, C.REP_ACK), option)

    @staticmethod
    def _decode_name(raw: bytes) -> Optional[str]:
        # Names are UTF-8 by the spec; anything else names no export of ours.
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return None


def _export_name(data: bytes, count_size: int, what: str) -> bytes | str:
    """The export name that opens INFO/GO and META_CONTEXT data (a 32-bit length, the
    name), checked to leave room for the `count_size`-byte count that follows it; or why
    it is malformed."""
    minimum = 4 + count_size
    if len(data) < minimum:
        return f"{what} data of {len(data)} bytes is shorter than the {minimum}-byte minimum"
    (name_length,) = struct.unpack_from(">I", data)
    if name_length > len(data) - minimum:
        return f"export name length {name_length} exceeds the option data"
    if name_length > MAX_NAME_LENGTH:
        return f"export name length {name_length} exceeds {MAX_NAME_LENGTH}"
    return bytes(data[4 : 4 + name_length])


def _parse_info_request(data: bytes) -> tuple[bytes, list[int]] | str:
    """Split INFO/GO data into (name, info ids), or return why it is malformed."""
    name = _export_name(data, 2, "INFO/GO")
    if isinstance(name, str):
        return name
    name_length = len(name)
    (count,) = struct.unpack_from(">H", data, 4 + name_length)
    if len(data) != 6 + name_length + 2 * count:
        return f"{count} info requests do not match the option length {len(data)}"
    info_ids = list(struct.unpack_from(f">{count}H", data, 6 + name_length))
    return name, info_ids


def _parse_meta_request(data: bytes) -> tuple[bytes, list[str]] | str:
    """Split LIST/SET_META_CONTEXT data into (export name, queries), or return why it is
    malformed. The work is linear in the option's length whatever its counts claim: a count
    is checked against the bytes left before it is used, and every query costs 4 bytes."""
    name = _export_name(data, 4, "META_CONTEXT")
    if isinstance(name, str):
        return name
    position = 8 + len(name)
    (count,) = struct.unpack_from(">I", data, position - 4)
    if count > (len(data) - position) // 4:
        return f"{count} queries do not fit in the option's {len(data)} bytes"
    queries = []
    for _ in range(count):
        if len(data) - position < 4:
            return f"{count} queries do not fit in the option's {len(data)} bytes"
        (length,) = struct.unpack_from(">I", data, position)
        position += 4
        if length > len(data) - position:
            return f"query length {length} exceeds the option data"
        if length > MAX_QUERY_LENGTH:
            return f"query length {length} exceeds {MAX_QUERY_LENGTH}"
        raw = data[position : position + length]
        position += length
        try:
            query = raw.decode("utf-8")
        except UnicodeDecodeError:
            return f"query {raw[:64]!r} is not UTF-8"
        namespace, colon, _ = query.partition(":")
        if not colon or not namespace:
            # The spec: a query "MUST start with a namespace and a colon".
            return f"query {query[:64]!r} does not start with a namespace and a colon"
        queries.append(query)
    if position != len(data):
        return f"{len(data) - position} bytes follow the last query"
    return name, queries
