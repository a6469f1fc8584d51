"""A test's own network: a namespace with a bridge, the server's address on it, and one tap
per node, so every node has an address (and source ports) of its own, as on a real LAN.

Processes of the namespace (netswapd, qemu) are started through `exec()`; sockets of the
namespace come from a short-lived thread that setns()es into it (a socket keeps the namespace
it was made in, whichever thread uses it). Deleting the namespace removes the bridge and taps.
"""

from __future__ import annotations

import ctypes
import http.client
import itertools
import os
import socket
import subprocess
import threading

CLONE_NEWNET = 0x40000000
_names = itertools.count()


class Lan:
    """10.77.0.0/24 inside a namespace: server i is .(1 + i) (`server` is the first), node i
    is .(10 + i)."""

    prefix = "10.77.0"
    server = "10.77.0.1"

    def __init__(self, nodes: int, servers: int = 1) -> None:
        self.name = f"nsw-node-{os.getpid()}-{next(_names)}"
        self.servers = [f"{self.prefix}.{1 + index}" for index in range(servers)]
        self.taps = [f"tap{index}" for index in range(nodes)]
        _ip("netns", "add", self.name)
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
            _ip("-n", self.name, "link", "add", "br0", "type", "bridge")
            for server in self.servers:
                _ip("-n", self.name, "addr", "add", f"{server}/24", "dev", "br0")
            _ip("-n", self.name, "link", "set", "br0", "up")
            for tap in self.taps:
                _ip("-n", self.name, "tuntap", "add", "dev", tap, "mode", "tap")
                _ip("-n", self.name, "link", "set", tap, "master", "br0", "up")
        except BaseException:
            self.close()
            raise

    def address(self, index: int) -> str:
        return f"{self.prefix}.{10 + index}"

    def exec(self, *argv: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name, *argv)

    def socket(self, family: int = socket.AF_INET) -> socket.socket:
        made: list = []

        def enter_and_make() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    made.append(OSError(ctypes.get_errno(), "setns"))
                    return
            finally:
                os.close(fd)
            made.append(socket.socket(family))

        thread = threading.Thread(target=enter_and_make)
        thread.start()
        thread.join()
        if isinstance(made[0], BaseException):
            raise made[0]
        return made[0]

    def http_get(self, host: str, port: int, path: str) -> str:
        """GET http://host:port/path from inside the namespace (e.g. netswapd's /metrics)."""
        sock = self.socket()
        sock.settimeout(20)  # a hang guard, not a timing check
        sock.connect((host, port))
        connection = http.client.HTTPConnection(host, port)
        connection.sock = sock
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read().decode()
            if response.status != 200:
                raise RuntimeError(f"GET {path}: {response.status} {body}")
            return body
        finally:
            connection.close()

    def close(self) -> None:
        _ip("netns", "del", self.name, check=False)

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ip(*argv: str, check: bool = True) -> None:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {done.stderr.strip()}")
