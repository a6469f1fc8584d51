"""Log lines about what a client can repeat at line rate: refused connections, malformed
arguments, refused calls, JUKEBOX drops, refused MNTs. The first of each kind in a second is logged at its
level, so bad input shows at the default level; the rest of that second go to DEBUG, so a
client sending it in a loop cannot flood the log. The counters still count every one.

A kind is a short label from a fixed set chosen by the caller (a procedure name, a counter
reason), never client data: the table stays as small as that set.
"""

from __future__ import annotations

import logging
import time

INTERVAL = 1.0  # seconds between two lines of one kind at their own level


class RefusalLog:
    __slots__ = ("_logger", "_last")

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._last: dict[str, float] = {}  # kind -> when a line of it was last logged at level

    def log(self, kind: str, level: int, message: str, *args) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is None or now - last >= INTERVAL:
            self._last[kind] = now  # a race between workers costs at most one more line
        else:
            level = logging.DEBUG
        self._logger.log(level, message, *args)
