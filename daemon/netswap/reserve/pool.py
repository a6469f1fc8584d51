"""The request-memory pool: the only source of payload buffers on the data path.

One anonymous arena, prefaulted and (normally) mlocked when the daemon starts,
carved by the C buddy allocator in cext/pool.c.  Serving a request then never
touches the heap, so it cannot fault or push the host into reclaim while the
host may itself be short of memory.

The prefault (faulting in gigabytes takes seconds) can run in the background
(``background=True``, what the daemon does): the pool then hands out only
memory already faulted in and locked, as if it were as large as what is
faulted in so far, and a group's connect waits until its reservation is
backed (see PoolGroup.connect).

A Buffer is a writable memoryview slice of the arena; hand it to
``socket.recv_into``, ``os.preadv``/``os.pwritev`` and ``socket.sendmsg``
directly, and release it once the reply is sent.

The reserve (the kernel's swap-over-network design, mirrored): a PoolGroup
reserves bytes for one consumer that must keep going when memory is short.
Connecting it raises the pool's watermark by its reservation; normal
allocations never take the free bytes below the watermark, and an emergency
allocation charged to a connected group may, up to that group's reservation.
The charge, the block and the watermark check are one step in C.
"""

from __future__ import annotations

import errno
import logging
import operator
import os
import threading
import time

from netswap._pool import ffi, lib

log = logging.getLogger("netswap.pool")

_LOCK_MODES = {
    "off": lib.POOL_LOCK_OFF,
    "best-effort": lib.POOL_LOCK_BEST_EFFORT,
    "required": lib.POOL_LOCK_REQUIRED,
}
_STAT_FIELDS = tuple(name for name, _ in ffi.typeof("struct pool_stats").fields)
_PREFAULT_FIELDS = tuple(name for name, _ in ffi.typeof("struct pool_prefault_stats").fields)
# Prefault threads by default: faulting in is mostly the kernel zeroing pages, which scales
# with cores until memory bandwidth runs out (with huge pages one thread nearly gets there),
# and one core is left to the daemon starting meanwhile. Measured on 2 vCPUs, 4 GiB:
# huge pages 0.57 s with 1 thread, 0.51 s with 2; 4 KiB pages 2.4 s and 1.8 s
# (bench/RESULTS.md).
DEFAULT_PREFAULT_THREADS = max(1, min(4, (os.cpu_count() or 1) - 1))
_GROUP_STAT_FIELDS = tuple(name for name, _ in ffi.typeof("struct pool_group_stats").fields)
_MAX_TIMEOUT_NS = 2**63 - 1
# Module constants: a global is cheaper than the attribute lookups they stand
# for, and alloc runs once per request.
_EMERGENCY = lib.POOL_EMERGENCY
_NULL = ffi.NULL
# pool_alloc's "came from the reserve" out-parameter, one per thread: making
# one per call (ffi.new) costs more than the C allocation itself.
_per_thread = threading.local()
_LOCK_ADVICE = (
    "raise RLIMIT_MEMLOCK for netswapd (e.g. LimitMEMLOCK=infinity in its systemd unit) "
    "or grant it CAP_IPC_LOCK"
)


class PoolError(Exception):
    """A pool operation was refused (closed pool, double release, busy close)."""


class LockError(PoolError):
    """The pool could not be mlocked and its lock mode is "required"."""


class ReserveError(PoolError):
    """The pool cannot back a reservation: a group cannot connect, or no group slot is left."""


class Buffer:
    """One allocation from a Pool.

    ``view`` is a writable memoryview of exactly ``size`` bytes (the size
    asked for; the block behind it may be larger).  ``emergency`` says whether
    the memory came from the reserve below the watermark.
    """

    __slots__ = ("offset", "size", "view", "emergency", "_pool")

    def __init__(self, pool: Pool, offset: int, size: int, view: memoryview, emergency: bool):
        self.offset = offset
        self.size = size
        self.view = view
        self.emergency = emergency
        self._pool: Pool | None = pool

    def release(self) -> None:
        """Return the memory to the pool; ``view`` is unusable afterwards.

        Raises PoolError if already released, or if something still holds an
        export of ``view`` (e.g. a recv_into in progress on another thread).
        """
        pool = self._pool
        if pool is None:
            raise PoolError(f"buffer at offset {self.offset} was already released")
        # Releasing the view first makes a stale reference fail loudly instead
        # of reading or writing the next request's data.  (Slices taken from
        # the view stay valid: they must not outlive the buffer.)
        try:
            self.view.release()
        except BufferError as exc:
            raise PoolError(f"buffer at offset {self.offset} is still exported: {exc}") from exc
        self._pool = None
        pool._free(self.offset)

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._pool is None else "held"
        return f"<Buffer offset={self.offset} size={self.size} emergency={self.emergency} {state}>"


