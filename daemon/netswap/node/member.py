"""One nbd device of a node: N sockets on one server's export `swap/<name>`, held by the kernel,
and the dead ones the agent is replacing.

A Member does its part of the agent's work one step at a time, so that one agent can tend
two of them (mirror mode) from one loop: `lost()` records dead sockets, `step()` makes one
try at bringing a new one, and says when to try next. Before a socket goes to the kernel,
the member reads a page through it and asks its `identity` whether the export still holds
what was put there at attach (the swap header, or the md superblock of the node's mirror):
a wiped or replaced export is never handed to the kernel, whose held requests would read it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Protocol

from ..nbd import constants as C
from ..nbd.client import ClientHandshake, OptionRefused, SimpleReplyReader, read_request
from ..nbd.errors import ProtocolError
from .config import format_server
from .swaparea import PAGE

log = logging.getLogger("netswap.node")

HANDSHAKE_TIMEOUT = 10.0
# Seconds between reconnect tries, the last repeated: a restarting netswapd is back within
# seconds, and every second of waiting is a second the node's swap I/O is held.
BACKOFF = (0.5, 1.0, 1.0, 1.0, 2.0, 2.0, 5.0)
# A mirror member's kernel timer for a dead connection is set this much later than the agent's
# own deadline (dead_conn_timeout), at which the agent marks the member faulty in md and only
# then disconnects it: md must know the member is faulty before its held writes fail, or its
# thread narrows each failed write down sector by sector, allocating bios as it goes, which
# with the node's memory gone to swap deadlocked a node here. The kernel's timer fires only if
# the agent is not there to act.
MIRROR_KERNEL_GRACE = 5
# The kernel marks a socket dead when its receive fails; the agent's copy may see the hang-up
# first. A RECONFIGURE answered ENOSPC that soon after a hang-up is retried, not believed.
HANGUP_GRACE = 15.0
ENOSPC_RETRY = 0.2
NEGOTIATION_ERRORS = (OSError, OptionRefused, ProtocolError)


class AreaGone(Exception):
    """The export does not hold what this member put there at attach any more."""


def export_name(name: str) -> str:
    return f"swap/{name}"


class Identity(Protocol):
    """What says an export still holds this node's data: the page at `offset`, checked by
    `found_in` (None: it matches; else what the export holds instead). swaparea.SwapHeader
    for a plain device, mdraid.MdMember for a member of the node's mirror."""

    offset: int

    def found_in(self, page: bytes) -> str | None: ...


@dataclass
class Try:
    """What a step did: `filled` a dead slot, `done` (no dead slot left), or neither; the
    monotonic time of the next step when there is one to take."""

    filled: bool = False
    done: bool = False
    next_at: float | None = None


