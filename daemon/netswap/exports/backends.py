"""Storage backends: the narrow interface between the NBD data path and the bytes behind an export.

The server calls a backend from many worker threads at once, at different or overlapping offsets,
with buffers it owns (memoryviews into the locked pool).  So every method here:

* is safe to call concurrently: file I/O is positional (preadv/pwritev, fallocate on ranges) and
  shares no cursor; the memory backend copies slices of one mapping.  Overlapping concurrent
  writes land in some order, as they would on a disk; ordering is the client's business.
* moves data only through the caller's memoryview.  No per-request ``bytes`` is allocated for
  data, so the daemon's footprint stays a function of the pool, not of load.
* reports failures as ``OSError`` with the errno the server should map to an NBD error
  (EIO, ENOSPC, EPERM, EINVAL ...).

Range checking is the server's job (it must answer EINVAL/ENOSPC per the NBD spec before touching
storage).  Backends still refuse an out-of-range request with ``OSError(EINVAL)`` rather than an
``assert``: the check must survive ``python -O``, and a server bug must not write past the end
of a swap file into whatever the file system would let it grow into.

The file backend follows nbdkit's file plugin (research/nbd.md section 5): fdatasync for flush,
fallocate modes tried in order for zeroing, EOPNOTSUPP remembered so unsupported modes cost one
failed syscall per backend, not one per request.

Two questions copying clients ask are answered here too, for NBD's base:allocation and
FAST_ZERO: ``allocation`` says which parts of a range hold storage (the rest reads as zeros),
from what the backend knows at the cost of a few syscalls; and ``write_zeroes(fast=True)``
zeroes only where that is much cheaper than writing, and otherwise raises EOPNOTSUPP at once,
having changed nothing.

A file backend can also *fail* for good (``Backend.failure``): once it can no longer keep what it
acknowledges, every later write, trim, zero and flush gets EIO, so no client is told "durable"
about data that is not.  See FileBackend for when that happens.
"""

from __future__ import annotations

import abc
import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import stat
import threading
import time
from pathlib import Path
from typing import Callable

from netswap._pool import ffi, lib

from .groupcommit import GroupCommit

log = logging.getLogger(__name__)

__all__ = [
    "Backend",
    "FileBackend",
    "MemoryBackend",
    "SizeMismatchError",
]


class SizeMismatchError(OSError):
    """An existing backing file is not the size the configuration asks for.

    Raised instead of silently growing or truncating: a swap file that changed size under a node
    no longer matches the node's swap header (mkswap wrote the old size), and truncating would
    destroy data.  The operator decides (delete the file, or fix the configured size).
    """


# -- libc fallocate with modes ----------------------------------------------------------------
#
# os.posix_fallocate exists but takes no mode, and hole punching / zero-range need modes.  Bind
# libc's fallocate once at import: looking up a ctypes symbol per request would cost more than
# the syscall.  ctypes releases the GIL around the call, so a slow punch on one export does not
# stall the other worker threads.

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _bind_fallocate():
    # fallocate64 takes a 64-bit off_t even on 32-bit builds; on 64-bit glibc both are the same.
    fn = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
    if fn is None:
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


