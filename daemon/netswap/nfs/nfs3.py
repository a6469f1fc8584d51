"""NFSv3 (RFC 1813), program 100003 version 3: the procedures a Linux client needs to
swapon a file on the mount, and libnfs's nfs-ls / nfs-cat / nfs-cp need for the rest.

Each procedure unpacks its arguments (xdr.py: every length checked before use; truncated or
malformed arguments are GARBAGE_ARGS), asks exports.py what the handle names for this
caller, does the I/O on pool buffers, and packs the result. Procedures this server does not
do (REMOVE, RENAME, MKDIR, ...) get NFS3ERR_NOTSUPP with the failure body their result type
defines, so a client decodes a well-formed answer.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Optional

from ..rpc import constants as RC
from ..rpc import message as rpc
from ..rpc import xdr
from ..refusals import RefusalLog
from .exports import (
    NFS3_OK, NFS3ERR_ACCES, NFS3ERR_EXIST, NFS3ERR_FBIG, NFS3ERR_INVAL, NFS3ERR_IO,
    NFS3ERR_ISDIR, NFS3ERR_JUKEBOX, NFS3ERR_NAMETOOLONG, NFS3ERR_NOENT, NFS3ERR_NOSPC,
    NFS3ERR_NOTDIR, NFS3ERR_NOTSUPP, NFS3ERR_ROFS, SWAP_EXPORT, NfsError, Node,
)

log = logging.getLogger("netswap.nfs")

PROGRAM, VERSION = 100003, 3
NF3REG, NF3DIR = 1, 2
UNSTABLE, DATA_SYNC, FILE_SYNC = 0, 1, 2
UNCHECKED, GUARDED, EXCLUSIVE = 0, 1, 2
ACCESS_ALL = 0x3F  # READ LOOKUP MODIFY EXTEND DELETE EXECUTE
ACCESS_DELETE, ACCESS_EXECUTE = 0x10, 0x20
NAME_MAX = 255
# set_atime / set_mtime (time_how, §2.5): leave it, the server's clock, the time given.
DONT_CHANGE, SET_TO_SERVER_TIME, SET_TO_CLIENT_TIME = 0, 1, 2
# Statuses only these procedures give (§2.6).
NFS3ERR_NOT_SYNC, NFS3ERR_BAD_COOKIE, NFS3ERR_TOOSMALL = 10002, 10003, 10005
# EXCLUSIVE CREATE keeps the client's verifier in the new file's atime and mtime seconds
# (§3.3.8), 31 bits each so that every file system stores them unchanged (a 32-bit signed
# time_t file system would turn 2**31 and up negative, or clamp them).
_VERIFIER_SECONDS = 0x7FFF_FFFF
# FSINFO's maxfilesize: the largest off_t. Offsets and sizes are uhyper on the wire; past this
# os.pwritev and os.truncate raise OverflowError, not an OSError, so they are refused first.
MAX_FILE_SIZE = 2**63 - 1
PROCEDURE_NAMES = {0: "null", 1: "getattr", 2: "setattr", 3: "lookup", 4: "access",
                   5: "readlink", 6: "read", 7: "write", 8: "create", 9: "mkdir",
                   10: "symlink", 11: "mknod", 12: "remove", 13: "rmdir", 14: "rename",
                   15: "link", 16: "readdir", 17: "readdirplus", 18: "fsstat", 19: "fsinfo",
                   20: "pathconf", 21: "commit"}
# Procedures not served, and how many FALSE optionals their failure body holds (RFC 1813:
# READLINK post_op_attr; MKDIR/SYMLINK/MKNOD/REMOVE/RMDIR wcc_data; RENAME two wcc_data;
# LINK post_op_attr + wcc_data).
_NOT_SERVED = {5: 1, 9: 2, 10: 2, 11: 2, 12: 2, 13: 2, 14: 4, 15: 3}
# The same for the procedures served: what follows the status of a failed reply.
_FAILURE_BODY = {1: 0, 2: 2, 3: 1, 4: 1, 6: 1, 7: 2, 8: 2, 16: 1, 17: 1, 18: 1, 19: 1, 20: 1,
                 21: 2}
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


class Nfs3Program:
    version = VERSION

    def __init__(self, exports, pool, counters, max_io: int, swap_nodes=None) -> None:
        self.exports = exports
        self._refusals = RefusalLog(log)  # bad calls in a loop must not flood the log
        self.swap_nodes = swap_nodes  # attaches a node's reserve on its swap-file I/O
        self.pool = pool
        self.counters = counters
        self.max_io = max_io
        # Changes with every start: a client holding UNSTABLE writes then sees a new
        # verifier at COMMIT and sends them again (§3.3.7).
        self.verifier = time.time_ns().to_bytes(8, "big")
        # READDIR cookies are a keyed hash of the entry's name (see _readdir); the key comes
        # from the handle key, so cookies, like handles, mean the same after a restart.
        self._cookie_key = exports.key.mac(b"readdir cookie key")
        # An EXCLUSIVE CREATE and its retransmission may run on two workers at once: the
        # one that makes the file stamps the verifier before the other looks at it.
        self._exclusive_create = threading.Lock()
        self._procedures = {0: self._null, 1: self._getattr, 2: self._setattr, 3: self._lookup,
                            4: self._access, 6: self._read, 7: self._write, 8: self._create,
                            16: self._readdir, 17: self._readdirplus, 18: self._fsstat,
                            19: self._fsinfo, 20: self._pathconf, 21: self._commit}

    @staticmethod
    def procedure_name(call) -> str:
        return PROCEDURE_NAMES.get(call.proc, "unknown")

    def call(self, call, peer: str, release: list, emergency: bool = False):
        name = PROCEDURE_NAMES.get(call.proc, "unknown")
        self.counters.inc("nfs_calls", name)
        if emergency and call.proc in _FAILURE_BODY and not self._for_swap(call, peer):
            # The drop rule (the seed's part 2): this record was received into the reserve,
            # but what it asks for is not the node's swap file. It is not executed; JUKEBOX
            # makes the client retry later, when normal memory is back.
            self.counters.inc("emergency_dropped", "nfs")
            self._refusals.log("jukebox", logging.INFO, "nfs %s: %s call received into the "
                               "reserve for a non-swap object: answered JUKEBOX", peer, name)
            return [rpc.accepted(call.xid), *self._status_only(NFS3ERR_JUKEBOX,
                                                               _FAILURE_BODY[call.proc])]
        if call.proc in _NOT_SERVED:
            packer = xdr.Packer()
            packer.uint(NFS3ERR_NOTSUPP)
            for _ in range(_NOT_SERVED[call.proc]):
                packer.bool(False)
            return [rpc.accepted(call.xid), packer.bytes()]
        procedure = self._procedures.get(call.proc)
        if procedure is None:
            self.counters.inc("rpc_protocol_errors", "proc_unavail")
            return [rpc.accepted(call.xid, RC.PROC_UNAVAIL)]
        # Arguments it cannot decode raise XdrError: the transport answers GARBAGE_ARGS.
        args = xdr.Unpacker(call.args)
        try:
            return [rpc.accepted(call.xid), *procedure(args, peer, release)]
        except NfsError as exc:
            # A failed procedure: its status, then its result type's failure body.
            self.counters.inc("nfs_errors", str(exc.status))
            return [rpc.accepted(call.xid),
                    *self._status_only(exc.status, _FAILURE_BODY[call.proc])]

    def _for_swap(self, call, peer: str) -> bool:
        """Does the call's object belong to the swap export (the node's swap file, or the
        export's directory swapon looks it up in)? Unreadable handles are not swap."""
        try:
            handle = xdr.Unpacker(call.args).opaque(64)
            return self.exports.resolve(handle, peer).export_id == SWAP_EXPORT
        except (xdr.XdrError, NfsError):
            return False

    # Helpers ------------------------------------------------------------------------

    def _attributes(self, packer, node: Node, st=None) -> None:
        """fattr3 (§2.5), of `st` if given (a stat made during this call), else of the
        node's file now (a swap file through its open descriptor)."""
        if st is None:
            st = os.fstat(node.fd) if node.fd is not None else os.stat(node.path)
        packer.pack(_FATTR3, *self._fattr3(node, st))

    @staticmethod
    def _fattr3(node: Node, st) -> tuple:
        """fattr3's fields. A swap file reports used >= size: swapon refuses files with
        holes."""
        used = st.st_blocks * 512
        if node.is_swap_file:
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
                node.export_id,  # fsid: one per export, constant
                st.st_ino,
                atime // 1_000_000_000, atime % 1_000_000_000,
                mtime // 1_000_000_000, mtime % 1_000_000_000,
                ctime // 1_000_000_000, ctime % 1_000_000_000)

    def _object(self, args, peer: str) -> Node:
        """The object of a call whose only argument is its handle."""
        handle = args.opaque(64)
        args.done()
        return self.exports.resolve(handle, peer)

    def _swap_activity(self, node: Node) -> None:
        """A swap-file call: the node's reserve is attached (again), its idle clock reset."""
        if self.swap_nodes is not None:
            self.swap_nodes.swap_activity(node.swap_owner)

    def _swap_read_loan(self, node: Node, release: list):
        """For a swap-file READ: swap activity, and a loan of the node's reserve for the
        data buffer, put on `release` (None for other files, or a node whose attach was
        refused)."""
        if not node.is_swap_file or self.swap_nodes is None:
            return None
        self.swap_nodes.swap_activity(node.swap_owner)
        loan = self.swap_nodes.borrow_reserve(node.swap_owner)
        if loan is not None:
            release.append(loan)
        return loan

    def _ok(self, node, st=None) -> xdr.Packer:
        """A result that starts with NFS3_OK and the object's post_op_attr (of `st`, a stat
        made during this call, if given)."""
        packer = xdr.Packer()
        packer.uint(NFS3_OK)
        self._post_op(packer, node, st)
        return packer

    def _post_op(self, packer, node, st=None) -> None:
        if node is None:
            packer.bool(False)
            return
        packer.bool(True)
        self._attributes(packer, node, st)

    def _wcc(self, packer, node) -> None:
        packer.bool(False)  # no pre-operation attributes: allowed, and never stale
        self._post_op(packer, node)

    def _status_only(self, status: int, falses: int = 1) -> list:
        packer = xdr.Packer()
        packer.uint(status)
        for _ in range(falses):
            packer.bool(False)
        return [packer.bytes()]

    # Procedures ---------------------------------------------------------------------

    def _null(self, args, peer, release):
        args.done()
        return []

    def _getattr(self, args, peer, release):
        node = self._object(args, peer)
        packer = xdr.Packer()
        packer.uint(NFS3_OK)
        self._attributes(packer, node, node.st)
        return [packer.bytes()]

    def _setattr(self, args, peer, release):
        handle = args.opaque(64)
        wanted = _unpack_sattr3(args)
        guard = (args.uint(), args.uint()) if args.bool() else None  # sattrguard3: ctime
        args.done()
        try:
            node = self.exports.resolve(handle, peer)
            if node.is_swap_file:
                # Setting the size it has and nothing else (nfs-cp's O_TRUNC of nothing)
                # changes nothing and is answered OK; anything more must not be answered OK
                # while the mode or owner asked for is silently not applied.
                if (wanted.mode is not None or wanted.uid is not None or wanted.gid is not None
                        or wanted.size not in (None, os.stat(node.path).st_size)):
                    raise NfsError(NFS3ERR_ACCES, "a swap file's size, mode and owner are fixed")
                wanted.size = None  # the size it has: nothing to do
            elif node.is_dir:
                if wanted.size is not None:
                    raise NfsError(NFS3ERR_ISDIR)
                if wanted.mode is not None or wanted.uid is not None or wanted.gid is not None:
                    # An export's directory is the server's (the swap one holds every node's
                    # file): a client may touch its times, not open it up or give it away.
                    raise NfsError(NFS3ERR_ACCES, "an export directory's mode and owner are fixed")
            elif wanted.size is not None and wanted.size > MAX_FILE_SIZE:
                raise NfsError(NFS3ERR_FBIG, f"size {wanted.size} over the largest file")
            if guard is not None:
                # §3.3.2: apply only if the object's ctime is still the one the client saw.
                # Checked just before applying, not atomically with it: NFSv3 offers no lock
                # to take, and a change that lands in between is one the guard could not
                # have seen either.
                ctime = os.stat(node.path).st_ctime_ns
                if divmod(ctime, 1_000_000_000) != guard:
                    raise NfsError(NFS3ERR_NOT_SYNC, "ctime guard does not match")
            _apply_sattr3(node.path, wanted)
        except OSError as exc:
            raise _from_os(exc) from exc
        packer = xdr.Packer()
        packer.uint(NFS3_OK)
        self._wcc(packer, node)
        return [packer.bytes()]

    def _lookup(self, args, peer, release):
        handle = args.opaque(64)
        # filename3 is an unbounded string (the record cap bounds it): a longer name than
        # we take is NFS3ERR_NAMETOOLONG below, not a malformed call.
        name = args.string()
        args.done()
        directory = self.exports.resolve(handle, peer)
        try:
            if len(name) > NAME_MAX:
                raise NfsError(NFS3ERR_NAMETOOLONG)
            found = self.exports.lookup(directory, os.fsdecode(name), peer)
        except NfsError as exc:
            packer = xdr.Packer()
            packer.uint(exc.status)
            self._post_op(packer, directory)
            return [packer.bytes()]
        except OSError as exc:
            raise _from_os(exc) from exc
        packer = xdr.Packer()
        packer.uint(NFS3_OK)
        packer.opaque(self.exports.handle_for(found))
        self._post_op(packer, found)
        self._post_op(packer, directory)
        return [packer.bytes()]

    def _access(self, args, peer, release):
        handle = args.opaque(64)
        wanted = args.uint()
        args.done()
        node = self.exports.resolve(handle, peer)
        granted = ACCESS_ALL
        if node.is_swap_file:
            granted &= ~(ACCESS_DELETE | ACCESS_EXECUTE)
        packer = self._ok(node, node.st)
        packer.uint(wanted & granted)  # exactly the asked-for bits that are granted
        return [packer.bytes()]

    def _read(self, args, peer, release):
        handle = args.opaque(64)
        offset, count = args.unpack(_READ_ARGS)
        args.done()
        node = self.exports.resolve(handle, peer)
        if node.is_dir:
            raise NfsError(NFS3ERR_ISDIR)
        loan = self._swap_read_loan(node, release)
        count = min(count, self.max_io)
        fd = node.fd
        try:
            if fd is None:
                fd = os.open(node.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # The attributes in the reply are the ones the read was sized by: resolve's
                # check of a scratch file, made during this call, or an fstat.
                st = node.st if node.st is not None else os.fstat(fd)
                size = st.st_size
                count = max(0, min(count, size - offset)) if offset < size else 0
                got = 0
                if count:
                    # A swap-in may need the node's reserve when normal memory is gone (the
                    # READ answers a page fault); everything else waits for normal memory.
                    buffer = (self.pool.alloc(count, timeout=None) if loan is None else
                              self.pool.alloc(count, timeout=None, emergency=True,
                                              group=loan.group))
                    release.insert(0, buffer)  # before the loan that keeps its group attached
                    got = os.preadv(fd, [buffer.view], offset)
            finally:
                if node.fd is None:
                    os.close(fd)
        except OSError as exc:
            raise _from_os(exc) from exc
        try:
            head = _READ_HEAD.pack(NFS3_OK, 1) + _FATTR3.pack(*self._fattr3(node, st))
        except struct.error as exc:  # a value out of its XDR type's range: a bug of ours
            raise ValueError(f"READ attributes do not fit fattr3: {exc}") from None
        parts = [head + _READ_TAIL.pack(got, offset + got >= size, got)]
        self.counters.inc("nfs_bytes", "read", got)
        if got:
            parts.append(buffer.view[:got])  # the bytes go out from the pool buffer
            if got % 4:
                parts.append(bytes(4 - got % 4))
        return parts

    def _write(self, args, peer, release):
        handle = args.opaque(64)
        offset, count, stable = args.unpack(_WRITE_ARGS)
        data = args.opaque(self.max_io)
        args.done()
        if stable not in (UNSTABLE, DATA_SYNC, FILE_SYNC) or count != len(data):
            raise xdr.XdrError(f"stable_how {stable}, count {count} for {len(data)} bytes")
        try:
            node = self.exports.resolve(handle, peer)
            if node.is_dir:
                raise NfsError(NFS3ERR_ISDIR)
            if node.is_swap_file:
                self._swap_activity(node)
                # A swap file is the swap export's size, always (swapfiles.py).
                if offset + count > self.exports.swap.size:
                    raise NfsError(NFS3ERR_NOSPC, "past the end of a swap file (it never grows)")
            if offset + count > MAX_FILE_SIZE:
                raise NfsError(NFS3ERR_FBIG, "write ends past the largest file")
            # What the client asked for, on swap files too: the kernel's swap path asks
            # FILE_SYNC (it cannot keep pages around for a later COMMIT), and gets a write
            # made durable before the reply; a client that asks UNSTABLE keeps its data
            # until a COMMIT whose verifier matches (it changes when we restart), as RFC
            # 1813 §3.3.7 has it. Syncing every UNSTABLE write anyway only cost it time.
            committed = stable
            st = self._pwrite(node, data, offset, sync=committed != UNSTABLE)
        except OSError as exc:
            raise _from_os(exc) from exc
        self.counters.inc("nfs_bytes", "write", count)
        try:
            return [_WRITE_HEAD.pack(NFS3_OK, 0, 1) + _FATTR3.pack(*self._fattr3(node, st))
                    + _WRITE_TAIL.pack(count, committed, self.verifier)]
        except struct.error as exc:
            raise ValueError(f"WRITE attributes do not fit fattr3: {exc}") from None

    def _pwrite(self, node: Node, data, offset: int, sync: bool) -> os.stat_result:
        """Write `data` at `offset`; return the file's attributes after the write."""
        fd = node.fd if node.fd is not None else os.open(node.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            done = 0
            while done < len(data):
                done += os.pwritev(fd, [data[done:]], offset + done)
            if sync:
                os.fdatasync(fd)
            return os.fstat(fd)
        finally:
            if node.fd is None:
                os.close(fd)

    def _create(self, args, peer, release):
        handle = args.opaque(64)
        name = args.string()  # unbounded, as in LOOKUP
        how = args.uint()
        if how in (UNCHECKED, GUARDED):
            wanted, verifier = _unpack_sattr3(args), None
        elif how == EXCLUSIVE:
            wanted, verifier = Sattr3(), bytes(args.fixed_opaque(8))
        else:
            raise xdr.XdrError(f"createmode {how}")
        args.done()
        try:
            directory = self.exports.resolve(handle, peer)
            if directory.export_id == SWAP_EXPORT:
                raise NfsError(NFS3ERR_ACCES, "swap files are made by the server")
            if not directory.is_dir:
                raise NfsError(NFS3ERR_NOTDIR)
            # The name's own bytes (undecodable ones as surrogate escapes), as READDIR lists
            # them: "replace" would make two names one file, and a listed one unfindable.
            text = os.fsdecode(name)
            if len(name) > NAME_MAX:
                raise NfsError(NFS3ERR_NAMETOOLONG)
            if not text or "/" in text or text in (".", "..") or "\0" in text:
                raise NfsError(NFS3ERR_INVAL, "bad name")
            if wanted.size is not None and wanted.size > MAX_FILE_SIZE:
                raise NfsError(NFS3ERR_FBIG, f"size {wanted.size} over the largest file")
            path = directory.path / text
            if how == EXCLUSIVE:
                with self._exclusive_create:
                    self._create_exclusive(path, verifier)
            elif self._create_file(path, 0o644 if wanted.mode is None else wanted.mode,
                                   exclusive=how == GUARDED):
                _apply_sattr3(path, wanted)  # the attributes a new file starts with
            elif wanted.size is not None:
                # UNCHECKED on an existing file: like open(O_CREAT | O_TRUNC), only the size
                # is applied; the other attributes are for a file being made (as knfsd does).
                # Looked up first: only a plain file of the export is truncated.
                _apply_sattr3(self.exports.lookup(directory, text, peer).path,
                              Sattr3(size=wanted.size))
            created = self.exports.lookup(directory, text, peer)
        except OSError as exc:
            raise _from_os(exc) from exc
        packer = xdr.Packer()
        packer.uint(NFS3_OK)
        packer.bool(True)
        packer.opaque(self.exports.handle_for(created))
        self._post_op(packer, created)
        self._wcc(packer, directory)
        return [packer.bytes()]

    @staticmethod
    def _create_file(path, mode: int, exclusive: bool) -> bool:
        """Create the regular file at `path`; True if it is new, False if it was there
        (GUARDED: NFS3ERR_EXIST instead)."""
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            os.close(os.open(path, flags, mode))
            return True
        except FileExistsError:
            if exclusive:
                raise NfsError(NFS3ERR_EXIST) from None
            return False

    def _create_exclusive(self, path, verifier: bytes) -> None:
        """EXCLUSIVE (§3.3.8): a new file stamped with the client's verifier; an existing
        file is this create's own if it carries the same verifier (the reply was lost and
        the call retransmitted), and NFS3ERR_EXIST otherwise. The client replaces the
        stamped times with a SETATTR once it has the file."""
        stamp = (int.from_bytes(verifier[:4], "big") & _VERIFIER_SECONDS,
                 int.from_bytes(verifier[4:], "big") & _VERIFIER_SECONDS)
        if self._create_file(path, 0o644, exclusive=False):
            os.utime(path, ns=tuple(seconds * 1_000_000_000 for seconds in stamp))
            return
        st = os.lstat(path)
        if not (stat.S_ISREG(st.st_mode) and (st.st_atime_ns // 1_000_000_000,
                                              st.st_mtime_ns // 1_000_000_000) == stamp):
            raise NfsError(NFS3ERR_EXIST, "exists, made by another create")

    def _readdir(self, args, peer, release, plus: bool = False):
        """READDIR (§3.3.16) and READDIRPLUS (§3.3.17), a page at a time.

        A cookie is a keyed hash of the entry's name, and a directory is listed in cookie
        order: the page after cookie c holds the entries whose cookie is above c. So a cookie
        stays valid while files come and go between pages (an entry there all along is
        listed exactly once), and across our restarts (the key is the handle key's). The
        cookie verifier names that scheme for the export; another gets NFS3ERR_BAD_COOKIE.
        """
        handle = args.opaque(64)
        cookie = args.uhyper()
        verifier = bytes(args.fixed_opaque(8))
        # READDIR: count bounds the whole result. READDIRPLUS: maxcount bounds it, and
        # dircount the entries' fileid, name and cookie alone.
        dircount = args.uint()
        maxcount = args.uint() if plus else dircount
        args.done()
        directory = self.exports.resolve(handle, peer)
        if not directory.is_dir:
            raise NfsError(NFS3ERR_NOTDIR)
        cookieverf = self._cookie_verifier(directory)
        # Zeros are what a client sends with cookie 0, and what it holds after dropping its
        # cache; our cookies do not expire, so they are taken with any cookie.
        if cookie and verifier not in (cookieverf, bytes(8)):
            raise NfsError(NFS3ERR_BAD_COOKIE, "cookie verifier of another listing")
        pending = sorted((entry_cookie, name, node)
                         for name, node in self.exports.listing(directory, peer)
                         if (entry_cookie := self._cookie_of(name)) > cookie)
        packer = self._ok(directory)
        packer.fixed_opaque(cookieverf)
        room = min(maxcount, self.max_io) - len(packer) - 8  # the list's end and eof follow
        dir_room = dircount
        page: list[tuple[int, bytes]] = []
        eof = True
        for entry_cookie, name, node in pending:
            try:
                entry, dir_size = self._dir_entry(name, node, entry_cookie, plus)
            except FileNotFoundError:
                continue  # removed since the listing was read
            if len(entry) > room or (plus and dir_size > dir_room):
                eof = False
                # Two names of one cookie (a hash collision) go on the same page: a page
                # ending between them would make the next one skip the second.
                while page and page[-1][0] == entry_cookie:
                    page.pop()
                break
            page.append((entry_cookie, entry))
            room -= len(entry)
            dir_room -= dir_size
        if not page and (not eof or room < 0):
            raise NfsError(NFS3ERR_TOOSMALL, f"not one entry fits in {maxcount} bytes")
        parts = [packer.bytes(), *(entry for _, entry in page)]
        tail = xdr.Packer()
        tail.bool(False)  # no more entries on this page
        tail.bool(eof)
        parts.append(tail.bytes())
        return [b"".join(parts)]

    def _dir_entry(self, name: str, node: Node, cookie: int, plus: bool) -> tuple[bytes, int]:
        """An entry3 (or entryplus3) with the TRUE that leads it, and how many of its bytes
        count against READDIRPLUS's dircount (all but the attributes and the handle)."""
        packer = xdr.Packer()
        packer.bool(True)
        packer.uhyper(os.stat(node.path).st_ino)
        packer.string(os.fsencode(name))
        packer.uhyper(cookie)
        dir_size = len(packer)
        if plus:
            self._post_op(packer, node)
            packer.bool(True)
            packer.opaque(self.exports.handle_for(node))
        return packer.bytes(), dir_size

    def _cookie_of(self, name: str) -> int:
        digest = hashlib.blake2b(os.fsencode(name), digest_size=8, key=self._cookie_key).digest()
        # 63 bits (some clients keep cookies in a signed offset), never 0 (the start).
        return int.from_bytes(digest, "big") >> 1 or 1

    def _cookie_verifier(self, directory: Node) -> bytes:
        return hashlib.blake2b(f"{directory.export_id}".encode(), digest_size=8,
                               key=self._cookie_key, person=b"cookieverf").digest()

    def _readdirplus(self, args, peer, release):
        return self._readdir(args, peer, release, plus=True)

    def _fsstat(self, args, peer, release):
        node = self._object(args, peer)
        fs = os.statvfs(node.path)
        packer = self._ok(node)
        for value in (fs.f_blocks * fs.f_frsize, fs.f_bfree * fs.f_frsize,
                      fs.f_bavail * fs.f_frsize, fs.f_files, fs.f_ffree, fs.f_favail):
            packer.uhyper(value)
        packer.uint(0)  # invarsec
        return [packer.bytes()]

    def _fsinfo(self, args, peer, release):
        node = self._object(args, peer)
        packer = self._ok(node)
        for value in (self.max_io, self.max_io, 4096,  # rtmax, rtpref, rtmult
                      self.max_io, self.max_io, 4096,  # wtmax, wtpref, wtmult
                      64 * 1024):  # dtpref
            packer.uint(value)
        packer.uhyper(MAX_FILE_SIZE)
        packer.uint(0)
        packer.uint(1)  # time_delta: nanoseconds
        packer.uint(0x18)  # FSF3_HOMOGENEOUS | FSF3_CANSETTIME
        return [packer.bytes()]

    def _pathconf(self, args, peer, release):
        node = self._object(args, peer)
        packer = self._ok(node)
        packer.uint(1)  # linkmax
        packer.uint(NAME_MAX)
        for flag in (True, True, False, True):  # no_trunc, chown_restricted, case-ins., -pres.
            packer.bool(flag)
        return [packer.bytes()]

    def _commit(self, args, peer, release):
        handle = args.opaque(64)
        args.uhyper()
        args.uint()  # offset, count: the whole file is made durable
        args.done()
        try:
            node = self.exports.resolve(handle, peer)
            if node.is_dir:
                raise NfsError(NFS3ERR_ISDIR)
            if node.is_swap_file:
                self._swap_activity(node)
            fd = node.fd if node.fd is not None else os.open(node.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                if node.fd is None:
                    os.close(fd)
        except OSError as exc:
            raise _from_os(exc) from exc
        packer = xdr.Packer()
        packer.uint(NFS3_OK)
        self._wcc(packer, node)
        packer.fixed_opaque(self.verifier)
        return [packer.bytes()]


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


SERVER_TIME = "server time"
U32_MAX = 0xFFFF_FFFF


def _unpack_sattr3(args) -> Sattr3:
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


def _apply_sattr3(path, wanted: Sattr3) -> None:
    """Set what `wanted` asks for on the file at `path` (a regular file or a directory,
    never a symlink: the exports hold none, and we would not follow one)."""
    if wanted.size is not None:
        os.truncate(path, wanted.size)
    if wanted.uid is not None or wanted.gid is not None:
        # Before the mode: chown clears set-user/group-ID bits the mode may ask for.
        os.chown(path, -1 if wanted.uid is None else wanted.uid,
                 -1 if wanted.gid is None else wanted.gid, follow_symlinks=False)
    if wanted.mode is not None:
        os.chmod(path, wanted.mode)
    # Times last: a truncate moves mtime, and the client asked for the mtime it gave.
    if wanted.atime == SERVER_TIME and wanted.mtime == SERVER_TIME:
        os.utime(path)
    elif wanted.atime is not None or wanted.mtime is not None:
        # os.utime sets both; the one not asked for keeps its value (read just before).
        st = os.stat(path)
        now = time.time_ns()
        atime = st.st_atime_ns if wanted.atime is None else wanted.atime
        mtime = st.st_mtime_ns if wanted.mtime is None else wanted.mtime
        os.utime(path, ns=(now if atime == SERVER_TIME else atime,
                           now if mtime == SERVER_TIME else mtime))


def _from_os(exc: OSError) -> NfsError:
    status = {errno.ENOSPC: NFS3ERR_NOSPC, errno.EDQUOT: NFS3ERR_NOSPC, errno.EFBIG: NFS3ERR_FBIG,
              errno.EINVAL: NFS3ERR_INVAL, errno.EACCES: NFS3ERR_ACCES,
              errno.EPERM: NFS3ERR_ACCES, errno.EROFS: NFS3ERR_ROFS,
              errno.ENOENT: NFS3ERR_NOENT}.get(exc.errno, NFS3ERR_IO)
    return NfsError(status, str(exc))
