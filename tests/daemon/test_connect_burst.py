"""Every node reconnects at once when its server comes back: a burst of connections far
larger than an old-fashioned listen backlog must each get the NBD greeting. A connection the
full listen queue drops after the client saw it connected is never retried by TCP, so its
client would wait forever (bench/connect_burst.py measures the same with nbdkit beside)."""

from __future__ import annotations

import selectors
import socket
import time

from support.daemon import start_daemon, stop_clean

BURST = 400  # three times the backlog netswapd had (128)
GREETING = 18  # NBDMAGIC, IHAVEOPT, handshake flags: what a server sends unasked
HANG_GUARD = 60.0  # seconds: not a timing check


def test_a_burst_of_connections_larger_than_the_old_backlog_is_greeted_to_the_last(tmp_path):
    daemon = start_daemon(tmp_path, nbd_options=f"max_connections_per_client = {BURST}")
    selector = selectors.DefaultSelector()
    received: dict[socket.socket, bytes] = {}
    try:
        for _ in range(BURST):  # back to back, before the daemon can accept the first ones
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", daemon.port))
            selector.register(sock, selectors.EVENT_READ)
            received[sock] = b""
        deadline = time.monotonic() + HANG_GUARD
        waiting = BURST
        while waiting and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1.0):
                sock = key.fileobj
                try:
                    data = sock.recv(GREETING - len(received[sock]))
                except BlockingIOError:
                    continue
                received[sock] += data
                if len(received[sock]) == GREETING or not data:
                    selector.unregister(sock)
                    waiting -= 1
        greeted = sum(data.startswith(b"NBDMAGIC") for data in received.values())
        assert greeted == BURST, f"{greeted} of {BURST} connections greeted"
    finally:
        for sock in received:
            sock.close()
        selector.close()
        stop_clean(daemon)
