"""Pool buffers for one connection's requests: where they may come from, and waiting for one.

A connection *tagged* emergency (serving swap, or accepted from a swap node's address) may
take a buffer from its group's reservation when the normal budget is gone; an untagged one
never touches the reserve. A wait for the pool stops the connection's reader, so the
client's excess waits in TCP buffers (backpressure), not in our memory; the wait ends in
`Stopping` when the connection or the daemon is stopping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..reserve.tree import POOL_WAITS
from ..transport.backpressure import wait_for_buffer

if TYPE_CHECKING:
    from ..counters import Counters


class Stopping(Exception):
    """The daemon (or the connection) is stopping while a connection waited for the pool."""


class BufferAllocator:
    def __init__(self, pool, counters: Counters, *, tagged: bool, swap: bool,
                 stopping: Callable[[], bool]) -> None:
        self._pool = pool
        self._counters = counters
        self._tagged = tagged  # may buffers come from the reserve?
        self._swap = swap  # for the pool_waits label: who was held back
        self._stopping = stopping

    def alloc(self, size: int, group, wait: bool):
        """A buffer of `size` bytes, from `group`'s reservation if this connection is tagged
        and normal memory is gone. With `wait`, waits while the pool has nothing; without,
        returns None at once."""
        emergency = self._tagged and group is not None
        group = group if emergency else None
        buffer = self._pool.alloc(size, emergency=emergency, group=group)
        if buffer is not None or not wait:
            return buffer
        # Held back: counted once per request, by who was held.
        self._counters.inc(POOL_WAITS, "swap" if self._swap else "non_swap")
        buffer = wait_for_buffer(self._pool, size, self._stopping, emergency=emergency,
                                 group=group)
        if buffer is None:
            raise Stopping()
        return buffer
