"""What the NFS side serves: the swap export (one file per node) and the scratch export.

Every call that names a file names it by handle, and NFSv3 carries no mount context, so
access is decided here on every call, from the handle and the caller's address: a node
reaches its own swap file and nothing of another node's, whatever handle it presents
(a handle is an HMAC-protected export id, file id and generation: forged or stale ones are
refused before any lookup).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .handles import BadHandle, FileHandle, HandleKey, decode, encode
from .swapfiles import SwapFiles

SWAP_EXPORT, SCRATCH_EXPORT = 1, 2


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
    fd: Optional[int] = None  # open descriptor of a swap file (owned by SwapFiles)
    swap_owner: Optional[str] = None  # the node a swap file belongs to

    @property
    def is_swap_file(self) -> bool:
        return self.swap_owner is not None


class NfsExports:
    def __init__(self, config, state_dir: Path) -> None:
        nfs = config.nfs
        self.config = nfs
        self.key = HandleKey.load_or_create(state_dir)
        self.roots: dict[str, tuple[int, Path]] = {}  # export path -> (export id, directory)
        self.swap: Optional[SwapFiles] = None
        if nfs.swap_export:
            self.swap = SwapFiles(nfs.swap_directory, nfs.swap_size,
                                  state_dir / "nfs-swap-generations.json")
            self.roots[nfs.swap_export] = (SWAP_EXPORT, nfs.swap_directory)
        if nfs.scratch_export:
            nfs.scratch_directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            self.roots[nfs.scratch_export] = (SCRATCH_EXPORT, nfs.scratch_directory)

    def close(self) -> None:
        if self.swap is not None:
            self.swap.close()

    def node_of(self, peer: str) -> Optional[str]:
        return self.config.node_of(peer)

    # Handles ------------------------------------------------------------------------

    def root_handle(self, export_path: str) -> bytes:
        export_id, directory = self.roots[export_path]
        return encode(self.key, FileHandle(export_id, os.stat(directory).st_ino, 0))

    def handle_for(self, node: Node) -> bytes:
        st = os.stat(node.path)
        generation = 0
        if node.is_swap_file:
            generation = self.swap.open(node.swap_owner).generation
        return encode(self.key, FileHandle(node.export_id, st.st_ino, generation))

    def resolve(self, data: bytes, peer: str) -> Node:
        """The object a handle names, if this caller may reach it; NfsError otherwise."""
        try:
            handle = decode(self.key, bytes(data))
        except BadHandle as exc:
            raise NfsError(NFS3ERR_BADHANDLE, str(exc)) from None
        directory = self._directory(handle.export_id)
        root_ino = os.stat(directory).st_ino
        if handle.fileid == root_ino:
            return Node(handle.export_id, directory, True)
        if handle.export_id == SWAP_EXPORT:
            swap_file = self.swap.by_fileid(handle.fileid)
            if swap_file is None or swap_file.generation != handle.generation:
                raise NfsError(NFS3ERR_STALE, "no such swap file (or an older generation)")
            if swap_file.node != self.node_of(peer):
                # Another node's file: refused whatever the handle says (isolation).
                raise NfsError(NFS3ERR_ACCES, f"swap file of node {swap_file.node!r}")
            return Node(SWAP_EXPORT, swap_file.path, False, swap_file.fd, swap_file.node)
        for entry in os.scandir(directory):
            if entry.inode() == handle.fileid and entry.is_file(follow_symlinks=False):
                return Node(SCRATCH_EXPORT, Path(entry.path), False)
        raise NfsError(NFS3ERR_STALE, "no such file")

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
            swap_file = self.swap.open(node)
            return Node(SWAP_EXPORT, swap_file.path, False, swap_file.fd, node)
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
            return [(f.node, Node(SWAP_EXPORT, f.path, False, f.fd, f.node))
                    for f in self.swap.files_of(node)]
        return sorted((entry.name, Node(SCRATCH_EXPORT, Path(entry.path), False))
                      for entry in os.scandir(directory.path)
                      if entry.is_file(follow_symlinks=False))
