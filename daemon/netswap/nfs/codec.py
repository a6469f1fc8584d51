"""NFSv3 (RFC 1813) without I/O: a procedure's arguments decoded from XDR, its results
encoded to XDR. No sockets, no pool, no files: nfs3.py does the procedures, on what this
module decodes, and hands back what this module encodes.

Every length is checked before use (xdr.py): truncated or malformed arguments raise
XdrError, which the transport answers GARBAGE_ARGS. A sattr3 that asks for what the server
never does (set-user-ID bits, uid or gid 4294967295) raises NfsError while it is decoded,
before the procedure touches anything.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from typing import Optional

from ..rpc import xdr
from .exports import NFS3ERR_ACCES, NFS3ERR_INVAL, NFS3ERR_NOTSUPP, NfsError

# Procedure numbers (§3.3).
NULL, GETATTR, SETATTR, LOOKUP, ACCESS, READLINK, READ, WRITE, CREATE = range(9)
READDIR, READDIRPLUS, FSSTAT, FSINFO, PATHCONF, COMMIT = 16, 17, 18, 19, 20, 21
PROCEDURE_NAMES = {0: "null", 1: "getattr", 2: "setattr", 3: "lookup", 4: "access",
                   5: "readlink", 6: "read", 7: "write", 8: "create", 9: "mkdir",
                   10: "symlink", 11: "mknod", 12: "remove", 13: "rmdir", 14: "rename",
                   15: "link", 16: "readdir", 17: "readdirplus", 18: "fsstat", 19: "fsinfo",
                   20: "pathconf", 21: "commit"}
# Procedures not served, and how many FALSE optionals their failure body holds (RFC 1813:
# READLINK post_op_attr; MKDIR/SYMLINK/MKNOD/REMOVE/RMDIR wcc_data; RENAME two wcc_data;
# LINK post_op_attr + wcc_data).
NOT_SERVED = {5: 1, 9: 2, 10: 2, 11: 2, 12: 2, 13: 2, 14: 4, 15: 3}
# The same for the procedures served: what follows the status of a failed reply.
FAILURE_BODY = {1: 0, 2: 2, 3: 1, 4: 1, 6: 1, 7: 2, 8: 2, 16: 1, 17: 1, 18: 1, 19: 1, 20: 1,
                21: 2}

NF3REG, NF3DIR = 1, 2
UNSTABLE, DATA_SYNC, FILE_SYNC = 0, 1, 2
UNCHECKED, GUARDED, EXCLUSIVE = 0, 1, 2
ACCESS_ALL = 0x3F  # READ LOOKUP MODIFY EXTEND DELETE EXECUTE
ACCESS_DELETE, ACCESS_EXECUTE = 0x10, 0x20
NAME_MAX = 255
HANDLE_MAX = 64  # nfs_fh3 data<NFS3_FHSIZE>
# set_atime / set_mtime (time_how, §2.5): leave it, the server's clock, the time given.
DONT_CHANGE, SET_TO_SERVER_TIME, SET_TO_CLIENT_TIME = 0, 1, 2
# Statuses only these procedures give (§2.6).
NFS3ERR_NOT_SYNC, NFS3ERR_BAD_COOKIE, NFS3ERR_TOOSMALL = 10002, 10003, 10005
# FSINFO's maxfilesize: the largest off_t. Offsets and sizes are uhyper on the wire; past this
# os.pwritev and os.truncate raise OverflowError, not an OSError, so they are refused first.
MAX_FILE_SIZE = 2**63 - 1
U32_MAX = 0xFFFF_FFFF
# The first time in nanoseconds that nfstime3 (uint32 seconds) cannot hold.
_NFSTIME3_END = 2**32 * 1_000_000_000
# fattr3 (§2.5) in one pack: type, mode, nlink, uid, gid, size, used, rdev (2 words), fsid,
# fileid, atime, mtime, ctime (seconds and nanoseconds each).
_FATTR3 = struct.Struct(">5I2Q2I2Q6I")
# A READ or WRITE result is packed whole, around the fattr3 (the hot path: one pack each).
# READ: NFS3_OK, post_op_attr TRUE | count, eof, data length.
_READ_HEAD, _READ_TAIL = struct.Struct(">2I"), struct.Struct(">3I")
# WRITE: NFS3_OK, pre_op_attr FALSE, post_op_attr TRUE | count, committed, verifier.
_WRITE_HEAD, _WRITE_TAIL = struct.Struct(">3I"), struct.Struct(">2I8s")
# Their arguments after the handle: offset, count (READ); offset, count, stable (WRITE).
_READ_ARGS, _WRITE_ARGS = struct.Struct(">QI"), struct.Struct(">QII")

SERVER_TIME = "server time"


# Arguments ------------------------------------------------------------------------------

@dataclass
class Sattr3:
    """A sattr3 (§2.5): what to set, None for what to leave. Times are in nanoseconds, or
    SERVER_TIME for the server's clock at the moment they are applied."""

    mode: Optional[int] = None
    uid: Optional[int] = None
    gid: Optional[int] = None
    size: Optional[int] = None
    atime: Optional[object] = None
    mtime: Optional[object] = None


