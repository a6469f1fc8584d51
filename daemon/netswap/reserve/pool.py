"""The request-memory pool: the only source of payload buffers on the data path.

One anonymous arena, prefaulted and (normally) mlocked when the daemon starts,
carved by the C buddy allocator in cext/pool.c.  Serving a request then never
touches the heap, so it cannot fault or push the host into reclaim while the
host may itself be short of memory.

A Buffer is a writable memoryview slice of the arena; hand it to
``socket.recv_into``, ``os.preadv``/``os.pwritev`` and ``socket.sendmsg``
directly, and release it once the reply is sent.
"""

from __future__ import annotations

import errno
import logging
import operator
import os

from netswap._pool import ffi, lib

log = logging.getLogger("netswap.pool")

_LOCK_MODES = {
    "off": lib.POOL_LOCK_OFF,
    "best-effort": lib.POOL_LOCK_BEST_EFFORT,
    "required": lib.POOL_LOCK_REQUIRED,
}
_STAT_FIELDS = tuple(name for name, _ in ffi.typeof("struct pool_stats").fields)
_MAX_TIMEOUT_NS = 2**63 - 1
_LOCK_ADVICE = (
    "raise RLIMIT_MEMLOCK for netswapd (e.g. LimitMEMLOCK=infinity in its systemd unit) "
    "or grant it CAP_IPC_LOCK"
)


class PoolError(Exception):
    """A pool operation was refused (closed pool, double release, busy close)."""


class LockError(PoolError):
    """The pool could not be mlocked and its lock mode is "required"."""


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
    or log a warning and run unlocked) or "off".
    """

    block_size: int = lib.POOL_BLOCK_SIZE

    def __init__(self, size: int, lock: str = "required"):
        size = operator.index(size)
        if size <= 0:
            raise ValueError(f"pool size must be positive, not {size}")
        try:
            lock_mode = _LOCK_MODES[lock]
        except KeyError:
            raise ValueError(f"lock must be one of {', '.join(_LOCK_MODES)}, not {lock!r}") from None

        lock_errno = ffi.new("int *")
        handle = lib.pool_create(size, lock_mode, lock_errno)
        if handle == ffi.NULL:
            create_errno = ffi.errno
            if lock_errno[0]:
                raise LockError(_lock_failure(_round_up(size, self.block_size), lock_errno[0]))
            raise PoolError(f"cannot create a {size}-byte pool: {os.strerror(create_errno)}")
        # pool_destroy runs when the Pool is collected; live Buffers keep it alive.
        self._handle = ffi.gc(handle, lib.pool_destroy)
        self.size: int = lib.pool_size(handle)
        self.max_alloc: int = lib.pool_max_alloc(handle)
        if lock_errno[0]:
            log.warning("running with an unlocked pool: %s", _lock_failure(self.size, lock_errno[0]))
        # One view for the arena's lifetime; a Buffer's view is a slice of it,
        # which costs far less than an ffi.buffer per allocation.
        self._arena = memoryview(ffi.buffer(lib.pool_base(handle), self.size))

    @property
    def locked_bytes(self) -> int:
        return lib.pool_locked_bytes(self._handle)

    @property
    def locked(self) -> bool:
        return self.locked_bytes == self.size

    def alloc(
        self, size: int, *, timeout: float | None = 0.0, emergency: bool = False
    ) -> Buffer | None:
        """Allocate ``size`` bytes, or return None if nothing fits in time.

        ``timeout``: 0 fails at once, a positive number of seconds waits up
        to that long for a release, None waits as long as it takes.
        ``emergency`` marks a request serving swap; it is passed to the
        allocator but has no effect until the pool has a watermark.
        """
        if not 0 < size <= self.max_alloc:
            raise ValueError(f"allocation size must be in 1..{self.max_alloc}, not {size}")
        if timeout == 0:
            timeout_ns = 0
        elif timeout is None:
            timeout_ns = -1
        elif timeout > 0:
            timeout_ns = min(max(int(timeout * 1e9), 1), _MAX_TIMEOUT_NS)
        else:
            raise ValueError(f"timeout must be >= 0 or None, not {timeout}")
        flags = lib.POOL_EMERGENCY if emergency else 0

        offset = lib.pool_alloc(self._handle, size, flags, timeout_ns)
        if offset < 0:
            err = ffi.errno
            if err in (errno.ENOMEM, errno.ETIMEDOUT):
                return None
            if err == errno.ESHUTDOWN:
                raise PoolError("pool is closed")
            raise PoolError(f"allocation of {size} bytes failed: {os.strerror(err)}")
        return Buffer(self, offset, size, self._arena[offset : offset + size], False)

    def _free(self, offset: int) -> None:
        if lib.pool_free(self._handle, offset) != 0:
            raise PoolError(f"offset {offset} is not an allocated block")

    def stats(self) -> dict[str, int]:
        """A consistent snapshot of the allocator's counters."""
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


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def _lock_failure(size: int, lock_errno: int) -> str:
    return (
        f"cannot mlock the {size}-byte pool: {os.strerror(lock_errno)} "
        f"({errno.errorcode.get(lock_errno, lock_errno)}); {_LOCK_ADVICE}"
    )
