"""Python face of the request-memory pool (cext/pool.c)."""

from netswap.reserve.pool import Buffer, LockError, Pool, PoolError, PoolGroup, ReserveError

__all__ = ["Buffer", "LockError", "Pool", "PoolError", "PoolGroup", "ReserveError"]