class Pool:
    """A fixed arena of ``size`` bytes (rounded up to ``block_size``).

    ``lock`` is "required" (mlock or raise LockError), "best-effort" (mlock
    or log a warning and run unlocked) or "off".  ``min_normal`` is the
    normal budget that connecting groups may never take: a connect that would
    raise the watermark above ``size - min_normal`` raises ReserveError.

    ``prefault_threads`` threads fault the arena in.  The constructor waits
    for them, unless ``background``: then it returns at once and the pool
    grows, from nothing, as they go; ``wait_prefaulted`` waits for the end.
    """

    block_size: int = lib.POOL_BLOCK_SIZE
    max_groups: int = lib.POOL_MAX_GROUPS

    def __init__(self, size: int, lock: str = "required", *, min_normal: int = 0,
                 background: bool = False, prefault_threads: int | None = None):
        size = operator.index(size)
        min_normal = operator.index(min_normal)
        if size <= 0:
            raise ValueError(f"pool size must be positive, not {size}")
        if not 0 <= min_normal <= size:
            raise ValueError(f"min_normal must be in 0..{size} (the pool size), not {min_normal}")
        try:
            lock_mode = _LOCK_MODES[lock]
        except KeyError:
            raise ValueError(f"lock must be one of {', '.join(_LOCK_MODES)}, not {lock!r}") from None

        if prefault_threads is None:
            prefault_threads = DEFAULT_PREFAULT_THREADS
        if not 1 <= prefault_threads <= lib.POOL_MAX_PREFAULT_THREADS:
            raise ValueError(f"prefault_threads must be in 1..{lib.POOL_MAX_PREFAULT_THREADS}, "
                             f"not {prefault_threads}")

        lock_errno = ffi.new("int *")
        handle = lib.pool_create(size, lock_mode, prefault_threads, bool(background), lock_errno)
        if handle == ffi.NULL:
            create_errno = ffi.errno
            if lock_errno[0]:
                raise LockError(_lock_failure(_round_up(size, self.block_size), lock_errno[0]))
            raise PoolError(f"cannot create a {size}-byte pool: {os.strerror(create_errno)}")
        # pool_destroy runs when the Pool is collected; live Buffers keep it alive.
        self._handle = ffi.gc(handle, lib.pool_destroy)
        self.size: int = lib.pool_size(handle)
        self.max_alloc: int = lib.pool_max_alloc(handle)
        # The arena is locked (on fault: page by page as the prefault faults it in).
        self.lock_applied: bool = lock_mode != lib.POOL_LOCK_OFF and not lock_errno[0]
        if lock_errno[0]:
            log.warning("running with an unlocked pool: %s", _lock_failure(self.size, lock_errno[0]))
        # One view for the arena's lifetime; a Buffer's view is a slice of it,
        # which costs far less than an ffi.buffer per allocation.
        self._arena = memoryview(ffi.buffer(lib.pool_base(handle), self.size))
        # Cannot fail: no group is connected yet and min_normal <= size.
        lib.pool_set_min_normal(handle, min_normal)
        self.min_normal = min_normal
        # Serialises connects and disconnects, so that a refusal's message
        # shows the watermark C decided on, not one a concurrent call moved.
        # They happen on attach and detach only, never per request.
        self._membership = threading.Lock()

    @property
    def locked_bytes(self) -> int:
        """Bytes of the arena locked in RAM (faulted in so far, if the arena is locked)."""
        return lib.pool_locked_bytes(self._handle)

    @property
    def locked(self) -> bool:
        """Is all of the arena faulted in and locked?"""
        return self.locked_bytes == self.size

    def prefault_stats(self) -> dict[str, int]:
        """Where the prefault is: ``faulted_bytes`` (given to the allocator so far),
        ``running`` (threads still at it, 0 once it ended) and ``elapsed_ns`` (since it
        started, until it ended)."""
        snapshot = ffi.new("struct pool_prefault_stats *")
        lib.pool_prefault_stats(self._handle, snapshot)
        return {name: getattr(snapshot, name) for name in _PREFAULT_FIELDS}

    @property
    def faulted_bytes(self) -> int:
        return self.prefault_stats()["faulted_bytes"]

    def wait_faulted(self, nbytes: int, timeout: float | None = None) -> bool:
        """Wait until ``nbytes`` of the arena (at most its size) are faulted in.  True once
        they are; False on timeout.  Raises PoolError if the pool is closed first."""
        if lib.pool_prefault_wait(self._handle, min(max(nbytes, 0), self.size),
                                  _timeout_ns(timeout)) == 0:
            return True
        if ffi.errno == errno.ETIMEDOUT:
            return False
        raise PoolError("pool is closed")

    def wait_prefaulted(self) -> None:
        """Wait for the prefault to end (and join its threads).  Raises PoolError if the pool
        was closed before the whole arena was faulted in."""
        if lib.pool_prefault_join(self._handle) != 0:
            raise PoolError("pool is closed")

    @property
    def watermark(self) -> int:
        """Free bytes normal allocations leave: the connected groups' reservations."""
        return self.stats()["watermark"]

    def group(self, reservation: int) -> PoolGroup:
        """A new, disconnected group that may hold up to ``reservation`` bytes of the reserve.

        Raises ReserveError if all ``max_groups`` slots are taken.
        """
        reservation = operator.index(reservation)
        if reservation < 0:
            raise ValueError(f"reservation must be >= 0, not {reservation}")
        group_id = lib.pool_group_create(self._handle, reservation)
        if group_id < 0:
            err = ffi.errno
            if err == errno.ENOSPC:
                raise ReserveError(f"no group slot left: the pool has {self.max_groups}, all in use")
            raise PoolError(f"cannot create a group: {os.strerror(err)}")
        return PoolGroup(self, group_id, reservation)

    def alloc(
        self,
        size: int,
        *,
        timeout: float | None = 0.0,
        emergency: bool = False,
        group: PoolGroup | None = None,
    ) -> Buffer | None:
        """Allocate ``size`` bytes, or return None if nothing fits in time.

        ``timeout``: 0 fails at once, a positive number of seconds waits up
        to that long for a release (or for ``group``'s usage to drop), None
        waits as long as it takes.

        Normal memory (above the watermark) is used first.  When it is gone,
        an ``emergency`` allocation with a connected ``group`` is served from
        the reserve, charged to the group while its usage stays within its
        reservation; the Buffer's ``emergency`` is then True.  ``group`` is
        ignored unless ``emergency`` is set.
        """
        if not 0 < size <= self.max_alloc:
            raise ValueError(f"allocation size must be in 1..{self.max_alloc}, not {size}")
        timeout_ns = _timeout_ns(timeout)
        if emergency and group is not None:
            if group._pool is not self:
                raise ValueError(f"{group!r} belongs to another pool")
            try:
                out = _per_thread.from_reserve
            except AttributeError:
                out = _per_thread.from_reserve = ffi.new("int *")
            offset = lib.pool_alloc(self._handle, size, _EMERGENCY, group.id, timeout_ns, out)
            from_reserve = out[0] == 1
        else:
            # Cannot be served from the reserve: no out-parameter to fill.
            flags = _EMERGENCY if emergency else 0
            offset = lib.pool_alloc(self._handle, size, flags, -1, timeout_ns, _NULL)
            from_reserve = False
        if offset < 0:
            err = ffi.errno
            if err in (errno.ENOMEM, errno.ETIMEDOUT):
                return None
            if err == errno.ESHUTDOWN:
                raise PoolError("pool is closed")
            if err == errno.EINVAL and group is not None:
                raise PoolError(f"{group!r} was destroyed")
            raise PoolError(f"allocation of {size} bytes failed: {os.strerror(err)}")
        return Buffer(self, offset, size, self._arena[offset : offset + size], from_reserve)

    def adopt(self, offset: int, size: int, emergency: bool) -> Buffer:
        """The Buffer for a block C code allocated (the NBD request loop hands over a
        request it cannot finish); releasing it frees the block as usual."""
        return Buffer(self, offset, size, self._arena[offset : offset + size], emergency)

    @property
    def handle(self):
        """The C pool, for C code that allocates from it (cext/nbdfast.c)."""
        return self._handle

    def _free(self, offset: int) -> None:
        if lib.pool_free(self._handle, offset) != 0:
            raise PoolError(f"offset {offset} is not an allocated block")

    def stats(self) -> dict[str, int]:
        """A consistent snapshot of the allocator's counters.

        ``failures`` and ``waits`` count allocations the pool limited (the
        watermark, or no block of the size); those a group's reservation
        limited are in that group's ``charge_failures`` and ``charge_waits``.
        """
        snapshot = ffi.new("struct pool_stats *")
        lib.pool_get_stats(self._handle, snapshot)
        return {name: getattr(snapshot, name) for name in _STAT_FIELDS}

    def close(self) -> None:
        """Unmap the arena.  Refused while any buffer is held; idempotent."""
        if lib.pool_close(self._handle) != 0:
            in_use = self.stats()["in_use_bytes"]
            raise PoolError(f"cannot close the pool: {in_use} bytes are still in use")
        self._arena.release()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PoolGroup:
    """A reservation group (a leaf of the reserve tree): one slot in the C pool's table.

    Made by ``Pool.group``, disconnected.  ``connect`` adds ``reservation``
    to the pool's watermark; from then on emergency allocations charged to
    this group may use up to ``reservation`` bytes below it.  ``disconnect``
    takes it out again (reserve blocks it holds stay charged until released);
    ``destroy`` frees the slot once it is disconnected and idle.
    """

    __slots__ = ("id", "reservation", "_pool", "_destroyed")

    def __init__(self, pool: Pool, group_id: int, reservation: int):
        self.id = group_id
        self.reservation = reservation
        self._pool = pool
        self._destroyed = False

    def connect(self, timeout: float | None = None) -> None:
        """Raise the pool's watermark by the reservation; no-op if connected.

        Raises ReserveError if the pool cannot cover it (watermark +
        reservation > size - min_normal).  While the pool is still being faulted
        in, first waits until the reservation is backed (the free memory faulted
        in covers the new watermark, or min_normal + the new watermark are
        faulted in), up to ``timeout`` seconds (None: as long as the prefault
        takes); raises ReserveError if it is not backed by then.
        """
        pool = self._pool
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with pool._membership:
                if lib.pool_group_connect(pool._handle, self.id) == 0:
                    return
                err = ffi.errno
                if err == errno.ENOSPC:
                    watermark = pool.watermark
                    break
            if err != errno.EAGAIN:
                self._raise(err, "connect")
            # Outside the lock: other groups may connect and disconnect meanwhile.
            log.debug("group %d waits for the pool to back its %d-byte reservation (prefault "
                      "at %d of %d bytes)", self.id, self.reservation, pool.faulted_bytes,
                      pool.size)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if lib.pool_group_wait_backed(pool._handle, self.id, _timeout_ns(left)) != 0:
                err = ffi.errno
                if err == errno.ETIMEDOUT:
                    raise ReserveError(
                        f"the {self.reservation}-byte reservation of group {self.id} is not "
                        f"backed after {timeout} s: the pool has faulted in "
                        f"{pool.faulted_bytes} of {pool.size} bytes")
                self._raise(err, "connect")
        raise ReserveError(
            f"cannot reserve {self.reservation} bytes for group {self.id}: watermark "
            f"{watermark} + {self.reservation} = {watermark + self.reservation} > pool size "
            f"{pool.size} - min_normal {pool.min_normal} = {pool.size - pool.min_normal}"
        )

    def disconnect(self) -> None:
        """Lower the pool's watermark by the reservation; no-op if not connected."""
        with self._pool._membership:
            if lib.pool_group_disconnect(self._pool._handle, self.id) != 0:
                self._raise(ffi.errno, "disconnect")

    def destroy(self) -> None:
        """Free the group's slot.  Refused (PoolError) while connected, while it
        holds reserve memory, or while an allocation waits on it."""
        if lib.pool_group_destroy(self._pool._handle, self.id) == 0:
            self._destroyed = True
            return
        err = ffi.errno
        if err == errno.EBUSY:
            s = self.stats()
            raise PoolError(
                f"cannot destroy group {self.id}: "
                f"{'connected' if s['connected'] else 'disconnected'}, usage {s['usage']} bytes "
                "(it must be disconnected, with no reserve memory held or awaited)"
            )
        self._raise(err, "destroy")

    @property
    def connected(self) -> bool:
        return bool(self.stats()["connected"])

    def stats(self) -> dict[str, int]:
        """A consistent snapshot of the group's counters (``connected`` as a bool)."""
        snapshot = ffi.new("struct pool_group_stats *")
        if lib.pool_group_stats(self._pool._handle, self.id, snapshot) != 0:
            self._raise(ffi.errno, "read the stats of")
        stats = {name: getattr(snapshot, name) for name in _GROUP_STAT_FIELDS}
        stats["connected"] = bool(stats["connected"])
        return stats

    def _raise(self, err: int, action: str) -> None:
        if err == errno.EINVAL:
            raise PoolError(f"cannot {action} group {self.id}: it was destroyed")
        if err == errno.ESHUTDOWN:
            raise PoolError(f"cannot {action} group {self.id}: the pool is closed")
        raise PoolError(f"cannot {action} group {self.id}: {os.strerror(err)}")

    def __repr__(self) -> str:
        state = "destroyed" if self._destroyed else "live"
        return f"<PoolGroup id={self.id} reservation={self.reservation} {state}>"


def _timeout_ns(timeout: float | None) -> int:
    """A timeout in seconds (0: none, None: forever) as the C pool takes it."""
    if timeout == 0:
        return 0
    if timeout is None:
        return -1
    if timeout > 0:
        return min(max(int(timeout * 1e9), 1), _MAX_TIMEOUT_NS)
    raise ValueError(f"timeout must be >= 0 or None, not {timeout}")


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def _lock_failure(size: int, lock_errno: int) -> str:
    return (
        f"cannot mlock the {size}-byte pool: {os.strerror(lock_errno)} "
        f"({errno.errorcode.get(lock_errno, lock_errno)}); {_LOCK_ADVICE}"
    )
