"""ONC RPC v2 messages (RFC 5531 §9, Appendix A) and TCP record marking (§11), without any I/O.

Records. Over TCP a message travels as a record: one or more fragments, each behind a 4-byte
header whose top bit marks the last fragment and whose other 31 bits give the fragment's length.
`RecordAssembler` keeps the account of one connection's current record; the transport reads
each header itself, asks the assembler how many body bytes follow (`begin_fragment`), receives
them straight into its pool buffer, and reports them (`end_fragment`), which returns the record's
length once the last fragment is in. The cap on a record is checked when a header arrives,
before the transport has reserved or received anything, so a forged 2 GiB header costs four
bytes of reading and a closed connection.

Empty fragments: an empty *last* fragment closes a non-empty record (RFC 5531 does not forbid
it, and a sender that streams a record may only learn it has ended after sending its last
data). An empty fragment that is not last adds nothing and is refused, so a peer cannot keep
the connection busy without making progress; an empty record has no xid to answer and is
refused too. Both end the connection (`RecordError`).

Calls. `parse_call(record)` decodes a CALL header up to the procedure's arguments, which it
returns as a view of the record (a WRITE's data is never copied). What the server must answer
comes back as the exception: `NotACall` (no xid to reply to, or not a CALL: close the
connection), and for the rest `CallRejected` subclasses whose `reply()` is the reply to send:
`GarbageCall` (GARBAGE_ARGS), `RpcMismatch` (MSG_DENIED RPC_MISMATCH 2..2) and `AuthFailure`
(MSG_DENIED AUTH_ERROR).

Replies. `accepted`, `prog_mismatch`, `denied_rpc_mismatch` and `denied_auth` return a reply's
RPC header; the caller appends the procedure's results and the transport adds the fragment
header. Our verifier is always AUTH_NONE: AUTH_SYS has nothing to verify (App. A).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from ..counters import declare
from . import constants as C
from .xdr import Packer, Unpacker, XdrError

RPC_PROTOCOL_ERRORS = declare(
    "nfs", "rpc_protocol_errors", "netswap_rpc_protocol_errors_total",
    "RPC records and calls refused (the record cap, no xid, wrong version, credentials, garbage"
    " arguments, unknown program or procedure), by reason.",
    label="reason")

_FRAGMENT_HEADER = struct.Struct(">I")
# xid, REPLY, MSG_ACCEPTED, verifier flavor AUTH_NONE, verifier length 0, accept_stat
_ACCEPTED = struct.Struct(">6I")
_ACCEPTED_MISMATCH = struct.Struct(">8I")
# xid, REPLY, MSG_DENIED, reject_stat, then low/high or auth_stat
_DENIED_MISMATCH = struct.Struct(">6I")
_DENIED_AUTH = struct.Struct(">5I")
# xid, msg_type, rpcvers, prog, vers, proc
_CALL_START = struct.Struct(">6I")
# The same, then the credential's flavor and length: a call's fixed head, read in one step.
_CALL_HEAD = struct.Struct(">8I")
_VERIFIER = struct.Struct(">2I")
# Credential bodies already decoded, and what they decoded to: a client sends the same one
# with every call. Bounded; started over when full.
_CREDENTIALS: dict = {}
_CREDENTIALS_MAX = 1024


# --------------------------------------------------------------------------- errors


class RpcError(Exception):
    """A peer's bytes that the RPC layer cannot take as they are.

    `reason` is a short stable label (record_too_large, not_a_call, auth_badcred, ...) for the
    counter and the one log line the transport writes.
    """

    reason = "rpc_error"

    def __init__(self, message: str, reason: Optional[str] = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class RecordError(RpcError):
    """The record stream is broken or hostile; the only answer is closing the connection."""


class RecordTooLarge(RecordError):
    reason = "record_too_large"


class NotACall(RpcError):
    """The record is not an RPC call (too short to hold an xid and a message type, or a
    REPLY): there is nothing to answer, so the server closes the connection. `xid` is None
    when the record was too short to hold one."""

    reason = "not_a_call"

    def __init__(self, message: str, xid: Optional[int]) -> None:
        super().__init__(message)
        self.xid = xid


class CallRejected(RpcError):
    """A call the server answers without running its procedure; `reply()` is that answer
    (the RPC header of a complete reply: nothing follows it)."""

    def __init__(self, message: str, xid: int) -> None:
        super().__init__(message)
        self.xid = xid

    def reply(self) -> bytes:
        raise NotImplementedError


class GarbageCall(CallRejected):
    """The call header is cut short (or its opaque lengths run past the record)."""

    reason = "garbage_call"

    def reply(self) -> bytes:
        return accepted(self.xid, C.GARBAGE_ARGS)


class RpcMismatch(CallRejected):
    """rpcvers is not 2."""

    reason = "rpc_mismatch"

    def __init__(self, message: str, xid: int, rpcvers: int) -> None:
        super().__init__(message, xid)
        self.rpcvers = rpcvers

    def reply(self) -> bytes:
        return denied_rpc_mismatch(self.xid)


class AuthFailure(CallRejected):
    """The credential or verifier is refused; `auth_stat` says why (RFC 5531 §9)."""

    def __init__(self, message: str, xid: int, auth_stat: int) -> None:
        super().__init__(message, xid)
        self.auth_stat = auth_stat
        self.reason = "auth_" + C.AUTH_STAT_NAMES.get(auth_stat, str(auth_stat))

    def reply(self) -> bytes:
        return denied_auth(self.xid, self.auth_stat)


# --------------------------------------------------------------------------- record marking


def fragment_header(length: int, last: bool = True) -> bytes:
    """The 4-byte header of a fragment of `length` bytes."""
    if not 0 <= length <= C.FRAGMENT_LENGTH_MASK:
        raise ValueError(f"fragment length {length} does not fit in 31 bits")
    return _FRAGMENT_HEADER.pack(length | (C.LAST_FRAGMENT if last else 0))


def parse_fragment_header(header) -> tuple[bool, int]:
    """(last, length) from a fragment's 4-byte header."""
    (word,) = _FRAGMENT_HEADER.unpack(header)
    return bool(word & C.LAST_FRAGMENT), word & C.FRAGMENT_LENGTH_MASK


