"""One thread accepting connections on a set of listening sockets, for the NBD and the NFS
side alike.

stop() ends it at once through a pipe the loop also waits on (a select timeout would delay
every stop by up to that timeout). A failed accept (EMFILE, a client gone before it was
taken) is logged and counted, and the loop goes on serving the clients it has.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
from typing import Callable, Optional

from ..counters import declare

CONNECTIONS_REFUSED = declare(
    "transport", "connections_refused", "netswap_connections_refused_total",
    "Client connections refused before their handshake, by reason (a connection limit, or "
    "accept_error: accept(2) failed, e.g. EMFILE).",
    label="reason")

log = logging.getLogger("netswap")


class Acceptor:
    def __init__(self, name: str, listeners: list[socket.socket],
                 on_accept: Callable[[socket.socket, socket.socket, object], None],
                 counters) -> None:
        """`on_accept(listener, sock, address)` takes each accepted connection (on the
        acceptor's thread); `name` is the thread's name and the log lines' prefix."""
        self._name = name
        self._listeners = listeners
        self._on_accept = on_accept
        self._counters = counters
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting; when this returns, no connection is taken any more."""
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        for listener in self._listeners:
            listener.setblocking(False)
            selector.register(listener, selectors.EVENT_READ)
        try:
            while not self._stopping:
                for key, _ in selector.select():
                    if key.fileobj == self._wake_r:
                        return
                    self._accept(key.fileobj)
        finally:
            selector.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. EMFILE: log, keep serving the clients we have
            self._counters.inc(CONNECTIONS_REFUSED, "accept_error")
            log.warning("%s: accept on %s failed: %s", self._name, listener.getsockname(), exc)
            return
        self._on_accept(listener, sock, address)