class Member:
    def __init__(self, node: str, host: str, port: int, config) -> None:
        self.node = node
        self.host, self.port = host, port
        self.config = config
        self.server = format_server((host, port))
        self.export = export_name(node)
        self.index: int | None = None
        self.size = 0
        self.connections = config.connections
        self.alive = 0
        self.reconnects = 0
        self.backend_identifier: str | None = None
        self.identity: Identity | None = None
        self.copies: dict[int, socket.socket] = {}  # our dup of each socket the kernel has
        # The dead slots being filled: how many, since when, why, the tries so far.
        self.missing = 0
        self.reason = ""
        self.dead_since = 0.0
        self.hung_up_at = 0.0
        self.tries = 0
        self.next_try = 0.0
        self.last_error: str | None = None

    @property
    def device(self) -> str:
        return f"/dev/nbd{self.index}"

    # -- attach -------------------------------------------------------------------------------

    def open_sockets(self) -> list:
        """`connections` sockets negotiated on the export; raises one of NEGOTIATION_ERRORS
        (nothing left open) when the server is down or refuses (ERR_POLICY: full)."""
        opened = []
        try:
            for _ in range(self.connections):
                opened.append(self.open_socket())
        except BaseException:
            for sock, _ in opened:
                sock.close()
            raise
        export = opened[0][1]
        if self.connections > 1 and not export.transmission_flags & C.TFLAG_CAN_MULTI_CONN:
            for sock, _ in opened:
                sock.close()
            raise ProtocolError(f"{self.server} does not allow several connections to one "
                                "export (no CAN_MULTI_CONN)")
        return opened

    def connect(self, netlink, opened) -> None:
        """Hand the sockets of open_sockets() to the kernel: a new nbd device."""
        export = opened[0][1]
        self.backend_identifier = (f"netswap:{self.server}/{self.export}"
                                   if netlink.has_backend_identifier else None)
        self.index = netlink.connect(
            [sock.fileno() for sock, _ in opened], size=export.size, block_size=PAGE,
            server_flags=export.transmission_flags, timeout=int(self.config.io_timeout),
            dead_conn_timeout=self.kernel_dead_conn_timeout(),
            backend_identifier=self.backend_identifier)
        self.size = export.size
        self.alive = self.connections = len(opened)
        for sock, _ in opened:
            self.keep_copy(sock)
        wait_for_device(self.device, export.size)

    def kernel_dead_conn_timeout(self) -> int:
        """Seconds the kernel holds this device's I/O for a new connection."""
        grace = MIRROR_KERNEL_GRACE if self.config.mirror else 0
        return int(self.config.dead_conn_timeout) + grace

    def open_socket(self):
        """A socket negotiated on this node's export, blocking, ready for the kernel."""
        sock = socket.create_connection((self.host, self.port), timeout=HANDSHAKE_TIMEOUT)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            handshake = ClientHandshake(self.export)
            while handshake.export is None:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed the connection in the handshake")
                handshake.receive_data(data)
                sock.sendall(handshake.data_to_send())
            sock.settimeout(None)  # the kernel's own I/O on it must not see O_NONBLOCK
            return sock, handshake.export
        except BaseException:
            sock.close()
            raise

    def keep_copy(self, sock: socket.socket) -> None:
        # The kernel holds the socket; our copy only watches for the hang-up.
        self.copies[sock.fileno()] = sock

    def close_copies(self) -> None:
        for sock in self.copies.values():
            sock.close()
        self.copies.clear()

    # -- state file ---------------------------------------------------------------------------

    def saved(self) -> dict:
        return dict(server=self.server, host=self.host, port=self.port, index=self.index,
                    device=self.device, export=self.export, size=self.size,
                    connections=self.connections, alive=self.alive,
                    reconnects=self.reconnects, backend_identifier=self.backend_identifier,
                    last_error=self.last_error)

    def restore(self, saved: dict) -> None:
        self.index = saved["index"]
        self.size = saved["size"]
        self.connections = saved["connections"]
        self.alive = 1  # at least: the device is connected; the probe fills in the rest
        self.reconnects = saved.get("reconnects", 0)
        self.backend_identifier = saved.get("backend_identifier")

    # -- dead sockets -------------------------------------------------------------------------

    def lost(self, count: int, reason: str, hung_up_at: float = 0.0) -> None:
        """`count` sockets died (or, adopting, may have): fill as many dead slots."""
        now = time.monotonic()
        if not self.missing:
            self.dead_since, self.tries, self.next_try = now, 0, now
        self.missing = min(self.connections, self.missing + count)
        self.alive = max(0, self.alive - count) if reason != "adopted" else self.alive
        self.reason = reason
        self.hung_up_at = max(self.hung_up_at, hung_up_at)

    def dead_for(self) -> float:
        """Seconds since every connection has been dead (0 while one is alive)."""
        return time.monotonic() - self.dead_since if self.missing and self.alive == 0 else 0.0

    def step(self, netlink) -> Try:
        """One try at bringing a new socket into a dead slot. Raises AreaGone when the export
        no longer holds this member's data (nothing was handed to the kernel)."""
        self.tries += 1
        try:
            sock, _ = self.open_socket()
        except NEGOTIATION_ERRORS as exc:
            delay = BACKOFF[min(self.tries - 1, len(BACKOFF) - 1)]
            if self.alive == 0 and self.dead_for() < self.config.dead_conn_timeout:
                # Wake at the kernel's own deadline, to say at once what it just did.
                left = self.dead_since + self.config.dead_conn_timeout - time.monotonic()
                delay = max(0.05, min(delay, left + 0.05))
            log.warning("reconnect try %d to %s (%s): %s; next in %.1f s", self.tries,
                        self.server, self.reason, exc, delay)
            self.last_error = f"reconnect: {exc}"
            return self._again(delay)
        try:
            self.check_identity(sock)
            # The device's TIMEOUT tells netlink.reconfigure whether the kernel took the
            # socket (it answers 0 also when no dead slot was left: see there).
            netlink.reconfigure(self.index, [sock.fileno()], timeout=int(self.config.io_timeout),
                                backend_identifier=self.backend_identifier)
        except AreaGone:
            sock.close()
            raise
        except (OSError, ProtocolError) as exc:
            sock.close()
            if getattr(exc, "errno", None) == errno.ENOSPC:
                if time.monotonic() - self.hung_up_at < HANGUP_GRACE and self.tries < 50:
                    return self._again(ENOSPC_RETRY)  # our copy saw the hang-up first
                # No dead slot left: every connection is alive.
                self.missing, self.alive, self.last_error = 0, self.connections, None
                return Try(done=True)
            log.warning("reconnect try %d to %s: %s", self.tries, self.server, exc)
            return self._again(BACKOFF[min(self.tries - 1, len(BACKOFF) - 1)])
        self.keep_copy(sock)
        self.missing -= 1
        self.alive = min(self.connections, self.alive + 1)
        self.reconnects += 1
        log.info("%s: new connection to %s brought in (%s, try %d, %.1f s after the loss)",
                 self.device, self.server, self.reason, self.tries,
                 time.monotonic() - self.dead_since)
        if not self.missing:
            self.alive, self.last_error = self.connections, None
            return Try(filled=True, done=True)
        return Try(filled=True, next_at=time.monotonic())

    def _again(self, delay: float) -> Try:
        self.next_try = time.monotonic() + delay
        return Try(next_at=self.next_try)

    def check_identity(self, sock: socket.socket) -> None:
        """Read the identity page through `sock`: it must hold what was put there at attach."""
        if self.identity is None:
            return
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.sendall(read_request(1, self.identity.offset, PAGE))
        reader = SimpleReplyReader(1, PAGE)
        while reader.data is None:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection before the identity READ")
            reader.receive_data(data)
        sock.settimeout(None)
        found = self.identity.found_in(reader.data)
        if found is not None:
            raise AreaGone(f"{self.export} on {self.server} no longer holds {found}")


def wait_for_device(device: str, size: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(device, "rb") as f:
                if f.seek(0, os.SEEK_END) == size:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise OSError(errno.ENODEV, f"{device} did not appear with {size} bytes")
        time.sleep(0.05)