class RecordAssembler:
    """The account of one connection's current record (see the module docstring).

    Usage by the transport, per fragment:
        length = assembler.begin_fragment(header4)   # may raise RecordError
        ... receive `length` bytes into the record buffer at offset assembler.received ...
        record_length = assembler.end_fragment()     # None while more fragments follow
    """

    __slots__ = ("max_record", "_received", "_pending", "_last")

    def __init__(self, max_record: int) -> None:
        if max_record < 1:
            raise ValueError(f"max_record must be positive, not {max_record}")
        self.max_record = max_record
        self._received = 0          # record bytes in completed fragments
        self._pending: Optional[int] = None  # length of the fragment being received
        self._last = False

    @property
    def received(self) -> int:
        """Bytes of the current record in fragments already ended: where the next fragment's
        body goes in the record buffer."""
        return self._received

    @property
    def in_fragment(self) -> bool:
        """A fragment header was accepted and its body not yet reported."""
        return self._pending is not None

    def begin_fragment(self, header) -> int:
        """Account for a fragment header; return how many body bytes follow it.

        Raises RecordTooLarge if the record would exceed `max_record`, and RecordError for an
        empty fragment that is not last or an empty record; nothing is changed then."""
        if self._pending is not None:
            raise RuntimeError("begin_fragment before the previous fragment ended")
        last, length = parse_fragment_header(header)
        if length > self.max_record - self._received:
            raise RecordTooLarge(
                f"record of at least {self._received + length} bytes over the cap of "
                f"{self.max_record}")
        if length == 0:
            if not last:
                raise RecordError("empty fragment that is not the last", "empty_fragment")
            if self._received == 0:
                raise RecordError("empty record", "empty_record")
        self._pending = length
        self._last = last
        return length

    def end_fragment(self) -> Optional[int]:
        """The fragment's body was received. Returns the record's length if that was its last
        fragment (the assembler is then ready for the next record), else None."""
        if self._pending is None:
            raise RuntimeError("end_fragment without begin_fragment")
        self._received += self._pending
        self._pending = None
        if not self._last:
            return None
        length, self._received = self._received, 0
        return length


# --------------------------------------------------------------------------- calls


@dataclass(frozen=True)
class AuthSys:
    """An AUTH_SYS credential (RFC 5531 App. A). A claim by the client, not a proof.

    `machine` is decoded as UTF-8 with undecodable bytes shown as escapes: it is for logs, not
    for decisions."""

    stamp: int
    machine: str
    uid: int
    gid: int
    gids: tuple = ()

    def pack(self) -> bytes:
        """The credential body (authsys_parms)."""
        p = Packer()
        p.uint(self.stamp)
        p.string(self.machine, C.AUTH_SYS_MACHINENAME_MAX)
        p.uint(self.uid)
        p.uint(self.gid)
        p.array(self.gids, p.uint, C.AUTH_SYS_GIDS_MAX)
        body = p.bytes()
        if len(body) > C.MAX_AUTH_BYTES:
            raise ValueError(f"AUTH_SYS body of {len(body)} bytes over {C.MAX_AUTH_BYTES}")
        return body