_libc_fallocate = _bind_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode; raises OSError (EOPNOTSUPP if libc has no fallocate)."""
    if _libc_fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available in this libc")
    while _libc_fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:  # os.* retries EINTR for us (PEP 475); ctypes does not
            raise OSError(err, os.strerror(err))


# One shared read-only buffer of zeros, the source for every zero-fill.  bytes(n) of this size is
# calloc'd from fresh mmap'd pages, and reading untouched anonymous pages maps the kernel's shared
# zero page, so it costs address space but (almost) no resident memory.
_ZERO_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_ZERO_CHUNK))


def _check_range(size: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise OSError(
            errno.EINVAL,
            f"request [{offset}, {offset + length}) outside export of {size} bytes",
        )


class Backend(abc.ABC):
    """The storage behind one export.  See the module docstring for the threading contract.

    ``view`` arguments are 1-D, C-contiguous byte memoryviews (format 'B'); lengths are taken from
    ``view.nbytes``.  Zero-length requests are accepted and do nothing (the NBD spec leaves them
    unspecified but says the server should not disconnect over them).

    ``close()`` must only be called once no other thread can still call into the backend (the
    registry closes backends at shutdown, after the server has drained).
    """

    size: int
    read_only: bool
    # Why this storage can no longer keep what it acknowledges (None while it can).  Once set it
    # stays set for the backend's life: only an operator, by repairing and restarting, clears it.
    failure: str | None = None

    @abc.abstractmethod
    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` completely with the bytes at ``offset``."""

    @abc.abstractmethod
    def write_from(self, offset: int, view: memoryview, fua: bool) -> None:
        """Write all of ``view`` at ``offset``; with ``fua``, durable before returning."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make everything written before this call durable."""

    def flush_then(self, done: Callable[[BaseException | None], None]) -> None:
        """flush() without waiting for it: `done(None)` once everything written before this
        call is durable, `done(error)` if that failed; called on this thread or another."""
        try:
            self.flush()
        except Exception as exc:
            done(exc)
        else:
            done(None)

    @abc.abstractmethod
    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Advisory: the client no longer needs this range; release its space if we can."""

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool,
                     fast: bool = False) -> None:
        """Make the range read back as zeros; with ``may_trim``, by releasing space if cheaper.
        With ``fast``, only if that is quicker than writing the zeros would be: otherwise
        raise ``OSError(EOPNOTSUPP)`` at once, with the range left as it was."""

    @abc.abstractmethod
    def cache(self, offset: int, length: int) -> None:
        """Prefetch hint; never fails for a valid range."""

    def allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """Which parts of the range hold storage: runs of ``(length, allocated)``, consecutive
        from ``offset``, at most ``limit`` of them (neighbours differ). A run that is not
        allocated reads back as zeros. The runs may end before the range does when finding
        more would cost too much (the caller asks again from there), but cover at least one
        byte of a nonempty range.

        This default knows nothing, and says so the safe way: all allocated."""
        _check_range(self.size, offset, length)
        return [(length, True)] if length else []

    @abc.abstractmethod
    def allocated_bytes(self) -> int:
        """Bytes of real storage the export uses now (for metrics; sparse holes do not count)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the storage handle.  Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _refuse_if_read_only(self) -> None:
        # The server should already have refused (the export advertises READ_ONLY), but the
        # backend is the last line: a read-only fd would give EBADF, which maps to no sensible NBD
        # error.  EPERM is what the NBD spec asks for on writes to a read-only export.
        if self.read_only:
            raise OSError(errno.EPERM, "export is read-only")


