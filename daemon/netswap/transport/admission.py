"""Admission at accept: the connection limits of one service and their per-client counts.

A connection over a limit is closed before anything is read from it, so a flood costs no
thread and no buffer. Each front end has its own limits (nbd.max_connections*,
nfs.max_connections* for NFS and MOUNT together), so a flood on one service cannot lock swap
nodes out of the other.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Optional


class ConnectionLimits:
    """At most `max_connections` open connections, `max_per_client` of them from one client
    address, counted over every front end that shares this object."""

    def __init__(self, max_connections: int, max_per_client: int,
                 labels: tuple[str, str]) -> None:
        """`labels`: what a refusal by each limit is counted and logged as (the config keys)."""
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self._labels = labels
        self._open = 0
        self._per_client: Counter[str] = Counter()  # open connections by client address
        self._lock = threading.Lock()

    def admit(self, client: str) -> Optional[str]:
        """Count a new connection from `client` in, or say which limit refuses it (its
        label). Only acceptor threads add connections, so the answer holds until they do."""
        with self._lock:
            if self._open >= self.max_connections:
                return self._labels[0]
            if self._per_client[client] >= self.max_per_client:
                return self._labels[1]
            self._open += 1
            self._per_client[client] += 1
        return None

    def release(self, client: str) -> None:
        with self._lock:
            self._open -= 1
            self._per_client[client] -= 1
            if not self._per_client[client]:
                del self._per_client[client]  # the table holds open clients only
