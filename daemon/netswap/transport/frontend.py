"""The skeleton of a network service, the same for NBD, NFS, MOUNT and the portmapper:
listeners, one acceptor thread, admission, the open connections and their threads, and one
stop that closes them all and waits for their threads.

A front end composes a FrontEnd and gives it one callback, `open_connection(listener, sock,
address, client)`, that makes the protocol's connection for an admitted socket and returns it with
the function its thread runs. The connection calls `closed(connection, client)` when that
function ends.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..counters import declare
from ..refusals import RefusalLog
from .acceptor import CONNECTIONS_REFUSED, Acceptor
from .admission import ConnectionLimits
from .listeners import PASSED_UNIX_SOCKETS

C_LOOP_HANDOFFS = declare(
    "transport", "c_loop_handoffs", "netswap_c_loop_handoffs_total",
    "Times the C request loop handed a connection to the Python path, by reason (python: "
    "a request only Python serves; queued_reply: a reply that had to wait for the socket; "
    "write_error: a failed write; sync_error: a FLUSH whose sync failed or whose file is "
    "no longer at its path; the NFS call loop's nfs_python, nfs_queued_reply, "
    "nfs_io_error likewise, nfs_scrubbed: a WRITE whose swap file was wiped while it was "
    "being received, nfs_scratch_moved: a scratch WRITE whose file left its path while it "
    "was being received).",
    label="reason")
INTERNAL_ERRORS = declare(
    "transport", "internal_errors", "netswap_internal_errors_total",
    "Connections closed by a bug in netswapd (logged with a traceback).")


def client_address(sock: socket.socket, address) -> str:
    """What connection limits count by: the peer's address, or "unix" for a Unix socket."""
    return address[0] if sock.family in (socket.AF_INET, socket.AF_INET6) else "unix"


# open_connection(listener, sock, address, client) -> (connection, what its thread runs)
OpenConnection = Callable[[socket.socket, socket.socket, object, str],
                          tuple[object, Callable[[], None]]]


class FrontEnd:
    """One service's listeners, acceptor, admission and open connections."""

    def __init__(self, name: str, log: logging.Logger, counters,
                 limits: Optional[ConnectionLimits], open_connection: OpenConnection,
                 client_of: Callable[[socket.socket, object], str] = client_address) -> None:
        """`name`: the service, for thread names and log lines; `limits`: the admission
        limits to count in (None: none); `client_of(sock, address)`: the client key the
        limits count by."""
        self.name = name
        self.counters = counters
        self.limits = limits
        self._open_connection = open_connection
        self._client_of = client_of
        self.refusals = RefusalLog(log)  # refused connections and calls: never a log flood
        self.listeners: list[socket.socket] = []
        self.stopping = False
        self._connections: set = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._acceptor: Optional[Acceptor] = None

    # Start and stop -------------------------------------------------------------

    def start(self, listeners: Iterable[socket.socket]) -> None:
        """Open the listeners (all or none: `listeners` is a generator, so a failure closes
        those it made so far and propagates), then start accepting."""
        try:
            for listener in listeners:
                self.listeners.append(listener)
        except BaseException:
            self.close_listeners()
            raise
        self._acceptor = Acceptor(f"{self.name}-accept", self.listeners, self._accept,
                                  self.counters)
        self._acceptor.start()

    def stop(self, close: Callable[[object], None], timeout: float) -> bool:
        """Stop accepting, `close` every open connection, and wait up to `timeout` seconds
        for their threads: a connection's thread ends only when its requests have replied.
        True if all ended in time."""
        self.stopping = True
        if self._acceptor is not None:
            self._acceptor.stop()  # no connection starts after this
        self.close_listeners()
        with self._lock:
            connections = list(self._connections)
            threads = list(self._threads)
        for connection in connections:
            close(connection)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    def accepting(self) -> bool:
        return not self.stopping and self._acceptor is not None and self._acceptor.is_alive()

    def close_listeners(self) -> None:
        """Close the listeners; a Unix socket's path goes with it."""
        for listener in self.listeners:
            path = (listener.getsockname()
                    if listener.family == socket.AF_UNIX and listener not in PASSED_UNIX_SOCKETS
                    else None)
            listener.close()
            if path:
                try:
                    Path(path).unlink()
                except FileNotFoundError:
                    pass
        self.listeners.clear()

    # Connections ----------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def connections(self) -> list:
        """A snapshot of the open connections."""
        with self._lock:
            return list(self._connections)

    def closed(self, connection, client: str) -> None:
        """`connection`'s thread is ending (called on that thread)."""
        with self._lock:
            self._connections.discard(connection)
            self._threads.discard(threading.current_thread())
        if self.limits is not None:
            self.limits.release(client)

    def _accept(self, listener: socket.socket, sock: socket.socket, address) -> None:
        client = self._client_of(sock, address)
        refusal = self.limits.admit(client) if self.limits is not None else None
        if refusal is not None:
            # Closed before anything is read: the client sees a clean close, we spend no
            # thread and no buffer.
            sock.close()
            self.counters.inc(CONNECTIONS_REFUSED, refusal)
            self.refusals.log(refusal, logging.WARNING,
                              "%s: refusing connections from %s: %s reached (%s refused so far)",
                              self.name, client, refusal,
                              self.counters.get("connections_refused", refusal))
            return
        try:
            sock.setblocking(True)
            connection, run = self._open_connection(listener, sock, address, client)
            thread = threading.Thread(target=run, name=f"{self.name} {connection.peer}",
                                      daemon=True)
            with self._lock:
                self._connections.add(connection)
                self._threads.add(thread)
        except BaseException:
            if self.limits is not None:
                self.limits.release(client)
            sock.close()
            raise
        thread.start()
