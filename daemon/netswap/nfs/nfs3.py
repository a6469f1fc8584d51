"""NFSv3 (RFC 1813), the procedures: what a Linux client needs to swapon a file on the
mount, and libnfs's nfs-ls / nfs-cat / nfs-cp need for the rest.

A call's arguments are decoded by codec.py (no I/O there); each procedure asks exports.py
what the handle names for this caller, does the file I/O on pool buffers, and hands back
results codec.py encodes. Procedures this server does not do (REMOVE, RENAME, MKDIR, ...)
get NFS3ERR_NOTSUPP with the failure body their result type defines, so a client decodes a
well-formed answer.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
import time

from ..counters import declare
from ..refusals import RefusalLog
from ..reserve.tree import EMERGENCY_DROPPED, POOL_WAITS
from ..rpc import constants as RC
from ..rpc import message as rpc
from ..rpc import xdr
from ..rpc.message import RPC_PROTOCOL_ERRORS
from ..transport.backpressure import wait_for_buffer
from . import codec
from .codec import (
    ACCESS_ALL, ACCESS_DELETE, ACCESS_EXECUTE, EXCLUSIVE, GUARDED, MAX_FILE_SIZE, NAME_MAX,
    NFS3ERR_BAD_COOKIE, NFS3ERR_NOT_SYNC, NFS3ERR_TOOSMALL, PROCEDURE_NAMES, SERVER_TIME, UNSTABLE,
    Sattr3,
)
from .exports import (
    NFS3_OK, NFS3ERR_ACCES, NFS3ERR_EXIST, NFS3ERR_FBIG, NFS3ERR_INVAL, NFS3ERR_IO, NFS3ERR_ISDIR,
    NFS3ERR_JUKEBOX, NFS3ERR_NAMETOOLONG, NFS3ERR_NOENT, NFS3ERR_NOSPC, NFS3ERR_NOTDIR,
    NFS3ERR_ROFS, NFS3ERR_STALE, SWAP_EXPORT, NfsError, Node,
)

NFS_CALLS = declare(
    "nfs", "nfs_calls", "netswap_nfs_calls_total",
    "NFSv3 calls, by procedure.",
    label="procedure")
NFS_BYTES = declare(
    "nfs", "nfs_bytes", "netswap_nfs_bytes_total",
    "Payload bytes of NFS READs and WRITEs that succeeded, by procedure.",
    label="procedure")
NFS_ERRORS = declare(
    "nfs", "nfs_errors", "netswap_nfs_errors_total",
    "NFSv3 calls answered with an NFS3ERR status, by status number.",
    label="status")

log = logging.getLogger("netswap.nfs")

PROGRAM, VERSION = RC.PROG_NFS, RC.NFS_VERSION
# EXCLUSIVE CREATE keeps the client's verifier in the new file's atime and mtime seconds
# (§3.3.8), 31 bits each so that every file system stores them unchanged (a 32-bit signed
# time_t file system would turn 2**31 and up negative, or clamp them).
_VERIFIER_SECONDS = 0x7FFF_FFFF


def _never() -> bool:
    return False


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
                            16: self._readdir, 17: self._readdir, 18: self._fsstat,
                            19: self._fsinfo, 20: self._pathconf, 21: self._commit}

    @staticmethod
    def procedure_name(call) -> str:
        return PROCEDURE_NAMES.get(call.proc, "unknown")

    def call(self, call, peer: str, release: list, emergency: bool = False,
             stopped=_never):
        """The reply's parts for `call` from `peer`. `stopped()` says when to give up a wait
        for pool memory (the caller's connection closed, or the daemon stops)."""
        name = PROCEDURE_NAMES.get(call.proc, "unknown")
        self.counters.inc(NFS_CALLS, name)
        if emergency and call.proc in codec.FAILURE_BODY and not self._for_swap(call, peer):
            # The drop rule (the seed's part 2): this record was received into the reserve,
            # but what it asks for is not the node's swap file. It is not executed; JUKEBOX
            # makes the client retry later, when normal memory is back.
            self.counters.inc(EMERGENCY_DROPPED, "nfs")
            self._refusals.log("jukebox", logging.INFO, "nfs %s: %s call received into the "
                               "reserve for a non-swap object: answered JUKEBOX", peer, name)
            return [rpc.accepted(call.xid), codec.failure(call.proc, NFS3ERR_JUKEBOX)]
        if call.proc in codec.NOT_SERVED:
            return [rpc.accepted(call.xid), codec.not_served(call.proc)]
        if call.proc not in self._procedures:
            self.counters.inc(RPC_PROTOCOL_ERRORS, "proc_unavail")
            return [rpc.accepted(call.xid, RC.PROC_UNAVAIL)]
        try:
            # Arguments it cannot decode raise XdrError: the transport answers GARBAGE_ARGS.
            args = codec.decode_arguments(call.proc, call.args, self.max_io)
            return [rpc.accepted(call.xid),
                    *self.execute(call.proc, args, peer, release, stopped)]
        except NfsError as exc:
            # A failed procedure: its status, then its result type's failure body.
            self.counters.inc(NFS_ERRORS, str(exc.status))
            return [rpc.accepted(call.xid), codec.failure(call.proc, exc.status)]

    def execute(self, proc: int, args, peer: str, release: list, stopped=_never) -> list:
        """Run served procedure `proc` on its decoded arguments (codec.py) for `peer`: the
        parts of its encoded result, or NfsError. Buffers and loans the parts still use are
        put on `release`, for the caller to release once the reply is sent."""
        if proc == codec.READ:
            # The one procedure that waits for pool memory (its data buffer), and so the one
            # that must hear when to stop waiting.
            return self._read(args, peer, release, stopped)
        return self._procedures[proc](args, peer, release)

    def _for_swap(self, call, peer: str) -> bool:
        """Does the call's object belong to the swap export (the node's swap file, or the
        export's directory swapon looks it up in)? Unreadable handles are not swap."""
        try:
            handle = codec.decode_handle(call.args)
            return self.exports.resolve(handle, peer).export_id == SWAP_EXPORT
        except (xdr.XdrError, NfsError):
            return False

    # Helpers ------------------------------------------------------------------------

    def _attributes(self, packer, node: Node, st=None) -> None:
        """fattr3 (§2.5), of `st` if given (a stat made during this call), else of the
        node's file now (a swap file through its open descriptor)."""
        if st is None:
            st = os.fstat(node.fd) if node.fd is not None else os.stat(node.path)
        codec.pack_fattr3(packer, _fattr3(node, st))

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

    # Procedures ---------------------------------------------------------------------

    def _null(self, args, peer, release):
        return []

    def _getattr(self, args, peer, release):
        node = self.exports.resolve(args.handle, peer)
        packer = xdr.Packer()
        packer.uint(NFS3_OK)
        self._attributes(packer, node, node.st)
        return [packer.bytes()]

    def _setattr(self, args, peer, release):
        wanted, guard = args.wanted, args.guard
        try:
            node = self.exports.resolve(args.handle, peer)
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
        # filename3 is an unbounded string (the record cap bounds it): a longer name than
        # we take is NFS3ERR_NAMETOOLONG below, not a malformed call.
        name = args.name
        directory = self.exports.resolve(args.handle, peer)
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
        node = self.exports.resolve(args.handle, peer)
        granted = ACCESS_ALL
        if node.is_swap_file:
            granted &= ~(ACCESS_DELETE | ACCESS_EXECUTE)
        packer = self._ok(node, node.st)
        packer.uint(args.access & granted)  # exactly the asked-for bits that are granted
        return [packer.bytes()]

    def _read(self, args, peer, release, stopped=_never):
        offset, count = args.offset, args.count
        node = self.exports.resolve(args.handle, peer)
        if node.is_dir:
            raise NfsError(NFS3ERR_ISDIR)
        loan = self._swap_read_loan(node, release)
        count = min(count, self.max_io)
        fd = node.fd
        # A scratch file's descriptor, which exports.py keeps open between calls.
        held = node.scratch if fd is None and node.scratch is not None else None
        if held is not None:
            fd = held.acquire()
            if fd is None:
                held = None
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
                    buffer = self._read_buffer(count, loan, stopped)
                    release.insert(0, buffer)  # before the loan that keeps its group attached
                    if node.backend is not None:
                        node.backend.read_into(offset, buffer.view[:count])
                        got = count
                    else:
                        got = os.preadv(fd, [buffer.view], offset)
            finally:
                if held is not None:
                    held.release()
                elif node.fd is None:
                    os.close(fd)
        except OSError as exc:
            raise _from_os(exc) from exc
        parts = [codec.read_result(_fattr3(node, st), got, offset + got >= size)]
        self.counters.inc(NFS_BYTES, "read", got)
        if got:
            parts.append(buffer.view[:got])  # the bytes go out from the pool buffer
            if got % 4:
                parts.append(xdr.padding(got))
        return parts

    def _read_buffer(self, count: int, loan, stopped):
        """The pool buffer a READ's data goes into. A swap-in may need the node's reserve
        when normal memory is gone (the READ answers a page fault); everything else waits for
        normal memory. The wait ends with the connection or the daemon: a worker parked here
        for good would hold the stop (which waits for every call in flight) until its timeout,
        and the pool's close after it. Then the call gets JUKEBOX (try again later), which a
        closing connection most likely never sends."""
        how = {} if loan is None else {"emergency": True, "group": loan.group}
        buffer = self.pool.alloc(count, **how)
        if buffer is not None:
            return buffer
        self.counters.inc(POOL_WAITS, "swap" if loan is not None else "non_swap")
        buffer = wait_for_buffer(self.pool, count, stopped, **how)
        if buffer is None:
            raise NfsError(NFS3ERR_JUKEBOX, "stopped while waiting for pool memory")
        return buffer

    def _write(self, args, peer, release):
        offset, count, stable = args.offset, args.count, args.stable
        try:
            node = self.exports.resolve(args.handle, peer)
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
            st = self._pwrite(node, args.data, offset, sync=committed != UNSTABLE)
        except OSError as exc:
            raise _from_os(exc) from exc
        self.counters.inc(NFS_BYTES, "write", count)
        return [codec.write_result(_fattr3(node, st), count, committed, self.verifier)]

    def _pwrite(self, node: Node, data, offset: int, sync: bool) -> os.stat_result:
        """Write `data` at `offset`; return the file's attributes after the write. A swap
        file is written through its backend: its failure latch and identity check."""
        if node.backend is not None:
            # Its handle was good when resolved, but a wipe may have begun since (this call
            # may even have waited for it to finish, attaching the node): written now, the
            # data would land on the zeroed file.
            if not node.swap_file.begin_write(node.generation):
                raise NfsError(NFS3ERR_STALE, "the swap file was wiped since its handle "
                                              "was resolved")
            try:
                node.backend.write_from(offset, data, fua=sync)
                return os.fstat(node.fd)
            finally:
                node.swap_file.end_write()
        fd = node.fd
        # A scratch file's descriptor, which exports.py keeps open between calls.
        held = node.scratch if fd is None and node.scratch is not None else None
        if held is not None:
            fd = held.acquire(write=True)
            if fd is None:
                held = None
        if fd is None:
            fd = os.open(node.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            done = 0
            while done < len(data):
                done += os.pwritev(fd, [data[done:]], offset + done)
            if sync:
                os.fdatasync(fd)
            return os.fstat(fd)
        finally:
            if held is not None:
                held.release()
            elif node.fd is None:
                os.close(fd)

    def _create(self, args, peer, release):
        name, how, wanted = args.name, args.how, args.wanted
        try:
            directory = self.exports.resolve(args.handle, peer)
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
                    self._create_exclusive(path, args.verifier)
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

    def _readdir(self, args, peer, release):
        """READDIR (§3.3.16) and READDIRPLUS (§3.3.17), a page at a time.

        A cookie is a keyed hash of the entry's name, and a directory is listed in cookie
        order: the page after cookie c holds the entries whose cookie is above c. So a cookie
        stays valid while files come and go between pages (an entry there all along is
        listed exactly once), and across our restarts (the key is the handle key's). The
        cookie verifier names that scheme for the export; another gets NFS3ERR_BAD_COOKIE.
        """
        cookie, verifier, plus = args.cookie, args.verifier, args.plus
        dircount, maxcount = args.dircount, args.maxcount
        directory = self.exports.resolve(args.handle, peer)
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

    def _fsstat(self, args, peer, release):
        node = self.exports.resolve(args.handle, peer)
        fs = os.statvfs(node.path)
        packer = self._ok(node)
        for value in (fs.f_blocks * fs.f_frsize, fs.f_bfree * fs.f_frsize,
                      fs.f_bavail * fs.f_frsize, fs.f_files, fs.f_ffree, fs.f_favail):
            packer.uhyper(value)
        packer.uint(0)  # invarsec
        return [packer.bytes()]

    def _fsinfo(self, args, peer, release):
        node = self.exports.resolve(args.handle, peer)
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
        node = self.exports.resolve(args.handle, peer)
        packer = self._ok(node)
        packer.uint(1)  # linkmax
        packer.uint(NAME_MAX)
        for flag in (True, True, False, True):  # no_trunc, chown_restricted, case-ins., -pres.
            packer.bool(flag)
        return [packer.bytes()]

    def _commit(self, args, peer, release):
        try:
            # The offset and count are not looked at: the whole file is made durable.
            node = self.exports.resolve(args.handle, peer)
            if node.is_dir:
                raise NfsError(NFS3ERR_ISDIR)
            if node.is_swap_file:
                self._swap_activity(node)
            if node.backend is not None:
                node.backend.flush()
            else:
                fd = os.open(node.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise _from_os(exc) from exc
        packer = xdr.Packer()
        packer.uint(NFS3_OK)
        self._wcc(packer, node)
        packer.fixed_opaque(self.verifier)
        return [packer.bytes()]


def _fattr3(node: Node, st) -> tuple:
    return codec.fattr3(st, node.export_id, node.is_swap_file)


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
