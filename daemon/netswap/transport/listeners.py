"""Listening sockets (TCP over IPv4 and IPv6, Unix) and the keepalive of accepted ones.

A listener that cannot be set up raises ListenError naming the config key and the address,
so the daemon's start fails with a line the operator can act on. Where systemd passed a
listening socket for the address (socket activation, see systemd.adopt_listen_fds), that
socket is used instead of binding one.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from ..systemd import take_tcp_listener, take_unix_listener
from ..unixsock import bind_unix

# Every node of a server reconnects at once when it comes back from a restart. A connection
# the full listen queue drops after the client saw it connected is never retried by TCP: the
# client waits for a greeting that never comes (bench/connect_burst.py: 384 connects at once
# against a backlog of 128 left 124 of them hanging). The kernel caps the value at
# net.core.somaxconn (4096 by default since Linux 5.4).
BACKLOG = 4096
# Unix listeners systemd passed: their paths belong to the socket unit, not to us.
PASSED_UNIX_SOCKETS: set[socket.socket] = set()


class ListenError(OSError):
    """A listening socket could not be set up; the message names the address."""


def tcp_listener(host: str, port: int, key: str) -> socket.socket:
    """A listening TCP socket on host:port, the one systemd passed if it did; a failure names
    the config `key` it came from."""
    passed = take_tcp_listener(host, port, key)
    if passed is not None:
        return passed
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
        sock.listen(BACKLOG)
    except OSError as exc:
        raise ListenError(f"{key}: cannot listen on {shown}: {exc.strerror}") from exc
    return sock


def unix_listener(path: Path, key: str) -> socket.socket:
    """A listening Unix socket at `path` (mode 0660), the one systemd passed if it did; a
    failure names the config `key`."""
    passed = take_unix_listener(path, key)
    if passed is not None:
        PASSED_UNIX_SOCKETS.add(passed)  # its path is the socket unit's: left in place at stop
        return passed
    try:
        sock = bind_unix(path, 0o660, key)
        sock.listen(BACKLOG)
    except OSError as exc:
        raise ListenError(str(exc)) from exc
    return sock


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
