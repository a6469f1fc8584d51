"""The transport's metrics: the events it declared (refused connections, send timeouts,
C-loop hand-offs, socket tagging, internal errors) for both front ends."""

from __future__ import annotations

from typing import Iterator

from ..metrics import event_families


class TransportCollector:
    def __init__(self, counters) -> None:
        self._counters = counters

    def collect(self) -> Iterator:
        yield from event_families(self._counters, "transport")
