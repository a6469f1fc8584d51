"""A private network namespace (`ip netns`) for tests that need port 111 or rpcbind, and
sockets and scrapes made from inside it."""

from __future__ import annotations

import ctypes
import http.client
import os
import socket
import subprocess
import threading

CLONE_NEWNET = 0x40000000
FOREIGN = "192.0.2.1"  # TEST-NET-1, added to the namespace's lo: a caller that is not loopback


def run(*command, check=True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=check,
                          **kwargs)


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name

    def exec(self, *argv) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name, *argv)

    def run(self, *argv, check=True) -> subprocess.CompletedProcess:
        return run(*self.exec(*argv), check=check)

    def socket(self, source: str | None = None) -> socket.socket:
        """A TCP socket of the namespace, bound to `source` if given."""
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
            made.append(socket.socket())

        thread = threading.Thread(target=enter_and_make)
        thread.start()
        thread.join()
        if isinstance(made[0], BaseException):
            raise made[0]
        sock = made[0]
        sock.settimeout(20)  # a hang guard, not a timing check
        if source is not None:
            sock.bind((source, 0))
        return sock



def scrape(netns, port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    connection.sock = netns.socket()
    connection.sock.connect(("127.0.0.1", port))
    connection.request("GET", "/metrics")
    return connection.getresponse().read().decode()
