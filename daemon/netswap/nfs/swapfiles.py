"""A swap export's directory of per-node swap files, as the NFS server sees it.

Each node gets one file, ``<directory>/<node>``, made on first use and kept across restarts.
What the Linux client needs from it (research/nfs.md section 1) and what isolation needs
(section 4) decide every rule here:

* **Fully allocated, never sparse.**  swapon(8) skips a file whose ``st_blocks * 512`` is below
  its size, and the kernel's ``nfs_swap_activate`` refuses it ("swapfile has holes"), judging
  by fattr3.used, which the server takes from ``st_blocks``.  So a new file is
  ``posix_fallocate``d and checked afterwards; a file that still has holes is an error, not a
  warning.  An existing file with holes (restored from a sparse backup) gets them allocated:
  that changes no byte a node can read.
* **Never grown, shrunk or replaced behind a node's back.**  An existing file of another size,
  or something that is not a plain regular file with one link (a symlink, a FIFO, a hard link
  planted to reach a file elsewhere), is an error naming the path; the operator decides.
  Node files are opened relative to a descriptor of the directory with O_NOFOLLOW, so the
  name the node asked for cannot lead anywhere else.
* **0600, owned 0:0.**  A node's swap holds every secret its processes had.  The mode is set
  with fchmod (the umask cannot widen or narrow it), ownership with fchown when we may (root).
* **Generations.**  A file handle carries (fileid, generation).  Inode numbers get reused, so
  whenever a file's contents stop being what an old handle referred to (created, re-created,
  scrubbed) it gets a new generation and old handles go stale.  A write checks the generation
  of the handle it came with again when it starts (``SwapFile.begin_write``), and a scrub
  admits none from its start and waits for those already started before it zeroes: a WRITE
  resolved before a wipe (then parked behind it, or merely slow) never lands after it, which
  would survive a wipe the operator asked for and hand the node stale pages later.
  Generations come from one counter per state file, so two incarnations never share one
  even across nodes; a fresh state file starts the counter at a random point, so losing the
  state cannot revive old handles except by a 1 in 2**32 chance.  The state file
  (``state_path``, JSON) maps each node to its fileid and generation and is rewritten
  atomically (temporary, fsync, rename, fsync dir).
  If a node's file on disk is not the inode the state remembers, somebody replaced it: it gets
  a new generation, and a warning.
* **Isolation is the caller's check, made possible here.**  ``by_fileid`` resolves a handle's
  fileid to a SwapFile whose ``node`` the server compares with the caller's node on every call;
  ``files_of`` lists a node its own file (made on first use) and nothing else.

Node names follow the swap node rule (swap/nodes.py): lower-case RFC 1123 labels.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import stat
import threading
import time
from pathlib import Path

from ..exports.backends import FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE, fallocate
from ..swap import store
from ..swap.nodes import nfs_swap_name, valid_node

log = logging.getLogger(__name__)

__all__ = ["SwapFile", "SwapFileError", "SwapFiles"]

STATE_FORMAT = 1
_U32 = 1 << 32
_ZERO_CHUNK = 1 << 20
# Read-only zeros for scrubbing where ZERO_RANGE is missing: untouched calloc'd pages map the
# kernel's zero page, so this costs address space, not memory.
_ZEROS = memoryview(bytes(_ZERO_CHUNK))


class SwapFileError(OSError):
    """A node's swap file exists but is not one we may serve (wrong size, not a regular file,
    holes we could not fill, a corrupt state file).  The message names the path."""


class SwapFile:
    """One node's open swap file.  ``generation`` changes when the file is scrubbed."""

    __slots__ = ("node", "path", "fd", "size", "fileid", "generation", "backend", "_writes",
                 "_writing", "_fenced")

    def __init__(self, node: str, path: Path, fd: int, size: int, fileid: int, generation: int,
                 on_failure=None):
        self.node = node
        self.path = path
        self.fd = fd  # O_RDWR | O_CLOEXEC, positional I/O only, shared by threads
        # READ, WRITE and COMMIT go through the swap store's Backend, which owns `fd`.
        self.backend = store.swap_file(fd, path, on_failure)
        self.size = size
        self.fileid = fileid  # st_ino; fattr3.fileid and the handle's fileid
        self.generation = generation  # u32, never 0 (0 is the export root's)
        # Writes between begin_write and end_write, and whether a scrub holds new ones off.
        self._writes = threading.Condition(threading.Lock())
        self._writing = 0
        self._fenced = False

    def begin_write(self, generation: int) -> bool:
        """May a write through a handle of `generation` go ahead? False once the file is
        being, or was, scrubbed since the handle was issued (the write is not made: its
        handle is stale); True counts it in until end_write."""
        with self._writes:
            if self._fenced or generation != self.generation:
                return False
            self._writing += 1
            return True

    def end_write(self) -> None:
        with self._writes:
            self._writing -= 1
            if not self._writing and self._fenced:
                self._writes.notify_all()

    def _fence(self) -> None:
        """(A scrub.) Admit no write from now on, and wait for those admitted to end."""
        with self._writes:
            self._fenced = True
            while self._writing:
                self._writes.wait()

    def _unfence(self) -> None:
        with self._writes:
            self._fenced = False

    def __repr__(self) -> str:
        return f"SwapFile(node={self.node!r}, fileid={self.fileid}, generation={self.generation})"

    @property
    def name(self) -> str:
        return nfs_swap_name(self.node)

    def stat(self) -> os.stat_result:
        """Current attributes (fstat of the open file): st_blocks*512 is fattr3.used."""
        return os.fstat(self.fd)