@dataclass(slots=True)
class Call:
    """An RPC call: who is called, with which credential (None for AUTH_NONE), and the
    procedure's arguments as a view of the record (not copied)."""

    xid: int
    prog: int
    vers: int
    proc: int
    cred: Optional[AuthSys]
    args: memoryview


def _parse_auth_sys(body: memoryview, xid: int) -> AuthSys:
    u = Unpacker(body)
    try:
        stamp = u.uint()
        machine = u.string(C.AUTH_SYS_MACHINENAME_MAX)
        uid = u.uint()
        gid = u.uint()
        gids = tuple(u.array(u.uint, C.AUTH_SYS_GIDS_MAX))
        u.done()
    except XdrError as exc:
        raise AuthFailure(f"malformed AUTH_SYS credential: {exc}", xid, C.AUTH_BADCRED) from None
    return AuthSys(stamp, machine.decode("utf-8", "backslashreplace"), uid, gid, gids)


def parse_call(record) -> Call:
    """Decode a CALL up to its arguments. Raises NotACall or a CallRejected (see the module
    docstring); never anything else, whatever the bytes."""
    # Every call of the data path is a well-formed AUTH_SYS or AUTH_NONE call: taken in a few
    # struct steps here. Anything else, and every error, goes the checked way below, so the
    # answers to bad calls are exactly its answers.
    view = memoryview(record)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    size = len(view)
    if size >= _CALL_HEAD.size:
        xid, msg_type, rpcvers, prog, vers, proc, flavor, length = _CALL_HEAD.unpack_from(view)
        start = _CALL_HEAD.size
        end = start + ((length + 3) & ~3)
        if (msg_type == C.CALL and rpcvers == C.RPC_VERSION and length <= C.MAX_AUTH_BYTES
                and end + _VERIFIER.size <= size
                and _VERIFIER.unpack_from(view, end) == (C.AUTH_NONE, 0)):
            if flavor == C.AUTH_SYS:
                body = bytes(view[start:start + length])
                cred = _CREDENTIALS.get(body)
                if cred is None:
                    cred = _parse_auth_sys(memoryview(body), xid)
                    if len(_CREDENTIALS) >= _CREDENTIALS_MAX:
                        _CREDENTIALS.clear()
                    _CREDENTIALS[body] = cred
                return Call(xid, prog, vers, proc, cred, view[end + _VERIFIER.size:])
            if flavor == C.AUTH_NONE and not length:
                return Call(xid, prog, vers, proc, None, view[end + _VERIFIER.size:])
    return _parse_call_checked(view)


def _parse_call_checked(record) -> Call:
    u = Unpacker(record)
    size = u.remaining
    if size < 8:
        xid = u.uint() if size >= 4 else None
        raise NotACall(f"record of {size} bytes is too short for a call", xid)
    xid = u.uint()
    msg_type = u.uint()
    if msg_type != C.CALL:
        raise NotACall(f"msg_type {msg_type} is not CALL", xid)
    try:
        rpcvers = u.uint()
        if rpcvers != C.RPC_VERSION:
            raise RpcMismatch(f"rpcvers {rpcvers}", xid, rpcvers)
        prog = u.uint()
        vers = u.uint()
        proc = u.uint()
        # An opaque_auth whose body is over 400 bytes is a bad credential (it cannot be one
        # the RFC allows); a body that runs past the record is a truncated header.
        cred_flavor = u.uint()
        cred_length = u.uint()
        if cred_length > C.MAX_AUTH_BYTES:
            raise AuthFailure(f"credential body of {cred_length} bytes", xid, C.AUTH_BADCRED)
        cred_body = u.fixed_opaque(cred_length)
        verf_flavor = u.uint()
        verf_length = u.uint()
        if verf_length > C.MAX_AUTH_BYTES:
            raise AuthFailure(f"verifier body of {verf_length} bytes", xid, C.AUTH_BADVERF)
        u.fixed_opaque(verf_length)
    except XdrError as exc:
        raise GarbageCall(f"truncated call header: {exc}", xid) from None

    if cred_flavor == C.AUTH_SYS:
        cred = _parse_auth_sys(cred_body, xid)
    elif cred_flavor == C.AUTH_NONE:
        if cred_length:
            raise AuthFailure(f"AUTH_NONE credential with a {cred_length}-byte body", xid,
                              C.AUTH_BADCRED)
        cred = None
    else:
        # BADCRED, not TOOWEAK: TOOWEAK says "understood, but not strong enough here" and
        # invites the client to retry with a stronger flavor of the same family, while we
        # cannot interpret this credential at all (RPCSEC_GSS, AUTH_DH, ...). Linux's
        # svc_authenticate answers an unknown flavor the same way.
        raise AuthFailure(f"credential flavor {cred_flavor} not supported", xid, C.AUTH_BADCRED)
    # AUTH_SYS and AUTH_NONE calls carry an AUTH_NONE verifier (App. A); anything else is a
    # verifier we cannot check.
    if verf_flavor != C.AUTH_NONE or verf_length:
        raise AuthFailure(f"verifier flavor {verf_flavor} with {verf_length} bytes", xid,
                          C.AUTH_BADVERF)
    return Call(xid, prog, vers, proc, cred, u.rest())


