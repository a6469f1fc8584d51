"""Event counters of the daemon (refused handshakes, protocol errors, I/O errors, ...).

The data path only increments; readers (logs today, the Prometheus collector later) take a
snapshot. A lock keeps `+=` on the shared Counter exact across worker threads; it is held
for one dictionary update, never across I/O.
"""

from __future__ import annotations

import threading
from collections import Counter


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: Counter[tuple[str, str]] = Counter()

    def inc(self, name: str, label: str = "", amount: int = 1) -> None:
        with self._lock:
            self._values[(name, label)] += amount

    def get(self, name: str, label: str = "") -> int:
        with self._lock:
            return self._values[(name, label)]

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._values)
