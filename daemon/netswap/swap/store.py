"""The swap store: what a node swaps to, behind one Backend path for both protocols.

A node's NBD swap export (``swap/<node>.img``, made by exports/registry.py on first use) and
its NFS swap file (``<directory>/<node>``, made and checked by nfs/swapfiles.py) are both
reached through a Backend (exports/backends.py), never by raw pread/pwrite. So both get what
the Backend guarantees: the failure latch (after a failed sync, or with the file deleted,
renamed away or replaced under us, every write and flush fails with EIO, reads go on) and
the identity check that finds the latter.

The NFS C loop (nfs/fastloop.py) writes swap files through its own descriptor: it is handed
one only while the file's backend has not failed, and a failure voids every descriptor it
holds (`on_failure`), so its writes stop when the Backend's do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from ..exports.backends import Backend, FileBackend, MemoryBackend

log = logging.getLogger(__name__)


def swap_image(path: Path, size: int, kind: str) -> Backend:
    """An NBD swap export's storage: a sparse file at `path` (created, 0600, never followed
    through a symlink), or RAM for kind "memory"."""
    if kind == "file":
        return FileBackend(path, size, read_only=False, create=True, follow_symlinks=False)
    return MemoryBackend(size)


def swap_file(fd: int, path: Path, on_failure: Optional[Callable[[], None]] = None) -> FileBackend:
    """An NFS swap file's storage, over `fd`: the descriptor nfs/swapfiles.py opened without
    following symlinks and checked (a plain, fully allocated file of the swap size). The
    backend owns it from now on. `on_failure` runs once when the backend fails for good."""
    return FileBackend.adopt(fd, path, on_failure=on_failure)