class SwapFiles:
    """The per-node swap files of one swap export.  Thread-safe."""

    def __init__(self, directory: Path, size: int, state_path: Path) -> None:
        if type(size) is not int or size <= 0:
            raise ValueError(f"swap file size must be a positive int, not {size!r}")
        self.directory = Path(directory)
        self.size = size
        self.state_path = Path(state_path)
        self._lock = threading.Lock()  # guards _open, _state and the state file
        self._open: dict[str, SwapFile] = {}
        self._closed = False
        # The NFS C loops' scrub state (nfs/fastloop.py's ScrubState), or None: its epoch
        # changes when a scrub starts and when it ends, and so voids every handle the loops
        # hold; a scrub waits for the loops' writes begun before that.
        self.loops = None
        self._prepare_directory()
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._state = self._load_state()
        except BaseException:
            os.close(self._dir_fd)
            raise

    # -- public -------------------------------------------------------------------------------

    def open(self, node: str) -> SwapFile:
        """The node's swap file, created (fully allocated) on first use.

        Raises ValueError for an invalid node name, SwapFileError for a file we must not serve,
        OSError for I/O failures (ENOSPC: the partial file is removed again).
        """
        return self._get(node, create=True)

    def files_of(self, node: str) -> list[SwapFile]:
        """What READDIR shows ``node``: its own file, nothing else.

        The file is created as on LOOKUP: a node told to ``swapon /mnt/swap/<node>`` lists
        the directory to find its file, and its name in swap.nodes need not be its hostname,
        so an empty listing would leave it guessing.
        """
        return [self._get(node, create=True)]

    def opened(self, node: str) -> SwapFile | None:
        """The node's swap file if it is open now; never opens or creates one."""
        return self._open.get(node)

    def by_fileid(self, fileid: int) -> SwapFile | None:
        """The swap file with this fileid (a handle's), opened if a previous run made it.

        The caller must still compare ``.generation`` with the handle's and ``.node`` with
        the caller's node.  Never creates a file: a handle whose file is gone is stale.
        """
        with self._lock:
            self._check_open()
            for swap_file in self._open.values():
                if swap_file.fileid == fileid:
                    return swap_file
            node = next(
                (n for n, rec in self._state["nodes"].items() if rec["fileid"] == fileid), None
            )
        if node is None:
            return None
        found = self._get(node, create=False)
        return found if found is not None and found.fileid == fileid else None

    def nodes(self) -> list[str]:
        """Every node that has had a swap file here (what swap.wipe at start scrubs)."""
        with self._lock:
            return sorted(self._state["nodes"])

    def scrub(self, node: str) -> SwapFile | None:
        """Zero the node's file, keep it fully allocated, give it a new generation.

        Returns the file (same fd and fileid, new generation), or None if the node has none.
        The generation is persisted after the zeroing is durable: a crash in between leaves
        old handles valid on a zeroed file, which a node reads as a swap area without a
        signature (swapon fails), never as another node's data.
        """
        swap_file = self._get(node, create=False)
        if swap_file is None:
            return None
        with self._lock:
            self._check_open()
            # No write from here on (the C loops' handles void, Python's held off), and none
            # still going when the zeroing starts (the module docstring).
            self._bump_epoch()
            swap_file._fence()
            try:
                self._wait_for_loop_writes()
                self._zero(swap_file)
                self._require_allocated(swap_file.fd, swap_file.path)
                os.fsync(swap_file.fd)
                swap_file.generation = self._record(node, swap_file.fileid, new_generation=True)
            finally:
                self._bump_epoch()  # handles verified during the scrub are void too
                swap_file._unfence()  # old handles fail the generation check from here
        log.info("scrubbed swap file %s (generation %d)", swap_file.path, swap_file.generation)
        return swap_file

    def _bump_epoch(self) -> None:
        if self.loops is not None:
            self.loops.void_handles()

    def _wait_for_loop_writes(self) -> None:
        """Until no C loop is in a write it began before the epoch changed (one pwrite and
        an fdatasync at most: a poll is enough for what a wipe waits for, and costs the
        loops nothing)."""
        while self.loops is not None and self.loops.writers():
            time.sleep(0.001)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for swap_file in self._open.values():
                swap_file.backend.close()
            self._open.clear()
            os.close(self._dir_fd)

    def __enter__(self) -> SwapFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- files --------------------------------------------------------------------------------

    def _get(self, node: str, create: bool) -> SwapFile | None:
        if not valid_node(node):
            raise ValueError(f"invalid swap node name {node!r}: lower-case RFC 1123 label")
        swap_file = self._open.get(node)  # dict reads are atomic; published fully built
        if swap_file is not None:
            return swap_file
        with self._lock:
            self._check_open()
            swap_file = self._open.get(node)
            if swap_file is None:
                swap_file = self._open_file(node, create)
                if swap_file is not None:
                    self._open[node] = swap_file
            return swap_file

    def _open_file(self, node: str, create: bool) -> SwapFile | None:
        path = self.directory / node
        try:
            fd = os.open(
                node,
                os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                dir_fd=self._dir_fd,
            )
        except FileNotFoundError:
            if not create:
                return None
            return self._create_file(node, path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SwapFileError(
                    errno.ELOOP, f"{path}: is a symbolic link, not a swap file; refusing it"
                ) from e
            raise
        try:
            os.set_blocking(fd, True)  # O_NONBLOCK was only so a planted FIFO cannot hang open
            st = self._check_existing(fd, path)
            if st.st_blocks * 512 < self.size:
                log.warning("swap file %s has holes; allocating them", path)
                os.posix_fallocate(fd, 0, self.size)
                self._require_allocated(fd, path)
                os.fsync(fd)
            if stat.S_IMODE(st.st_mode) != 0o600:
                log.warning(
                    "swap file %s had mode %04o; setting 0600", path, stat.S_IMODE(st.st_mode)
                )
                os.fchmod(fd, 0o600)
            known = self._state["nodes"].get(node)
            if known is not None and known["fileid"] != st.st_ino:
                log.warning(
                    "swap file %s is not the file netswapd made (inode %d, expected %d); "
                    "old handles of node %s are stale now",
                    path, st.st_ino, known["fileid"], node,
                )
            # _record gives a new generation when the node is unknown or its inode changed.
            generation = self._record(node, st.st_ino, new_generation=False)
            return SwapFile(node, path, fd, self.size, st.st_ino, generation,
                            on_failure=self._bump_epoch)
        except BaseException:
            os.close(fd)
            raise

    def _check_existing(self, fd: int, path: Path) -> os.stat_result:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SwapFileError(errno.EINVAL, f"{path}: not a regular file; refusing it as swap")
        if st.st_nlink != 1:
            raise SwapFileError(
                errno.EINVAL,
                f"{path}: has {st.st_nlink} links; a swap file must have exactly one "
                "(a hard link could reach a file outside the swap directory)",
            )
        if st.st_size != self.size:
            raise SwapFileError(
                errno.EINVAL,
                f"{path}: is {st.st_size} bytes, the swap export's size is {self.size}; "
                "netswapd never resizes a node's swap (its swap header records the old size): "
                "remove the file or fix the configured size",
            )
        return st

    def _create_file(self, node: str, path: Path) -> SwapFile:
        try:
            fd = os.open(
                node,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self._dir_fd,
            )
        except FileExistsError:
            # Appeared since we looked (not by us: we hold the lock).  Treat it as existing.
            found = self._open_file(node, create=False)
            if found is None:
                raise
            return found
        try:
            os.fchmod(fd, 0o600)
            if os.geteuid() == 0:
                os.fchown(fd, 0, 0)  # swapon warns on other owners; root is who swaps
            os.posix_fallocate(fd, 0, self.size)
            st = os.fstat(fd)
            if st.st_size != self.size:
                raise SwapFileError(errno.EIO, f"{path}: is {st.st_size} bytes after fallocate")
            self._require_allocated(fd, path)
            os.fsync(fd)
            os.fsync(self._dir_fd)
            generation = self._record(node, st.st_ino, new_generation=True)
        except BaseException:
            # Never leave a half-made file: the next attempt would find it of the wrong size
            # or with holes and refuse it.
            os.close(fd)
            try:
                os.unlink(node, dir_fd=self._dir_fd)
            except OSError:
                pass
            raise
        log.info("created swap file %s (%d bytes, generation %d)", path, self.size, generation)
        return SwapFile(node, path, fd, self.size, st.st_ino, generation,
                        on_failure=self._bump_epoch)

    def _require_allocated(self, fd: int, path: Path) -> None:
        st = os.fstat(fd)
        if st.st_blocks * 512 < self.size:
            raise SwapFileError(
                errno.EIO,
                f"{path}: only {st.st_blocks * 512} of {self.size} bytes are allocated after "
                "fallocate; swapon refuses swap files with holes",
            )

    def _zero(self, swap_file: SwapFile) -> None:
        try:
            fallocate(swap_file.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, swap_file.size)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        # No ZERO_RANGE here (tmpfs, older file systems): write zeros over the allocation.
        offset = 0
        while offset < swap_file.size:
            offset += os.pwrite(
                swap_file.fd, _ZEROS[: min(_ZERO_CHUNK, swap_file.size - offset)], offset
            )

    def _prepare_directory(self) -> None:
        try:
            # mkdir applies the umask; the explicit chmod makes it exactly 0700.
            self.directory.mkdir(mode=0o700, parents=True)
            os.chmod(self.directory, 0o700)
        except FileExistsError:
            if not self.directory.is_dir():
                raise SwapFileError(errno.ENOTDIR, f"{self.directory}: not a directory") from None
            if self.directory.stat().st_mode & 0o077:
                log.warning(
                    "swap directory %s is accessible to group/others; node swap holds secrets",
                    self.directory,
                )

    def _check_open(self) -> None:
        if self._closed:
            raise SwapFileError(errno.ESHUTDOWN, f"swap files of {self.directory} are closed")

    # -- state --------------------------------------------------------------------------------

    def _load_state(self) -> dict:
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            # Start the counter anywhere: if this state was lost rather than new, handles from
            # before almost surely mismatch (stale) instead of matching a new incarnation.
            first = secrets.randbelow(_U32 - 1) + 1
            return {"format": STATE_FORMAT, "next_generation": first, "nodes": {}}
        try:
            state = json.loads(raw)
            ok = (
                isinstance(state, dict)
                and state.get("format") == STATE_FORMAT
                and _is_u32(state.get("next_generation"))
                and isinstance(state.get("nodes"), dict)
                and all(
                    valid_node(node)
                    and isinstance(rec, dict)
                    and _is_u32(rec.get("generation"))
                    and type(rec.get("fileid")) is int
                    and rec["fileid"] >= 0
                    for node, rec in state["nodes"].items()
                )
            )
        except ValueError:
            ok = False
        if not ok:
            raise SwapFileError(
                errno.EINVAL,
                f"{self.state_path}: not a netswapd swap-file state (format {STATE_FORMAT}); "
                "deleting it makes every node's NFS file handle stale",
            )
        return state

    def _record(self, node: str, fileid: int, new_generation: bool) -> int:
        """Remember the node's fileid; return its generation, a new one if asked, if the node
        is new or if its fileid changed (a file replaced under us: old handles must go stale).

        Called with the lock held.  Persists before returning, so no handle is ever issued
        for a generation that a restart would forget.
        """
        known = self._state["nodes"].get(node)
        if not new_generation and known is not None and known["fileid"] == fileid:
            return known["generation"]
        generation = self._state["next_generation"]
        next_generation = generation % (_U32 - 1) + 1  # 1 .. 2**32-1, skipping 0
        state = {
            "format": STATE_FORMAT,
            "next_generation": next_generation,
            "nodes": {**self._state["nodes"], node: {"fileid": fileid, "generation": generation}},
        }
        self._save_state(state)
        self._state = state
        return generation

    def _save_state(self, state: dict) -> None:
        temporary = self.state_path.with_name(self.state_path.name + ".new")
        data = json.dumps(state, indent=1, sort_keys=True).encode()
        fd = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.state_path)
        directory = os.open(self.state_path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _is_u32(value: object) -> bool:
    return type(value) is int and 0 < value < _U32