@dataclass
class HandleArgs:
    """GETATTR, FSSTAT, FSINFO, PATHCONF: the object's handle alone."""

    handle: bytes


@dataclass
class SetattrArgs:
    handle: bytes
    wanted: Sattr3
    guard: Optional[tuple[int, int]]  # sattrguard3: the ctime the client saw


@dataclass
class LookupArgs:
    handle: bytes
    name: bytes  # filename3 is unbounded (the record cap bounds it): NAME_MAX is checked later


@dataclass
class AccessArgs:
    handle: bytes
    access: int


@dataclass
class ReadArgs:
    handle: bytes
    offset: int
    count: int


@dataclass
class WriteArgs:
    handle: bytes
    offset: int
    count: int
    stable: int
    data: memoryview


@dataclass
class CreateArgs:
    handle: bytes
    name: bytes
    how: int
    wanted: Sattr3
    verifier: Optional[bytes]  # EXCLUSIVE's createverf3


@dataclass
class ReaddirArgs:
    handle: bytes
    cookie: int
    verifier: bytes
    # READDIR: count bounds the whole result (dircount == maxcount). READDIRPLUS: maxcount
    # bounds it, and dircount the entries' fileid, name and cookie alone.
    dircount: int
    maxcount: int
    plus: bool


@dataclass
class CommitArgs:
    handle: bytes
    offset: int
    count: int


def decode_arguments(proc: int, data, max_io: int):
    """The arguments of a call to the served procedure `proc`, from its XDR body (None for
    NULL); XdrError if they are malformed."""
    args = xdr.Unpacker(data)
    decoded = _DECODERS[proc](args, max_io)
    args.done()
    return decoded


def decode_handle(data) -> bytes:
    """The handle that starts every served procedure's arguments but NULL's."""
    return xdr.Unpacker(data).opaque(HANDLE_MAX)


def _null(args, max_io):
    return None


def _handle(args, max_io) -> HandleArgs:
    return HandleArgs(args.opaque(HANDLE_MAX))


def _setattr(args, max_io) -> SetattrArgs:
    handle = args.opaque(HANDLE_MAX)
    wanted = _sattr3(args)
    guard = (args.uint(), args.uint()) if args.bool() else None
    return SetattrArgs(handle, wanted, guard)


def _lookup(args, max_io) -> LookupArgs:
    return LookupArgs(args.opaque(HANDLE_MAX), args.string())


def _access(args, max_io) -> AccessArgs:
    return AccessArgs(args.opaque(HANDLE_MAX), args.uint())


def _read(args, max_io) -> ReadArgs:
    handle = args.opaque(HANDLE_MAX)
    return ReadArgs(handle, *args.unpack(_READ_ARGS))


def _write(args, max_io) -> WriteArgs:
    handle = args.opaque(HANDLE_MAX)
    offset, count, stable = args.unpack(_WRITE_ARGS)
    data = args.opaque(max_io)
    if stable not in (UNSTABLE, DATA_SYNC, FILE_SYNC) or count != len(data):
        raise xdr.XdrError(f"stable_how {stable}, count {count} for {len(data)} bytes")
    return WriteArgs(handle, offset, count, stable, data)


def _create(args, max_io) -> CreateArgs:
    handle = args.opaque(HANDLE_MAX)
    name = args.string()  # unbounded, as in LOOKUP
    how = args.uint()
    if how in (UNCHECKED, GUARDED):
        wanted, verifier = _sattr3(args), None
    elif how == EXCLUSIVE:
        wanted, verifier = Sattr3(), bytes(args.fixed_opaque(8))
    else:
        raise xdr.XdrError(f"createmode {how}")
    return CreateArgs(handle, name, how, wanted, verifier)


def _readdir(args, max_io, plus: bool = False) -> ReaddirArgs:
    handle = args.opaque(HANDLE_MAX)
    cookie = args.uhyper()
    verifier = bytes(args.fixed_opaque(8))
    dircount = args.uint()
    maxcount = args.uint() if plus else dircount
    return ReaddirArgs(handle, cookie, verifier, dircount, maxcount, plus)


def _readdirplus(args, max_io) -> ReaddirArgs:
    return _readdir(args, max_io, plus=True)


def _commit(args, max_io) -> CommitArgs:
    handle = args.opaque(HANDLE_MAX)
    return CommitArgs(handle, args.uhyper(), args.uint())


