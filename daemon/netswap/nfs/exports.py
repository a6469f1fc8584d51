"""What the NFS side serves: the swap export (one file per node) and the scratch export.

Every call that names a file names it by handle, and NFSv3 carries no mount context, so
access is decided here on every call, from the handle and the caller's address: a node
reaches its own swap file and nothing of another node's, whatever handle it presents
(a handle is an HMAC-protected export id, file id and generation: forged or stale ones are
refused before any lookup).

Every READ and WRITE resolves its handle, so resolving is on the hot path, and three things
are remembered between calls (none of them decides access on its own):
* handle bytes -> the FileHandle they verified as: the MAC is a pure function of the bytes
  and the key, which never changes while the daemon runs, so a verified handle stays
  verified. Only handles that passed the MAC are kept, and the table is bounded.
* a swap file's fileid -> its SwapFile: the handle's generation and the owner node are still
  compared with the caller's on every call, so a scrub (new generation) makes old handles
  stale at once and no node ever gets another node's file from it.
* a scratch file's fileid -> the file, kept open (_ScratchFile): a hit is checked with one
  lstat of its path, whose result also gives the reply's attributes. That lstat finding the
  handle's inode number there is enough: the descriptor keeps the inode alive, so no other
  file can have that number meanwhile, and the generation was compared when the file was
  opened. READ and WRITE use the descriptor (no open and close per call). Anything else
  (renamed, replaced, gone) falls back to the directory scan, which opens it again.

A scratch file's handle carries its inode's generation (FS_IOC_GETVERSION, i_generation,
what knfsd puts in its handles for the same reason): file systems reuse the inode number of
a removed file at once (ext4 does), so without it the handle of a removed file would name
whatever file is made next, a client's old handle reaching another's new data. With it,
such a handle is stale. A file system that keeps no generations (tmpfs, overlayfs) gets 0
and a warning at start: there only the inode number tells files apart.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .handles import BadHandle, FileHandle, HandleKey, decode, encode
from .swapfiles import SwapFiles

log = logging.getLogger("netswap.nfs")

SWAP_EXPORT, SCRATCH_EXPORT = 1, 2
# FS_IOC_GETVERSION, _IOR('v', 1, long) in the generic ioctl encoding (x86, arm, riscv): the
# inode's generation. The kernel writes an int into the long.
FS_IOC_GETVERSION = 2 << 30 | struct.calcsize("l") << 16 | ord("v") << 8 | 1
# What a file system without inode generations answers FS_IOC_GETVERSION.
_NO_GENERATIONS = (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
# Opening a scratch file only to look at it: never through a symlink, never blocking on a
# FIFO planted there, never becoming a controlling terminal.
_LOOK = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# Entries per remembering table (see the module docstring); when one is full it starts over.
# A client works on a handful of files, so this is far above the working set.
CACHE_ENTRIES = 4096
# Scratch files kept open at once (each a descriptor, out of the daemon's RLIMIT_NOFILE), and
# for how long one no call used is kept: an open file removed on the server keeps its inode
# and its space until its descriptor is closed.
OPEN_SCRATCH_FILES = 256
SCRATCH_IDLE = 5.0
# Opening a scratch file to serve it: as _LOOK, read-write (O_RDONLY is 0); and why that
# may fail for a file that is there all the same (it is then opened as _LOOK).
_SERVE = _LOOK | os.O_RDWR
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY)


class NfsError(Exception):
    """An NFS3ERR_* status for the reply."""

    def __init__(self, status: int, why: str = "") -> None:
        super().__init__(why or f"NFS3ERR {status}")
        self.status = status


# NFS3 status values used here (RFC 1813 §2.6).
NFS3_OK, NFS3ERR_PERM, NFS3ERR_NOENT, NFS3ERR_IO = 0, 1, 2, 5
NFS3ERR_ACCES, NFS3ERR_EXIST, NFS3ERR_NOTDIR, NFS3ERR_ISDIR = 13, 17, 20, 21
NFS3ERR_INVAL, NFS3ERR_FBIG, NFS3ERR_NOSPC, NFS3ERR_ROFS = 22, 27, 28, 30
NFS3ERR_NAMETOOLONG, NFS3ERR_STALE, NFS3ERR_BADHANDLE = 63, 70, 10001
NFS3ERR_NOTSUPP, NFS3ERR_SERVERFAULT, NFS3ERR_JUKEBOX = 10004, 10006, 10008


@dataclass
class Node:
    """A resolved handle: what it names, for whom."""

    export_id: int
    path: Path
    is_dir: bool
    fd: Optional[int] = None  # open descriptor of a swap file (owned by its backend)
    swap_owner: Optional[str] = None  # the node a swap file belongs to
    # The stat that resolve() made of a scratch file to check it: its attributes before
    # the call, so a READ needs no second stat.
    st: Optional[os.stat_result] = None
    # A swap file's storage (swap/store.py): its READ, WRITE and COMMIT go through it.
    backend: Optional[object] = None
    # A swap file (swapfiles.SwapFile), and the generation the handle resolved carried:
    # a WRITE is made only while that is still the file's (SwapFile.begin_write).
    swap_file: Optional[object] = None
    generation: int = 0
    # A scratch file resolve() found, with its open descriptor (_ScratchFile.acquire).
    scratch: Optional["_ScratchFile"] = None

    @property
    def is_swap_file(self) -> bool:
        return self.swap_owner is not None


class Peer(str):
    """A caller as the programs see it: its address (the str, for logs and limits) and
    the source port of its connection, which decides whether the address may be a node
    (nfs.node_ports)."""

    def __new__(cls, address: str, port: int) -> "Peer":
        peer = super().__new__(cls, address)
        peer.port = port
        return peer


class NfsExports:
    def __init__(self, config, state_dir: Path) -> None:
        nfs = config.nfs
        self.config = nfs
        self._swap_config = config.swap
        self.key = HandleKey.load_or_create(state_dir)
        self.roots: dict[str, tuple[int, Path]] = {}  # export path -> (export id, directory)
        self.swap: Optional[SwapFiles] = None
        if nfs.swap_export:
            self.swap = SwapFiles(nfs.swap_directory, nfs.swap_size,
                                  state_dir / "nfs-swap-generations.json")
            self.roots[nfs.swap_export] = (SWAP_EXPORT, nfs.swap_directory)
        # Whether the scratch directory's file system gives inode generations (the module
        # docstring): asked once, of the directory, rather than on every call.
        self._scratch_generations = False
        if nfs.scratch_export:
            nfs.scratch_directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            self.roots[nfs.scratch_export] = (SCRATCH_EXPORT, nfs.scratch_directory)
            self._scratch_generations = _has_generations(nfs.scratch_directory)
            if not self._scratch_generations:
                log.warning("scratch directory %s: its file system keeps no inode generations "
                            "(FS_IOC_GETVERSION): a handle of a removed file names a new file "
                            "that reuses its inode number", nfs.scratch_directory)
        self._verified: dict[bytes, FileHandle] = {}
        self._swap_files: dict[int, object] = {}  # fileid -> SwapFile
        self._scratch_files: dict[int, _ScratchFile] = {}  # fileid -> open scratch file
        self._scratch_lock = threading.Lock()  # held while _scratch_files changes
        self._next_sweep = 0.0  # time.monotonic() of the next look for idle scratch files

    def close(self) -> None:
        self._swap_files.clear()  # their descriptors close with SwapFiles
        with self._scratch_lock:
            for scratch in self._scratch_files.values():
                scratch.drop()
            self._scratch_files.clear()
        if self.swap is not None:
            self.swap.close()

    def node_of(self, peer: str) -> Optional[str]:
        """The node `peer` is (a Peer: its address, swap.nodes, and source port,
        nfs.node_ports)."""
        if not self.config.node_port_allowed(getattr(peer, "port", None)):
            return None
        return self._swap_config.node_of(peer)

    # Handles ------------------------------------------------------------------------

    def root_handle(self, export_path: str) -> bytes:
        export_id, directory = self.roots[export_path]
        return encode(self.key, FileHandle(export_id, os.stat(directory).st_ino, 0))

    def handle_for(self, node: Node) -> bytes:
        if node.is_swap_file:
            return encode(self.key, FileHandle(node.export_id, os.stat(node.path).st_ino,
                                               self.swap.open(node.swap_owner).generation))
        if not node.is_dir and self._scratch_generations:
            try:
                fd = os.open(node.path, _LOOK)
            except PermissionError:
                pass  # as in _scratch_file: a daemon that is not root has the inode only
            else:
                try:
                    fileid, generation = os.fstat(fd).st_ino, _generation_of(fd) or 0
                finally:
                    os.close(fd)
                return encode(self.key, FileHandle(node.export_id, fileid, generation))
        return encode(self.key, FileHandle(node.export_id, os.stat(node.path).st_ino, 0))

    def resolve(self, data: bytes, peer: str) -> Node:
        """The object a handle names, if this caller may reach it; NfsError otherwise."""
        handle = self._verify(data)
        if handle.export_id == SWAP_EXPORT and handle.generation and self.swap is not None:
            # Generation 0 is the export root's: a swap file's handle never names it.
            return self._swap_file(handle, peer)
        if handle.export_id == SCRATCH_EXPORT:
            now = time.monotonic()
            if now >= self._next_sweep:
                self._sweep(now)
            scratch = self._scratch_files.get(handle.fileid)
            if scratch is not None:
                # Still a regular file of the handle's inode at its path: the open file (see
                # the module docstring), what the scan would find (it cannot be the root).
                try:
                    st = os.lstat(scratch.path)
                except OSError:
                    st = None
                if st is not None and st.st_ino == handle.fileid and stat.S_ISREG(st.st_mode):
                    if scratch.generation != handle.generation:
                        raise NfsError(NFS3ERR_STALE, "a new file under its inode number")
                    scratch.used = now
                    return Node(SCRATCH_EXPORT, scratch.path, False, st=st, scratch=scratch)
                self._forget_scratch(scratch)
        directory = self._directory(handle.export_id)
        root_ino = os.stat(directory).st_ino
        if handle.fileid == root_ino:
            return Node(handle.export_id, directory, True)
        if handle.export_id == SWAP_EXPORT:
            return self._swap_file(handle, peer)
        for entry in os.scandir(directory):
            if entry.inode() == handle.fileid and entry.is_file(follow_symlinks=False):
                found = self._open_scratch(Path(entry.path), handle)
                if found is None:  # another file under the removed one's inode number
                    break
                scratch, st = found
                return Node(SCRATCH_EXPORT, scratch.path, False, st=st, scratch=scratch)
        raise NfsError(NFS3ERR_STALE, "no such file (or a new one under its inode number)")

    def _open_scratch(self, path: Path, handle: FileHandle):
        """(the open _ScratchFile, its attributes) for the scratch file at `path` if it is
        the one `handle` names (a regular file of its inode and generation), else None. It
        is remembered by fileid for the next calls."""
        fd, writable = None, False
        for flags in (_SERVE, _LOOK):
            try:
                fd = os.open(path, flags)
            except OSError as exc:
                if exc.errno in _NOT_WRITABLE and flags == _SERVE:
                    continue  # read-only (its mode, the file system, a running program)
                if exc.errno in (errno.EACCES, errno.EPERM):
                    break  # only root opens any file: a daemon that is not has the inode only
                return None  # gone, or a symlink now
            writable = flags == _SERVE
            break
        if fd is None:
            # A daemon that is not root and may not open it has the inode only.
            try:
                st = os.lstat(path)
            except OSError:
                return None
            generation = None
        else:
            try:
                st = os.fstat(fd)
                generation = (_generation_of(fd)
                              if self._scratch_generations and stat.S_ISREG(st.st_mode) else None)
            except BaseException:
                os.close(fd)
                raise
        if (st.st_ino != handle.fileid or not stat.S_ISREG(st.st_mode)
                or (generation or 0) != handle.generation):
            if fd is not None:
                os.close(fd)
            return None
        scratch = _ScratchFile(path, handle.fileid, handle.generation, fd, writable)
        with self._scratch_lock:
            if len(self._scratch_files) >= OPEN_SCRATCH_FILES:
                for old in self._scratch_files.values():
                    old.drop()
                self._scratch_files.clear()
            old = self._scratch_files.pop(handle.fileid, None)
            if old is not None:
                old.drop()
            self._scratch_files[handle.fileid] = scratch
        return scratch, st

    def _sweep(self, now: float) -> None:
        """Close the scratch files no call used for SCRATCH_IDLE (at most once a second): a
        file removed on the server gets its space back, the inode number its reuse."""
        self._next_sweep = now + 1.0
        with self._scratch_lock:
            idle = [s for s in self._scratch_files.values() if now - s.used > SCRATCH_IDLE]
            for scratch in idle:
                del self._scratch_files[scratch.fileid]
                scratch.drop()

    def _forget_scratch(self, scratch: "_ScratchFile") -> None:
        with self._scratch_lock:
            if self._scratch_files.get(scratch.fileid) is scratch:
                del self._scratch_files[scratch.fileid]
        scratch.drop()

    def _verify(self, data) -> FileHandle:
        key = bytes(data)
        handle = self._verified.get(key)
        if handle is None:
            try:
                handle = decode(self.key, key)
            except BadHandle as exc:
                raise NfsError(NFS3ERR_BADHANDLE, str(exc)) from None
            _remember(self._verified, key, handle)
        return handle

    def _swap_file(self, handle: FileHandle, peer: str) -> Node:
        swap_file = self._swap_files.get(handle.fileid)
        if swap_file is None:
            swap_file = self.swap.by_fileid(handle.fileid)
            if swap_file is not None:
                _remember(self._swap_files, handle.fileid, swap_file)
        # Both checks on every call, cached or not: the generation (a scrub bumps it in place)
        # and the owner (isolation).
        if swap_file is None or swap_file.generation != handle.generation:
            raise NfsError(NFS3ERR_STALE, "no such swap file (or an older generation)")
        if swap_file.node != self.node_of(peer):
            # Another node's file: refused whatever the handle says (isolation).
            raise NfsError(NFS3ERR_ACCES, f"swap file of node {swap_file.node!r}")
        return _swap_node(swap_file, handle.generation)

    def _directory(self, export_id: int) -> Path:
        for exported_id, directory in self.roots.values():
            if exported_id == export_id:
                return directory
        raise NfsError(NFS3ERR_STALE, f"export {export_id} is not served")

    # Names --------------------------------------------------------------------------

    def lookup(self, directory: Node, name: str, peer: str) -> Node:
        if not directory.is_dir:
            raise NfsError(NFS3ERR_NOTDIR)
        if name in (".", ""):
            return directory
        if directory.export_id == SWAP_EXPORT:
            # A node sees its own file only, created from the template on first use.
            node = self.node_of(peer)
            if node is None or name != node:
                raise NfsError(NFS3ERR_NOENT)
            return _swap_node(self.swap.open(node))
        if "/" in name or name == ".." or "\0" in name:
            raise NfsError(NFS3ERR_NOENT)
        path = directory.path / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise NfsError(NFS3ERR_NOENT) from None
        if not stat.S_ISREG(st.st_mode):
            raise NfsError(NFS3ERR_NOENT)  # the scratch export holds plain files only
        return Node(SCRATCH_EXPORT, path, False)

    def listing(self, directory: Node, peer: str) -> list[tuple[str, Node]]:
        if directory.export_id == SWAP_EXPORT:
            node = self.node_of(peer)
            if node is None:
                return []
            return [(f.node, _swap_node(f)) for f in self.swap.files_of(node)]
        return sorted((entry.name, Node(SCRATCH_EXPORT, Path(entry.path), False))
                      for entry in os.scandir(directory.path)
                      if entry.is_file(follow_symlinks=False))


class _ScratchFile:
    """A scratch file resolve() found, open: READ and WRITE use its descriptor. A call takes
    it with acquire() and gives it back with release(); once dropped (the file is gone from
    its path, or the table starts over) no call takes it, and the last one closes it, so a
    descriptor is never closed under a call, nor its number reused for another file while a
    call still holds it."""

    __slots__ = ("path", "fileid", "generation", "used", "_fd", "_writable", "_users",
                 "_dropped", "_lock")

    def __init__(self, path: Path, fileid: int, generation: int, fd: Optional[int],
                 writable: bool) -> None:
        self.path = path
        self.fileid = fileid
        self.generation = generation  # the one compared when it was opened (0: none kept)
        self.used = time.monotonic()  # when a call last resolved it
        self._fd = fd  # None: a daemon that is not root may not open it
        self._writable = writable
        self._users = 0
        self._dropped = False
        self._lock = threading.Lock()

    def acquire(self, write: bool = False) -> Optional[int]:
        """Its descriptor, held until release(); None if it has none for that (the caller
        opens the path itself)."""
        with self._lock:
            if self._dropped or self._fd is None or (write and not self._writable):
                return None
            self._users += 1
            return self._fd

    @property
    def dropped(self) -> bool:
        return self._dropped

    def dup(self) -> Optional[tuple[int, bool]]:
        """(a dup of its descriptor, whether that is open for writing), for the C loop's
        handle table (fastloop.py), which closes it; None if it has none (dropped, or a
        daemon that is not root may not open it)."""
        with self._lock:
            if self._dropped or self._fd is None:
                return None
            return os.dup(self._fd), self._writable

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users or not self._dropped:
                return
        os.close(self._fd)

    def drop(self) -> None:
        with self._lock:
            if self._dropped:
                return
            self._dropped = True
            if self._users or self._fd is None:
                return
        os.close(self._fd)


def _generation_of(fd: int) -> Optional[int]:
    """The generation of the inode open at `fd`, None if its file system keeps none."""
    answer = bytearray(8)
    try:
        fcntl.ioctl(fd, FS_IOC_GETVERSION, answer)
    except OSError as exc:
        if exc.errno in _NO_GENERATIONS:
            return None
        raise
    return int.from_bytes(answer[:4], sys.byteorder)


def _has_generations(directory: Path) -> bool:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _generation_of(fd) is not None
    finally:
        os.close(fd)


def _swap_node(swap_file, generation: Optional[int] = None) -> Node:
    """A swap file's Node, as reached through a handle of `generation` (None: the file's
    current one, for a handle about to be issued)."""
    return Node(SWAP_EXPORT, swap_file.path, False, swap_file.fd, swap_file.node,
                backend=swap_file.backend, swap_file=swap_file,
                generation=swap_file.generation if generation is None else generation)


def _remember(table: dict, key, value) -> None:
    """Keep `value` under `key`, starting the table over when it is full (a bound, not an
    eviction policy: the working set is a few entries per client)."""
    if len(table) >= CACHE_ENTRIES:
        table.clear()
    table[key] = value
