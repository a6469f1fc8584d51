"""Waiting for pool memory as backpressure.

A reader that finds the pool empty waits for a buffer instead of reading on: the client's
data stays in the socket and TCP slows the client down. The wait must still end when the
connection closes or the daemon stops, so it polls the pool in slices of ALLOC_POLL and asks
between them whether to give up.
"""

from __future__ import annotations

from typing import Callable

# How long one blocked allocation waits before the reader checks for a close or the stop.
ALLOC_POLL = 0.5


def wait_for_buffer(pool, size: int, stopped: Callable[[], bool], **how):
    """A pool buffer of `size` (`how`: pool.alloc's emergency and group), waiting as long
    as the pool has none; None once `stopped()` says to give up."""
    buffer = None
    while buffer is None:
        if stopped():
            return None
        buffer = pool.alloc(size, timeout=ALLOC_POLL, **how)
    return buffer