def call_header(xid: int, prog: int, vers: int, proc: int,
                cred: Optional[AuthSys] = None) -> bytes:
    """The RPC header of a CALL (the arguments follow it): for clients of ours (rpcbind
    registration) and tests."""
    p = Packer()
    p.pack(_CALL_START, xid, C.CALL, C.RPC_VERSION, prog, vers, proc)
    if cred is None:
        p.uint(C.AUTH_NONE)
        p.opaque(b"")
    else:
        p.uint(C.AUTH_SYS)
        p.opaque(cred.pack(), C.MAX_AUTH_BYTES)
    p.uint(C.AUTH_NONE)
    p.opaque(b"")
    return p.bytes()


# --------------------------------------------------------------------------- replies


def accepted(xid: int, stat: int = C.SUCCESS) -> bytes:
    """MSG_ACCEPTED with an AUTH_NONE verifier and `stat`; SUCCESS results follow it."""
    return _ACCEPTED.pack(xid, C.REPLY, C.MSG_ACCEPTED, C.AUTH_NONE, 0, stat)


def prog_mismatch(xid: int, low: int, high: int) -> bytes:
    """PROG_MISMATCH: the program is served, in versions low..high only."""
    return _ACCEPTED_MISMATCH.pack(xid, C.REPLY, C.MSG_ACCEPTED, C.AUTH_NONE, 0,
                                   C.PROG_MISMATCH, low, high)


def denied_rpc_mismatch(xid: int) -> bytes:
    """MSG_DENIED RPC_MISMATCH: we speak RPC version 2 only."""
    return _DENIED_MISMATCH.pack(xid, C.REPLY, C.MSG_DENIED, C.RPC_MISMATCH,
                                 C.RPC_VERSION, C.RPC_VERSION)


def denied_auth(xid: int, auth_stat: int) -> bytes:
    """MSG_DENIED AUTH_ERROR with the reason."""
    return _DENIED_AUTH.pack(xid, C.REPLY, C.MSG_DENIED, C.AUTH_ERROR, auth_stat)


@dataclass(slots=True)
class Reply:
    """A decoded reply (for our own RPC clients and tests).

    `accepted` tells MSG_ACCEPTED from MSG_DENIED; `stat` is then the accept_stat or the
    reject_stat. `mismatch` is (low, high) for PROG_MISMATCH and RPC_MISMATCH, `auth_stat` is
    set for AUTH_ERROR, and `results` is what follows a SUCCESS (a view, empty otherwise)."""

    xid: int
    accepted: bool
    stat: int
    mismatch: Optional[tuple[int, int]] = None
    auth_stat: Optional[int] = None
    results: memoryview = memoryview(b"")


class BadReply(RpcError):
    reason = "bad_reply"


def parse_reply(record) -> Reply:
    """Decode a REPLY. Raises BadReply for anything that is not a well-formed one."""
    u = Unpacker(record)
    try:
        xid = u.uint()
        msg_type = u.uint()
        if msg_type != C.REPLY:
            raise BadReply(f"msg_type {msg_type} is not REPLY")
        reply_stat = u.uint()
        if reply_stat == C.MSG_ACCEPTED:
            u.uint()  # verifier flavor
            u.opaque(C.MAX_AUTH_BYTES)
            stat = u.uint()
            if stat == C.PROG_MISMATCH:
                return Reply(xid, True, stat, mismatch=(u.uint(), u.uint()))
            if stat == C.SUCCESS:
                return Reply(xid, True, stat, results=u.rest())
            return Reply(xid, True, stat)
        if reply_stat == C.MSG_DENIED:
            stat = u.uint()
            if stat == C.RPC_MISMATCH:
                return Reply(xid, False, stat, mismatch=(u.uint(), u.uint()))
            if stat == C.AUTH_ERROR:
                return Reply(xid, False, stat, auth_stat=u.uint())
            raise BadReply(f"reject_stat {stat}")
        raise BadReply(f"reply_stat {reply_stat}")
    except XdrError as exc:
        raise BadReply(f"truncated reply: {exc}") from None
