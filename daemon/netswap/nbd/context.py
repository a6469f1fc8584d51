"""What an NBD connection is given by the server that accepted it: one `ConnectionContext`.

A connection needs settings (as they were when it was accepted: a reload reaches new
connections only) and the daemon-wide parts it shares with every other connection (the
pool, the workers, the send poller, the counters, the pressure throttle). They are handed
over in this one object, so a connection never reads its server's attributes and the list
below is the whole of what it depends on.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from ..access import AccessControl
    from ..counters import Counters
    from ..netpolicy import SocketPolicy
    from ..pressure import PressureMonitor
    from ..transport.workers import WorkerPool
    from .connection import Connection
    from .handshake import BlockLimits
    from ..transport.sender import SendPoller


@dataclass(frozen=True)
class ConnectionContext:
    # Settings, fixed for the connection's life.
    settings: Any  # the `nbd` config section
    block_limits: BlockLimits  # what the handshake advertises
    tls_context: Optional[ssl.SSLContext]  # None when TLS is off on every listener
    swap_socket_policy: SocketPolicy  # how a connection serving swap is tagged
    non_swap_waits: bool  # a non-swap request waits for the pool (else ENOMEM)
    # Shared with every connection.
    access: AccessControl  # who may open which export
    pool: Any  # the buffer pool (netswap._pool)
    unrouted: Any  # the pool group charged for tagged connections of non-swap exports
    counters: Counters
    workers: WorkerPool
    send_poller: SendPoller
    pressure: Optional[PressureMonitor]  # None when pressure.enabled is false
    non_swap_throttle: threading.Semaphore  # non-swap requests one at a time under pressure
    non_swap_fast_gate: Any  # int * read by the C loops of non-swap connections
    stopping: Callable[[], bool]  # is the daemon shutting down?
    closed: Callable[[Connection], None]  # called once, when the connection has ended


def connection_context(server) -> ConnectionContext:
    """The context of a connection `server` (an NbdServer) accepts now."""
    return ConnectionContext(
        settings=server.config.nbd,
        block_limits=server.block_limits,
        tls_context=server.tls_context,
        swap_socket_policy=server.swap_socket_policy,
        non_swap_waits=server.non_swap_waits,
        access=server.access,
        pool=server.pool,
        unrouted=server.lifecycle.unrouted,
        counters=server.counters,
        workers=server.workers,
        send_poller=server.send_poller,
        pressure=server.pressure,
        non_swap_throttle=server.non_swap_throttle,
        non_swap_fast_gate=server.non_swap_fast_gate,
        stopping=lambda: server.stopping,
        closed=server.connection_closed,
    )
