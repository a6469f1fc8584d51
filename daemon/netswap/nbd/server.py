"""The NBD server transport: listening sockets, the accept loop and the live connections.

One acceptor thread waits on every listening socket (TCP over IPv4 and IPv6, and a Unix
socket) with a selector, plus a wake-up pipe so that `stop()` can end it at once. Each
accepted client gets its own reader thread (`Connection.run`); requests are executed by the
shared `WorkerPool`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from netswap._pool import ffi

from ..access import AccessControl, peer_identity
from ..acceptor import Acceptor
from ..counters import Counters
from ..netpolicy import SocketPolicy
from ..refusals import RefusalLog
from ..reserve.tree import socket_buffer_size
from ..unixsock import bind_unix
from ..workers import WorkerPool
from .connection import Connection
from .handshake import BlockLimits
from .sender import ReplySender, SendPoller
from .tls import server_context

log = logging.getLogger("netswap.nbd")

_BACKLOG = 128


class ListenError(OSError):
    """A listening socket could not be set up; the message names the address."""


class NbdServer:
    def __init__(self, config, pool, registry, lifecycle, counters: Optional[Counters] = None,
                 pressure=None, *, access: AccessControl, tls_context=None) -> None:
        self.pool = pool
        self.registry = registry
        self.lifecycle = lifecycle
        self.access = access  # who may open which export (allow lists, swap binding)
        self.pressure = pressure  # a PressureMonitor, or None when pressure.enabled is false
        self.counters = counters or Counters()
        self.apply_config(config, tls_context)
        # Under memory pressure non-swap requests pass one at a time (see Connection._throttle).
        self.non_swap_throttle = threading.Semaphore(1)
        # What the C request loops of non-swap connections read before each request: 0 while
        # emergency mode holds non-swap requests to the Python path (and its throttle).
        self.non_swap_fast_gate = ffi.new("int *", 1)
        if pressure is not None:
            self._follow_pressure(pressure)
        self.workers: Optional[WorkerPool] = None
        self.send_poller: Optional[SendPoller] = None
        self.stopping = False
        self._listeners: list[socket.socket] = []
        self._unix_path: Optional[Path] = None
        self._connections: set[Connection] = set()
        self._per_client: Counter[str] = Counter()  # open connections by client address
        self._refusals = RefusalLog(log)  # a connection flood is not a log flood
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._acceptor: Optional[Acceptor] = None

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
        nbd, network = config.nbd, config.network
        self.block_limits = BlockLimits(nbd.block_size_min, nbd.block_size_preferred, nbd.max_request)
        buffer_size = socket_buffer_size(config)
        self.swap_socket_policy = SocketPolicy(
            priority=network.priority, dscp=network.dscp, mark=network.mark,
            sndbuf=buffer_size, rcvbuf=buffer_size,
        )
        self.node_networks = config.swap.node_networks
        # What a non-swap request gets when the normal budget is gone: a wait (the reader
        # stops reading: TCP backpressure) or ENOMEM. Never the reserve.
        self.non_swap_waits = config.pool.non_swap_exhausted == "wait"
        if getattr(self, "send_poller", None) is not None:
            self.send_poller.send_timeout = nbd.send_timeout
        self.config = config

    # Start and stop -------------------------------------------------------------

    def start(self) -> None:
        """Bind every listener (or fail naming the address), then start accepting."""
        try:
            for host, port in self.config.nbd.listen:
                self._listeners.append(tcp_listener(host, port))
            if self.config.nbd.unix_socket is not None:
                self._listeners.append(self._unix_listener(self.config.nbd.unix_socket))
        except BaseException:
            self._close_listeners()
            raise
        self.workers = WorkerPool(self.config.daemon.workers)
        self.send_poller = SendPoller(self.config.nbd.send_timeout, self._send_timed_out)
        self._acceptor = Acceptor("acceptor", self._listeners, self._accept, self.counters)
        self._acceptor.start()

    @property
    def addresses(self) -> list[str]:
        """Where the server listens, as 'host:port' or a socket path (after start)."""
        out = []
        for sock in self._listeners:
            name = sock.getsockname()
            if sock.family == socket.AF_UNIX:
                out.append(name)
            elif sock.family == socket.AF_INET6:
                out.append(f"[{name[0]}]:{name[1]}")
            else:
                out.append(f"{name[0]}:{name[1]}")
        return out

    def stop(self, timeout: float) -> bool:
        """Stop accepting, let in-flight requests finish, and return True if all did in time."""
        self.stopping = True
        if self._acceptor is not None:
            self._acceptor.stop()
        self._close_listeners()
        with self._lock:
            connections = list(self._connections)
            threads = list(self._threads)
        for connection in connections:
            connection.stop()
        deadline = time.monotonic() + timeout
        clean = True
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            clean = clean and not thread.is_alive()
        if self.workers is not None and clean:
            self.workers.stop()
        if self.send_poller is not None and clean:
            self.send_poller.stop()
        return clean

    def healthy(self, timeout: float) -> bool:
        """Still accepting, and the I/O workers still run jobs within `timeout`."""
        if self.stopping or self._acceptor is None or not self._acceptor.is_alive():
            return False
        return self.workers.responsive(timeout)

    def _send_timed_out(self, sender: ReplySender) -> None:
        self.counters.inc("send_timeouts")
        log.warning("%s: took no replies for %.0f s: disconnecting", sender.peer,
                    self.send_poller.send_timeout)
        sender.cut_off()

    def connection_closed(self, connection: Connection) -> None:
        with self._lock:
            self._connections.discard(connection)
            self._threads.discard(threading.current_thread())
            self._per_client[connection.client] -= 1
            if not self._per_client[connection.client]:
                del self._per_client[connection.client]  # the table holds open clients only
        self.counters.inc("connections_closed")

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def connections(self) -> list[Connection]:
        """A snapshot of the open connections."""
        with self._lock:
            return list(self._connections)

    def drop_node(self, node: str) -> int:
        """Close every connection attached to `node`'s swap export; return how many."""
        dropped = [c for c in self.connections() if getattr(c.export, "node", None) == node]
        for connection in dropped:
            connection.close_now()
        return len(dropped)

    # Accepting ------------------------------------------------------------------

    def _accept(self, listener: socket.socket, sock: socket.socket, address) -> None:
        client = address[0] if sock.family in (socket.AF_INET, socket.AF_INET6) else "unix"
        refusal = self._admit(client)
        if refusal is not None:
            # Closed before the greeting: the client sees a clean close, we spend no thread.
            sock.close()
            self.counters.inc("connections_refused", refusal)
            self._log_refusal(refusal, client)
            return
        sock.setblocking(True)
        tagged = False
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Replies are small and latency-bound; never let Nagle hold one back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keep_alive(sock, self.config.nbd.keepalive)
            peer = f"{address[0]}:{address[1]}" if sock.family == socket.AF_INET else f"[{address[0]}]:{address[1]}"
            tagged = self._is_swap_node(address[0])
        else:
            peer = f"unix:{listener.getsockname()}"
        connection = Connection(self, sock, peer, tagged)
        connection.client = client
        connection.identity = peer_identity(sock, address)
        thread = threading.Thread(target=connection.run, name=f"conn {peer}", daemon=True)
        with self._lock:
            self._connections.add(connection)
            self._threads.add(thread)
            self._per_client[client] += 1
        self.counters.inc("connections_accepted")
        log.debug("%s: connected", peer)
        thread.start()

    def _admit(self, client: str) -> Optional[str]:
        """Why a new connection from `client` must be refused, or None to take it. Only the
        acceptor thread adds connections, so the answer holds until it does."""
        nbd = self.config.nbd
        with self._lock:
            if len(self._connections) >= nbd.max_connections:
                return "max_connections"
            if self._per_client[client] >= nbd.max_connections_per_client:
                return "max_connections_per_client"
        return None

    def _log_refusal(self, reason: str, client: str) -> None:
        self._refusals.log(reason, logging.WARNING,
                           "refusing connections from %s: %s reached (%s refused so far)",
                           client, reason, self.counters.get("connections_refused", reason))

    def _is_swap_node(self, host: str) -> bool:
        """Is the peer a swap node by address (swap.node_networks)? Its socket is then tagged
        before its export is known, as the kernel marks a swap socket, not a request."""
        if not self.node_networks:
            return False
        address = ipaddress.ip_address(host.split("%", 1)[0])
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.node_networks)

    # Listeners ------------------------------------------------------------------

    def _unix_listener(self, path: Path) -> socket.socket:
        try:
            sock = bind_unix(path, 0o660, "nbd.unix_socket")
            sock.listen(_BACKLOG)
        except OSError as exc:
            raise ListenError(str(exc)) from exc
        self._unix_path = Path(path)
        return sock

    def _close_listeners(self) -> None:
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        if self._unix_path is not None:
            try:
                self._unix_path.unlink()
            except FileNotFoundError:
                pass
            self._unix_path = None


def keep_alive(sock: socket.socket, idle: float) -> None:
    """Notice a client that vanished without a word (a node that lost power sends no reset):
    probe after `idle` seconds of silence, 3 probes `idle`/3 apart, and give up on data it
    has not acknowledged for 2 x `idle`. The reader then sees ETIMEDOUT and the connection
    ends like any lost one, freeing its buffers and, after the grace, the node's reserve."""
    seconds = max(1, round(idle))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, seconds // 3))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 2 * seconds * 1000)


def tcp_listener(host: str, port: int, key: str = "nbd.listen") -> socket.socket:
    """A listening TCP socket on host:port; a failure names the config `key` it came from."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if host in ("", "*"):
        family, address = socket.AF_INET6, "::"
    elif host == "localhost":
        family, address = socket.AF_INET, "127.0.0.1"
    else:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        address = host
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "Any" listens on both families; an explicit IPv6 address only on IPv6.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host in ("", "*") else 1)
        sock.bind((address, port))
        sock.listen(_BACKLOG)
    except OSError as exc:
        raise ListenError(f"{key}: cannot listen on {shown}: {exc.strerror}") from exc
    return sock
