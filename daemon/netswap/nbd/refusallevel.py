"""The log level of one connection's refusals (options in the handshake, requests after it).

A connection's first refused option or request is logged at info, later ones at debug: bad
input shows at the default level, but a client sending it in a loop cannot flood the log
(its counters still count every one).
"""

from __future__ import annotations

import logging


class RefusalLogLevel:
    def __init__(self) -> None:
        self._logged = False

    def next(self) -> int:
        """The level to log the refusal at hand with."""
        if self._logged:
            return logging.DEBUG
        self._logged = True
        return logging.INFO
