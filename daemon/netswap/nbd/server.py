"""The NBD front end: its listeners (TCP over IPv4 and IPv6, and a Unix socket) and its
connections, on the transport's FrontEnd (accept, admission, stop/join).

Each accepted client gets its own reader thread (`Connection.run`); requests are executed by
the daemon's `WorkerPool`, and replies a client is slow to take are finished by the NBD side's
own `SendPoller` (nbd.send_timeout), both given by the daemon.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Optional

from netswap._pool import ffi

from ..access import AccessControl, peer_identity
from ..counters import Counters, declare
from ..netpolicy import swap_socket_policy
from ..swap.nodes import in_networks
from ..transport.admission import ConnectionLimits
from ..transport.frontend import FrontEnd
from ..transport.listeners import keep_alive, tcp_listener, unix_listener
from ..transport.sender import SendPoller
from ..transport.workers import WorkerPool
from .connection import Connection
from .context import connection_context
from .handshake import BlockLimits
from .tls import server_context

CONNECTIONS_ACCEPTED = declare(
    "nbd", "connections_accepted", "netswap_connections_accepted_total",
    "Client connections accepted.")
CONNECTIONS_CLOSED = declare(
    "nbd", "connections_closed", "netswap_connections_closed_total",
    "NBD client connections closed.")

log = logging.getLogger("netswap.nbd")


class NbdServer:
    def __init__(self, config, pool, registry, lifecycle, workers: WorkerPool,
                 send_poller: SendPoller, counters: Optional[Counters] = None,
                 pressure=None, *, access: AccessControl, tls_context=None) -> None:
        """`workers`: the daemon's, shared with the NFS front end; `send_poller`: the NBD
        clients' own, whose send timeout follows nbd.send_timeout (apply_config)."""
        self.pool = pool
        self.registry = registry
        self.lifecycle = lifecycle
        self.access = access  # who may open which export (allow lists, swap binding)
        self.pressure = pressure  # a PressureMonitor, or None when pressure.enabled is false
        self.counters = counters or Counters()
        self.workers = workers
        self.send_poller = send_poller
        self.frontend = FrontEnd("nbd", log, self.counters,
                                 ConnectionLimits(config.nbd.max_connections,
                                                  config.nbd.max_connections_per_client,
                                                  ("max_connections", "max_connections_per_client")),
                                 self._open)
        self.apply_config(config, tls_context)
        # Under memory pressure non-swap requests pass one at a time (see RequestReader._throttle in reader.py).
        self.non_swap_throttle = threading.Semaphore(1)
        # What the C request loops of non-swap connections read before each request: 0 while
        # emergency mode holds non-swap requests to the Python path (and its throttle).
        self.non_swap_fast_gate = ffi.new("int *", 1)
        if pressure is not None:
            self._follow_pressure(pressure)

    def _follow_pressure(self, pressure) -> None:
        chained = pressure.on_change

        def on_change(emergency: bool) -> None:
            self.non_swap_fast_gate[0] = 0 if emergency else 1
            if chained is not None:
                chained(emergency)

        pressure.on_change = on_change
        self.non_swap_fast_gate[0] = 0 if pressure.emergency else 1

    def apply_config(self, config, tls_context=None) -> None:
        """Take (new) settings; connections read them when they start, so open ones keep
        what they began with and only new connections see a reload. `tls_context` is
        nbd.tls.server_context(config.nbd) when the caller built it already (a reload checks
        the files before applying anything); otherwise it is built here (ConfigError)."""
        self.tls_context = tls_context if tls_context is not None else server_context(config.nbd)
        nbd = config.nbd
        self.block_limits = BlockLimits(nbd.block_size_min, nbd.block_size_preferred, nbd.max_request)
        self.swap_socket_policy = swap_socket_policy(config)
        self.node_networks = config.swap.node_networks
        # What a non-swap request gets when the normal budget is gone: a wait (the reader
        # stops reading: TCP backpressure) or ENOMEM. Never the reserve.
        self.non_swap_waits = config.pool.non_swap_exhausted == "wait"
        self.frontend.limits.max_connections = nbd.max_connections
        self.frontend.limits.max_per_client = nbd.max_connections_per_client
        self.send_poller.send_timeout = nbd.send_timeout
        self.config = config

    # Start and stop -------------------------------------------------------------

    def start(self) -> None:
        """Bind every listener (or fail naming the address), then start accepting."""
        self.frontend.start(self._listeners())

    def _listeners(self):
        for host, port in self.config.nbd.listen:
            yield tcp_listener(host, port, "nbd.listen")
        if self.config.nbd.unix_socket is not None:
            yield unix_listener(self.config.nbd.unix_socket, "nbd.unix_socket")

    @property
    def addresses(self) -> list[str]:
        """Where the server listens, as 'host:port' or a socket path (after start)."""
        out = []
        for sock in self.frontend.listeners:
            name = sock.getsockname()
            if sock.family == socket.AF_UNIX:
                out.append(name)
            elif sock.family == socket.AF_INET6:
                out.append(f"[{name[0]}]:{name[1]}")
            else:
                out.append(f"{name[0]}:{name[1]}")
        return out

    @property
    def stopping(self) -> bool:
        return self.frontend.stopping

    def stop(self, timeout: float) -> bool:
        """Stop accepting, let in-flight requests finish, and return True if all did in time."""
        return self.frontend.stop(Connection.stop, timeout)

    def healthy(self, timeout: float) -> bool:
        """Still accepting, and the I/O workers still run jobs within `timeout`."""
        return self.frontend.accepting() and self.workers.responsive(timeout)

    def connection_closed(self, connection: Connection) -> None:
        self.frontend.closed(connection, connection.client)
        self.counters.inc(CONNECTIONS_CLOSED)

    @property
    def connection_count(self) -> int:
        return self.frontend.connection_count

    def connections(self) -> list[Connection]:
        """A snapshot of the open connections."""
        return self.frontend.connections()

    def drop_node(self, node: str) -> int:
        """Close every connection attached to `node`'s swap export; return how many."""
        dropped = [c for c in self.connections() if getattr(c.export, "node", None) == node]
        for connection in dropped:
            connection.close_now()
        return len(dropped)

    # Accepting ------------------------------------------------------------------

    def _open(self, listener: socket.socket, sock: socket.socket, address, client: str):
        """The Connection for an admitted socket, and what its thread runs."""
        tagged = False
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Replies are small and latency-bound; never let Nagle hold one back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keep_alive(sock, self.config.nbd.keepalive)
            peer = f"{address[0]}:{address[1]}" if sock.family == socket.AF_INET else f"[{address[0]}]:{address[1]}"
            tagged = self._is_swap_node(address[0])
        else:
            peer = f"unix:{listener.getsockname()}"
        connection = Connection(connection_context(self), sock, peer, client,
                                peer_identity(sock, address), tagged)
        self.counters.inc(CONNECTIONS_ACCEPTED)
        log.debug("%s: connected", peer)
        return connection, connection.run

    def _is_swap_node(self, host: str) -> bool:
        """Is the peer a swap node by address (swap.node_networks)? Its socket is then tagged
        before its export is known, as the kernel marks a swap socket, not a request."""
        if not self.node_networks:
            return False
        return in_networks(host, self.node_networks)