class FileBackend(Backend):
    """A regular file (usually sparse) or a block device.

    Opening and sizing:

    * ``create=False``: the path must exist.
    * ``create=True``: if the path does not exist, it is created with O_CREAT|O_EXCL, mode 0600
      (fchmod'ed, so the umask cannot change it), and ftruncate'd to ``size``: a sparse file that
      costs no disk until written.  If it already exists (a previous run's swap), it is reopened.
    * ``size=None`` takes the size of the existing file or device.  Otherwise an existing file of a
      different size raises :class:`SizeMismatchError`; we never grow or shrink it on our own
      (see that class for why).
    * ``follow_symlinks=False`` opens with O_NOFOLLOW: the registry uses it for per-node swap
      images so that a symlink planted in the swap directory cannot redirect a node's writes.

    Durability: flush is fdatasync, group-committed (groupcommit.py, cext/commit.h): a sync
    answers every flush waiting when it started, whichever connection sent it, syncs may
    overlap, and none is run when nothing was written since the latest began; FLUSHes that
    reach Python sync on its flusher threads, the C loop's on their connection's thread,
    sharing one record of the syncs running.  FUA writes use pwritev(RWF_DSYNC), which syncs just the
    written range in the same syscall; where the kernel or file system refuses RWF_DSYNC we fall
    back to fdatasync after the write (remembered per backend).  FUA on trim and write_zeroes is
    an fdatasync after the operation, as in nbdkit.

    Failing for good (``failure``), with one error log line, when:

    * a sync fails (fdatasync, or a write with RWF_DSYNC gives EIO).  The kernel reports a
      writeback error to each open file once and may drop the dirty pages, so a retry can
      succeed although acknowledged data is gone (the PostgreSQL "fsyncgate" lesson); after
      the first failure we cannot tell durable from lost, so we stop claiming either.
    * the file is deleted, renamed away or replaced under us.  Our descriptor keeps working on
      Linux, so nothing fails by itself, yet everything written would vanish (or be hidden by
      a fresh empty file) at the next start.  Checked after every sync (a group of FLUSHes,
      FUA: before it is acknowledged) and, for plain writes, at most every ``IDENTITY_CHECK_INTERVAL``
      seconds, which matters for swap: the kernel's swap-over-NBD never flushes.

    Reads keep working after a failure: the data is still reachable through our descriptor, and
    a node may still need to page it back in.  Errors that refuse a request before any data
    moves (EPERM from an immutable file, ENOSPC, EROFS) are answered per request and are not
    a failure: nothing acknowledged is at risk, and the operator may undo the cause.
    """

    IDENTITY_CHECK_INTERVAL = 1.0  # seconds

    def __init__(
        self,
        path: os.PathLike | str,
        size: int | None,
        read_only: bool,
        create: bool = False,
        *,
        follow_symlinks: bool = True,
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._fd = -1

        flags = os.O_CLOEXEC | (os.O_RDONLY if read_only else os.O_RDWR)
        if not follow_symlinks:
            flags |= os.O_NOFOLLOW
        created = False
        if create and not read_only:
            if size is None:
                raise ValueError(f"{self.path}: creating a backing file needs a size")
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
            except FileExistsError:
                fd = os.open(self.path, flags)
        else:
            fd = os.open(self.path, flags)

        try:
            if created:
                os.fchmod(fd, 0o600)
                os.ftruncate(fd, size)
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise OSError(errno.EINVAL, f"{self.path}: not a regular file or block device")
            # st_size is 0 for block devices; seeking to the end works for both.
            actual = os.lseek(fd, 0, os.SEEK_END)
            if size is not None and actual != size:
                raise SizeMismatchError(
                    errno.EINVAL,
                    f"{self.path} is {actual} bytes but the export is configured for {size}; "
                    f"remove the file or fix the configured size",
                )
        except BaseException:
            os.close(fd)
            if created:
                self.path.unlink(missing_ok=True)
            raise

        self._start(fd, actual, st, follow_symlinks)

    @classmethod
    def adopt(cls, fd: int, path: os.PathLike | str, *,
              on_failure: Callable[[], None] | None = None) -> "FileBackend":
        """A read-write backend over `fd`: a regular file its caller opened (O_RDWR, without
        following symlinks) and checked, which the backend owns from now on (swap/store.py:
        an NFS swap file). `on_failure` runs once, when the backend fails for good."""
        backend = cls.__new__(cls)
        backend.path = Path(path)
        backend.read_only = False
        st = os.fstat(fd)
        # NFS writes this file through descriptors of its own (nfs3.py, the NFS C loop), which
        # do not report their writes: every flush syncs.
        backend._start(fd, st.st_size, st, follow_symlinks=False, on_failure=on_failure,
                       tracks_writes=False)
        return backend

    def _start(self, fd: int, size: int, st: os.stat_result, follow_symlinks: bool,
               on_failure: Callable[[], None] | None = None, tracks_writes: bool = True) -> None:
        self._fd = fd
        self.size = size
        self._identity = (st.st_dev, st.st_ino)
        # The identity check looks the path up as it was opened: a static export may well be
        # a symlink (/dev/disk/by-id/...), and then the symlink's own inode is not ours.
        self._follow_symlinks = follow_symlinks
        self._on_failure = on_failure
        self._next_identity_check = 0.0
        self._failure_lock = threading.Lock()
        # 1 until the backend fails: the C request loop (nbd/fastloop.py) reads it before
        # each WRITE it would do itself, so a failure stops its writes as it stops ours.
        self.write_gate = ffi.new("int *", 1)
        # Set to 1 after every write (ours and the C loop's) completes, before it is replied;
        # the group commit clears it when a sync starts and skips syncs while it is clear.
        self.dirty = ffi.new("int *", 1)
        # Which syncs run and whether one failed, shared with the C request loop's FLUSHes
        # (cext/commit.h): the skip-when-clean rule lives there, for both sides at once.
        self.commit = ffi.gc(
            lib.commit_new(self.dirty if tracks_writes else ffi.NULL, self.write_gate),
            lib.commit_free)
        if self.commit == ffi.NULL:
            raise MemoryError("commit_new")
        # Batches the FLUSHes that reach Python on flusher threads; each batch is one
        # commit_sync, which decides whether it needs a sync of its own.
        self._commits = GroupCommit(self._flush_sync, f"flush-{self.path.name}")
        # Capabilities learnt by trying.  Plain bools written without a lock: the worst a race
        # does is one extra failed syscall on another thread.
        self._can_punch_hole = True
        self._can_zero_range = True
        self._can_allocate = True  # fallocate mode 0
        self._can_seek_data = True
        self._can_rwf_dsync = hasattr(os, "RWF_DSYNC")
        # On a block device ZERO_RANGE may be done by the kernel writing zeros (a device
        # without a write-zeroes command), so it does not count as fast there; PUNCH_HOLE
        # never falls back to writing (BLKDEV_ZERO_NOFALLBACK), and fallocate mode 0 is a
        # regular file's.
        self._block_device = stat.S_ISBLK(st.st_mode)

    # -- data ---------------------------------------------------------------------------------

    def read_into(self, offset: int, view: memoryview) -> None:
        length = view.nbytes
        _check_range(self.size, offset, length)
        done = 0
        while done < length:
            chunk = view if done == 0 else view[done:]
            got = os.preadv(self._fd, [chunk], offset + done)
            if got == 0:
                # EOF inside the export: the file was truncated behind our back.  A sparse file
                # reads zeros past its data, so behave as if the missing tail were a hole.
                _fill_zeros(view[done:])
                return
            done += got

    def write_from(self, offset: int, view: memoryview, fua: bool) -> None:
        self._refuse_if_read_only()
        length = view.nbytes
        _check_range(self.size, offset, length)
        if length == 0:
            return
        self._refuse_if_failed()
        if not fua:
            self._check_identity(every_interval=True)
        use_dsync = fua and self._can_rwf_dsync
        rwf = os.RWF_DSYNC if use_dsync else 0
        done = 0
        while done < length:
            chunk = view if done == 0 else view[done:]
            try:
                done += os.pwritev(self._fd, [chunk], offset + done, rwf)
            except OSError as e:
                if rwf and e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                    # Kernel without RWF_DSYNC (< 4.7) or without pwritev2: fall back for good.
                    self._can_rwf_dsync = False
                    use_dsync, rwf = False, 0
                    continue
                self.write_failed(e)
                raise
        self.dirty[0] = 1
        if fua:
            if not use_dsync:
                self._datasync()
            self._check_identity()

    def write_failed(self, error: OSError) -> None:
        """A write of ours (or of the C request loop, on our file) failed with `error`."""
        if error.errno == errno.EIO:
            # Under RWF_DSYNC this may be a writeback error that fdatasync would not
            # report again; without it, the page cache itself failed us.
            self._fail(f"write failed: {error.strerror}")

    def check_identity_due(self) -> None:
        """The interval check plain writes make, for writes done outside write_from (the C
        request loop's); a failure it finds is recorded, not raised."""
        try:
            self._check_identity(every_interval=True)
        except OSError:
            pass

    def check_identity_now(self) -> None:
        """The full check, for the C loop that found the file changed after a FLUSH's sync;
        a failure it finds is recorded, not raised."""
        try:
            self._check_identity()
        except OSError:
            pass

    @property
    def identity(self) -> tuple[Path, bool, int, int]:
        """What _check_identity compares, for the C loop's own check after its FLUSHes: the
        path, whether it is looked up through symlinks, and the file's st_dev and st_ino."""
        return (self.path, self._follow_symlinks) + self._identity

    def flush(self) -> None:
        if not self.read_only:  # nothing of ours can be dirty on a read-only fd
            self._commits.sync()

    def flush_then(self, done: Callable[[BaseException | None], None]) -> None:
        if self.read_only:
            done(None)
        else:
            self._commits.request(done)

    @property
    def syncs(self) -> int:
        """fdatasyncs run for flushes so far, here and in the C loop (FUA's are not counted)."""
        return lib.commit_syncs(self.commit)

    def _flush_sync(self) -> None:
        # On the flusher thread, for a group of flushes.
        self._refuse_if_failed()
        fd = self._fd
        if fd < 0:
            raise OSError(errno.EBADF, "backend is closed")
        synced = lib.commit_sync(self.commit, fd)  # the GIL is released meanwhile
        if synced < 0:
            error = OSError(ffi.errno, os.strerror(ffi.errno))
            self.sync_failed(error)
            raise error
        # After a sync, the full check; a batch the latest sync covered (none of its own),
        # the interval's, as plain writes have.
        self._check_identity(every_interval=not synced)

    def sync_failed(self, error: OSError) -> None:
        """A group-commit sync failed (ours, or the C loop's): the backend fails for good.
        The reason logged is the first failed sync's (a flush that found the latch set
        reports EIO, not why)."""
        first = lib.commit_failed(self.commit)
        self._fail(f"fdatasync failed: {os.strerror(first) if first else error.strerror}")

    def _datasync(self) -> None:
        fd = self._fd
        if fd < 0:  # os.fdatasync(-1) raises ValueError; every other call here gives EBADF
            raise OSError(errno.EBADF, "backend is closed")
        try:
            os.fdatasync(fd)
        except OSError as e:
            self._fail(f"fdatasync failed: {e.strerror}")
            raise

    # -- failing for good (see the class docstring) ---------------------------------------------

    def _refuse_if_failed(self) -> None:
        if self.failure is not None:
            raise OSError(errno.EIO, f"{self.path}: {self.failure}")

    def _check_identity(self, every_interval: bool = False) -> None:
        """Fail if the file we write is no longer the one at our path (so not the one the next
        start would open); with ``every_interval``, only if the last check is old enough."""
        if every_interval:
            now = time.monotonic()
            if now < self._next_identity_check:
                return
            self._next_identity_check = now + self.IDENTITY_CHECK_INTERVAL
        st = os.fstat(self._fd)
        if st.st_nlink == 0:
            self._fail("the backing file was deleted")
        else:
            try:
                at_path = os.stat(self.path, follow_symlinks=self._follow_symlinks)
            except FileNotFoundError:
                self._fail("the backing file was renamed away")
            else:
                if (at_path.st_dev, at_path.st_ino) != self._identity:
                    self._fail("the backing file was replaced")
        self._refuse_if_failed()

    def _fail(self, why: str) -> None:
        with self._failure_lock:
            if self.failure is not None:
                return
            self.failure = why
            self.write_gate[0] = 0
        log.error(
            "%s: %s; acknowledged writes may not survive, so from now on every write and flush "
            "of this export fails with EIO (reads still work); repair the storage and restart",
            self.path, why,
        )
        if self._on_failure is not None:
            self._on_failure()

    # -- space management ---------------------------------------------------------------------

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._refuse_if_read_only()
        _check_range(self.size, offset, length)
        if length == 0:
            return
        self._refuse_if_failed()
        if not self._can_punch_hole:
            return
        try:
            self._punch_hole(offset, length)
        except OSError as e:
            # Trim is advisory.  Like nbdkit, report only the errors that mean the storage is in
            # trouble or refuses us; anything else (EINVAL on some odd file system, ...) drops
            # the hint.
            if e.errno == errno.EIO:
                self._fail(f"trim failed: {e.strerror}")
            if e.errno in (errno.EIO, errno.EPERM):
                raise
            if e.errno != errno.EOPNOTSUPP:
                log.debug("%s: trim [%d, +%d) ignored: %s", self.path, offset, length, e)
            return
        self.dirty[0] = 1
        if fua:
            self._datasync()
            self._check_identity()

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool,
                     fast: bool = False) -> None:
        self._refuse_if_read_only()
        _check_range(self.size, offset, length)
        if length == 0:
            return
        self._refuse_if_failed()
        if not fua:
            self._check_identity(every_interval=True)
        try:
            self._zero(offset, length, may_trim, fast)
        except OSError as e:
            if e.errno == errno.EIO:
                self._fail(f"zeroing failed: {e.strerror}")
            raise
        self.dirty[0] = 1
        if fua:
            self._datasync()
            self._check_identity()

    def _zero(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        # Cheapest first, as nbdkit's file plugin does.  Each step that reports EOPNOTSUPP is
        # disabled for this backend and we fall through to the next.  Every step but the
        # last changes only metadata, which is what makes FAST_ZERO honest: a fast request
        # that reaches the last one is refused before it writes anything.
        if may_trim and self._can_punch_hole:
            try:
                return self._punch_hole(offset, length)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
        if self._can_zero_range and not (fast and self._block_device):
            try:
                return fallocate(
                    self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length
                )
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                self._can_zero_range = False
        if self._can_punch_hole and (may_trim or self._can_allocate) and not self._block_device:
            # No ZERO_RANGE (tmpfs, older file systems): punching reads back as zeros, and
            # fallocate(0) re-allocates so the client's NO_HOLE (may_trim=False) is honoured:
            # a later write to the range cannot fail with ENOSPC.
            try:
                self._punch_hole(offset, length)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
            else:
                if may_trim:
                    return
                try:
                    return fallocate(self._fd, 0, offset, length)
                except OSError as e:
                    # Not an error the client may see: WRITE_ZEROES without FAST_ZERO must
                    # not fail with ENOTSUP.  Writing the zeros below allocates the range.
                    if e.errno != errno.EOPNOTSUPP:
                        raise
                    self._can_allocate = False
        if fast:
            raise OSError(errno.EOPNOTSUPP,
                          f"{self.path}: zeroing here means writing the zeros, as a write does")
        self._write_zero_buffer(offset, length)

    def _punch_hole(self, offset: int, length: int) -> None:
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                self._can_punch_hole = False
            raise

    def _write_zero_buffer(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = os.pwrite(self._fd, _ZEROS[: min(_ZERO_CHUNK, end - offset)], offset)
            offset += n

    def cache(self, offset: int, length: int) -> None:
        _check_range(self.size, offset, length)
        if length:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """Data and holes as the file system reports them (lseek SEEK_DATA / SEEK_HOLE, two
        syscalls a run).  A hole reads as zeros, and so does the part of the range past the
        end of a file truncated under us (read_into).  Where the file system or device cannot
        tell, everything is data: the safe answer.

        lseek moves the descriptor's file offset, which nothing else here uses (all I/O is
        positional), so concurrent calls only race for a value nobody reads."""
        _check_range(self.size, offset, length)
        end = offset + length
        runs: list[tuple[int, bool]] = []
        position = offset
        # A run of zero length can only come from the file changing between two lseeks; the
        # bound keeps a file changing all the time from holding the worker.
        for _ in range(2 * limit + 2):
            if position >= end or len(runs) >= limit:
                break
            if not self._can_seek_data:
                runs.append((end - position, True))
                break
            try:
                data = os.lseek(self._fd, position, os.SEEK_DATA)
                hole = os.lseek(self._fd, data, os.SEEK_HOLE) if data == position else data
            except OSError as e:
                if e.errno == errno.ENXIO:
                    # No data at or after position: the rest is a hole, or past the end.
                    runs.append((end - position, False))
                    break
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                # A file system or device that cannot seek by data; remembered, so the
                # next call costs nothing.
                self._can_seek_data = False
                continue
            if data > position:
                stop, allocated = min(data, end), False
            else:
                stop, allocated = min(hole, end), True
            if stop > position:
                runs.append((stop - position, allocated))
                position = stop
        return runs

    def allocated_bytes(self) -> int:
        return os.fstat(self._fd).st_blocks * 512

    def fileno(self) -> int:
        """The backing file's descriptor (the C request loop works on a dup of it)."""
        return self._fd

    def close(self) -> None:
        if hasattr(self, "_commits"):  # not when __init__ failed before _start
            self._commits.close()
            lib.commit_close(self.commit)  # its C flushers (the GIL is released meanwhile)
        # Set -1 before closing: a late call from a stray thread then fails with EBADF instead of
        # hitting whatever file the kernel hands this fd number to next.
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"FileBackend({str(self.path)!r}, size={self.size}, {mode})"


class MemoryBackend(Backend):
    """An export held in this process's RAM ("remote RAM" for the nodes).

    Contents live only as long as the daemon: a restart loses them (the node sees a swap device
    full of zeros, i.e. it must be re-mkswap'ed; only use this where that is acceptable).

    The mapping is MAP_PRIVATE|MAP_ANONYMOUS, and that matters: ``mmap.mmap(-1, n)`` defaults to
    MAP_SHARED, which is shmem, where MADV_DONTNEED only unmaps pages from this process and the
    old data comes back on the next read.  On a private anonymous mapping MADV_DONTNEED frees the
    pages and later reads see zeros, which is exactly trim/write_zeroes.

    Pages are allocated by the kernel on first write (reads of never-written areas map the shared
    zero page), so an idle export costs address space only.  The mapping is made without
    MAP_NORESERVE, so the whole size is charged to the kernel's commit accounting at
    construction: a map larger than RAM + swap fails then (ENOMEM) even under the default
    heuristic overcommit, and with vm.overcommit_memory=2 so does any over-committed set of
    exports, instead of the OOM killer taking the daemon in the middle of a swap storm.

    Also, at construction:
      * MADV_DONTDUMP: node swap contents (secrets) must not land in the daemon's core dumps.
      * MADV_DONTFORK: a child process must not get a copy-on-write view of gigabytes of node swap.
      * MADV_NOHUGEPAGE: a 4 KiB swap write must not allocate a 2 MiB page where THP is "always".

    flush and FUA are no-ops, honestly: durability means "survives what this storage can
    survive", and RAM survives nothing more after an fdatasync than before.  Once the copy into
    the map returns, every connection sees the data, which is all CAN_MULTI_CONN needs.
    """

    def __init__(self, size: int, read_only: bool = False) -> None:
        if size <= 0:
            raise ValueError("memory export size must be positive")
        self.size = size
        # A read-only RAM export is all zeros forever; allowed so that config stays uniform.
        self.read_only = read_only
        self._map = mmap.mmap(
            -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        for advice in (mmap.MADV_DONTDUMP, mmap.MADV_DONTFORK, mmap.MADV_NOHUGEPAGE):
            try:
                self._map.madvise(advice)
            except OSError as e:  # e.g. a kernel built without THP rejects NOHUGEPAGE
                log.debug("memory export: madvise(%d) refused: %s", advice, e)
        # One long-lived view of the map; slicing it makes a small view object, never a copy.
        self._view = memoryview(self._map)
        self._address = _buffer_address(self._map)
        self._can_release = True  # False once the kernel refused MADV_DONTNEED (a locked map)

    def read_into(self, offset: int, view: memoryview) -> None:
        length = view.nbytes
        _check_range(self.size, offset, length)
        view[:] = self._view[offset : offset + length]

    def write_from(self, offset: int, view: memoryview, fua: bool) -> None:
        self._refuse_if_read_only()
        length = view.nbytes
        _check_range(self.size, offset, length)
        self._view[offset : offset + length] = view

    def flush(self) -> None:
        pass  # see the class docstring: nothing to make durable

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._refuse_if_read_only()
        _check_range(self.size, offset, length)
        self._release(offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool,
                     fast: bool = False) -> None:
        self._refuse_if_read_only()
        _check_range(self.size, offset, length)
        if may_trim:
            self._release(offset, length, fast)
        elif fast and length:
            # NO_HOLE keeps the pages, so every byte is written: exactly a WRITE's work.
            raise OSError(errno.EOPNOTSUPP, "zeroing memory that must stay allocated is a write")
        else:
            # NO_HOLE: the client wants the range to stay allocated (so a later write cannot fail
            # for lack of memory).  Writing zeros keeps the pages, at the cost of touching them.
            _fill_zeros(self._view[offset : offset + length])

    def _release(self, offset: int, length: int, fast: bool = False) -> None:
        # madvise works on whole pages.  Free the page-aligned interior, zero the partial pages
        # at either edge by hand (freeing them would lose the neighbouring bytes).  The
        # interior goes first, so that a fast request the kernel refuses has changed nothing.
        page = mmap.PAGESIZE
        end = offset + length
        first_full = -(-offset // page) * page
        last_full = end // page * page
        if first_full >= last_full:
            _fill_zeros(self._view[offset:end])  # within two pages: cheap, fast or not
            return
        if self._can_release:
            try:
                self._map.madvise(mmap.MADV_DONTNEED, first_full, last_full - first_full)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # The kernel refuses DONTNEED on locked pages, and under the daemon's
                # mlockall(MCL_FUTURE) this map is locked, for good: the pages stay (and stay
                # locked, as the daemon asked).
                self._can_release = False
        if not self._can_release:
            # The range must still read back as zeros, which costs as much as a write.
            if fast:
                raise OSError(errno.EOPNOTSUPP, "memory export is locked: zeroing it is a write")
            _fill_zeros(self._view[first_full:last_full])
        _fill_zeros(self._view[offset:first_full])
        _fill_zeros(self._view[last_full:end])

    def cache(self, offset: int, length: int) -> None:
        _check_range(self.size, offset, length)  # already in RAM

    def allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """Pages that hold data (as allocated_bytes counts them: written and not released
        since, in RAM or on the server's swap) are allocated; every other page reads as
        zeros.  One pass over /proc/self/pagemap, in whole pages, of at most
        _ALLOCATION_SCAN_PAGES pages a call, so a query over a huge export costs a bounded
        time (about a millisecond per GiB) and the client asks again for the rest."""
        _check_range(self.size, offset, length)
        if length == 0:
            return []
        page = mmap.PAGESIZE
        end = offset + length
        first = offset // page
        stop = min(-(-end // page), first + _ALLOCATION_SCAN_PAGES)
        # [held (0 or 1), pages] per run, over whole pages from `first`
        page_runs: list[list[int]] = []
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            start = first
            while start < stop:
                wanted = min(_PAGEMAP_WINDOW_PAGES, stop - start)
                held = _held_map(fd, self._address, start, wanted)
                if not _add_page_runs(page_runs, held, limit) or len(held) < wanted:
                    break
                start += wanted
        finally:
            os.close(fd)
        runs = []
        position = offset
        page_end = first * page
        for state, count in page_runs:
            page_end += count * page
            stop_at = min(page_end, end)
            if stop_at > position:
                runs.append((stop_at - position, bool(state)))
                position = stop_at
        return runs

    def allocated_bytes(self) -> int:
        """Bytes of the map holding data: pages written and not since released, whether in RAM
        or pushed to the server's own swap.  Reads of never-written areas cost nothing and do
        not count.  Reads /proc/self/pagemap (8 bytes per page: ~20 ms for 4 GiB), so it is for
        metrics at scrape time, not for the data path."""
        return _held_bytes(self._address, self.size)

    def close(self) -> None:
        if self._map.closed:
            return
        self._view.release()
        self._map.close()

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"MemoryBackend(size={self.size}, {mode})"


def _fill_zeros(view: memoryview) -> None:
    done, length = 0, view.nbytes
    while done < length:
        n = min(_ZERO_CHUNK, length - done)
        view[done : done + n] = _ZEROS[:n]
        done += n


# -- resident pages of a MemoryBackend, for allocated_bytes ----------------------------------
#
# /proc/self/pagemap has one little-endian u64 per virtual page.  In its top byte: bit 63
# "present", bit 62 "swapped", bit 56 "exclusively mapped".  A page we wrote is present and
# exclusive (mapcount 1; MADV_DONTFORK keeps it so).  A never-written page that was only read
# maps the kernel's shared zero page: present but not exclusive, and it costs nothing, so it is
# not counted.  (mincore(2) cannot tell those apart and over-counts after any full-device read.)
# Swapped-out pages still hold the export's data, on the server's swap, so they count.  None
# of these bits need privileges; only the PFN field does, and we do not read it.

_PAGEMAP_WINDOW_PAGES = 8192  # 32 MiB of map per read, 64 KiB of pagemap
_HELD = bytes(1 if (b & 0x81) == 0x81 or (b & 0x40) else 0 for b in range(256))
_HELD_PAGE, _NOT_HELD = b"\x01", b"\x00"
# Pages MemoryBackend.allocation looks at per call: 1 GiB of 4 KiB pages, 2 MiB of pagemap.
_ALLOCATION_SCAN_PAGES = 1 << 18


def _buffer_address(buf) -> int:
    # from_buffer pins the mmap only while the ctypes object lives; it dies at the end of this
    # expression, so the map can still be closed later.  The address stays valid until then.
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _held_map(fd: int, address: int, first: int, count: int) -> bytes:
    """One byte per page of the `count` pages from page `first` of the mapping at `address`:
    1 if it holds data, else 0 (see above)."""
    page = mmap.PAGESIZE
    entries = os.pread(fd, count * 8, (address // page + first) * 8)
    return entries[7::8].translate(_HELD)  # the top byte of each entry


def _add_page_runs(runs: list[list[int]], held: bytes, limit: int) -> bool:
    """Extend `runs` ([held, pages] pairs) by the pages of `held` (_held_map); False once a
    run past `limit` would begin (the runs kept are then whole)."""
    index = 0
    while index < len(held):
        state = held[index]
        # bytes.find runs in C: the work here is per run, not per page.
        other = held.find(_NOT_HELD if state else _HELD_PAGE, index)
        count = (other if other >= 0 else len(held)) - index
        if runs and runs[-1][0] == state:
            runs[-1][1] += count
        elif len(runs) == limit:
            return False
        else:
            runs.append([state, count])
        index += count
    return True


def _held_bytes(address: int, size: int) -> int:
    page = mmap.PAGESIZE
    total_pages = -(-size // page)
    held = 0
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for first in range(0, total_pages, _PAGEMAP_WINDOW_PAGES):
            n = min(_PAGEMAP_WINDOW_PAGES, total_pages - first)
            held += _held_map(fd, address, first, n).count(1)
    finally:
        os.close(fd)
    return held * page