def _sattr3(args) -> Sattr3:
    wanted = Sattr3()
    if args.bool():
        wanted.mode = args.uint() & 0o7777
        if wanted.mode & (stat.S_ISUID | stat.S_ISGID):
            # The daemon is root and makes the scratch files: honoured, this is a root-owned
            # set-user-ID program on the server, from any client that reaches the export.
            raise NfsError(NFS3ERR_ACCES, "set-user-ID and set-group-ID bits are not set here")
    if args.bool():
        wanted.uid = args.uint()
    if args.bool():
        wanted.gid = args.uint()
    if args.bool():
        wanted.size = args.uhyper()
    if U32_MAX in (wanted.uid, wanted.gid):
        # (uid_t)-1 means "leave it" to chown(2): an OK reply would claim a change not made.
        # Refused here, before a SETATTR truncates or a CREATE makes anything.
        raise NfsError(NFS3ERR_INVAL, "uid or gid 4294967295")
    times = []
    for _ in range(2):  # atime, mtime
        how = args.uint()
        if how == SET_TO_CLIENT_TIME:
            seconds, nanoseconds = args.uint(), args.uint()
            if nanoseconds >= 1_000_000_000:
                raise xdr.XdrError(f"nseconds {nanoseconds}")
            times.append(seconds * 1_000_000_000 + nanoseconds)
        elif how == SET_TO_SERVER_TIME:
            times.append(SERVER_TIME)
        elif how == DONT_CHANGE:
            times.append(None)
        else:
            raise xdr.XdrError(f"time_how {how}")
    wanted.atime, wanted.mtime = times
    return wanted


_DECODERS = {NULL: _null, GETATTR: _handle, SETATTR: _setattr, LOOKUP: _lookup,
             ACCESS: _access, READ: _read, WRITE: _write, CREATE: _create,
             READDIR: _readdir, READDIRPLUS: _readdirplus, FSSTAT: _handle, FSINFO: _handle,
             PATHCONF: _handle, COMMIT: _commit}


# Results --------------------------------------------------------------------------------

def fattr3(st, fsid: int, is_swap_file: bool) -> tuple:
    """fattr3's fields from a stat result. A swap file reports used >= size: swapon refuses
    files with holes."""
    used = st.st_blocks * 512
    if is_swap_file:
        used = max(used, st.st_size)
    atime, mtime, ctime = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    if not (0 <= min(atime, mtime, ctime) and max(atime, mtime, ctime) < _NFSTIME3_END):
        # nfstime3 seconds are a uint32 (1970 to 2106): a file dated outside (by the
        # server's side) shows the nearest time there is, rather than failing every
        # call that returns its attributes.
        atime, mtime, ctime = (min(max(t, 0), _NFSTIME3_END - 1)
                               for t in (atime, mtime, ctime))
    return (NF3DIR if stat.S_ISDIR(st.st_mode) else NF3REG, st.st_mode & 0o7777,
            st.st_nlink, st.st_uid, st.st_gid, st.st_size, used,
            0, 0,  # rdev
            fsid,  # one per export, constant
            st.st_ino,
            atime // 1_000_000_000, atime % 1_000_000_000,
            mtime // 1_000_000_000, mtime % 1_000_000_000,
            ctime // 1_000_000_000, ctime % 1_000_000_000)


def pack_fattr3(packer: xdr.Packer, fields: tuple) -> None:
    packer.pack(_FATTR3, *fields)


def status_only(status: int, falses: int = 1) -> bytes:
    """A status and `falses` absent optionals: a failure body, or NOTSUPP's."""
    packer = xdr.Packer()
    packer.uint(status)
    for _ in range(falses):
        packer.bool(False)
    return packer.bytes()


def failure(proc: int, status: int) -> bytes:
    """The failed result of served procedure `proc`: its status, then its failure body."""
    return status_only(status, FAILURE_BODY[proc])


def not_served(proc: int) -> bytes:
    """NFS3ERR_NOTSUPP with the failure body the procedure's result type defines, so a
    client decodes a well-formed answer."""
    return status_only(NFS3ERR_NOTSUPP, NOT_SERVED[proc])


def read_result(fields: tuple, got: int, eof: bool) -> bytes:
    """A successful READ's result up to its data (which follows, then its padding)."""
    try:
        return _READ_HEAD.pack(0, 1) + _FATTR3.pack(*fields) + _READ_TAIL.pack(got, eof, got)
    except struct.error as exc:  # a value out of its XDR type's range: a bug of ours
        raise ValueError(f"READ attributes do not fit fattr3: {exc}") from None


def write_result(fields: tuple, count: int, committed: int, verifier: bytes) -> bytes:
    try:
        return (_WRITE_HEAD.pack(0, 0, 1) + _FATTR3.pack(*fields)
                + _WRITE_TAIL.pack(count, committed, verifier))
    except struct.error as exc:
        raise ValueError(f"WRITE attributes do not fit fattr3: {exc}") from None
