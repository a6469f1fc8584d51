"""A client that asks for data and never reads the replies (issue 5: "reads the client never
drains"). It may only throttle itself: the shared workers keep serving everyone else, its
memory stays bounded by its in-flight slots, and after nbd.send_timeout it is cut off and
everything it held goes back to the pool."""

from __future__ import annotations

import socket
import struct
import threading
import time

from netswap.nbd import constants as C
from support.daemon import start_daemon
from support.libnbd import import_libnbd
from support.metrics import samples
from support.nbd_raw import go, recv_exact
from support.wait import wait_until

MiB = 1 << 20
REQUEST = 4 * MiB
MAX_INFLIGHT = 8


def metric(daemon, name: str) -> float:
    """An unlabelled sample that must be there (KeyError if it is not)."""
    return samples(daemon.metrics())[(name, ())]


def hostile_reader(daemon, requests: int) -> socket.socket:
    """GO on "ram", then `requests` READs of 4 MiB, and never a recv."""
    sock = socket.create_connection(("127.0.0.1", daemon.port))
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE))
    go(sock, b"ram")
    # Small buffers on our side too, so the daemon's replies back up at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    header = b"".join(struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, cookie, 0, REQUEST)
                      for cookie in range(requests))
    sock.setblocking(False)
    try:
        sock.send(header)  # the daemon stops reading after max_inflight: some may stay unsent
    except BlockingIOError:
        pass
    return sock


def test_a_client_that_never_reads_replies_throttles_only_itself(tmp_path):
    # Two workers: before replies were sent without blocking, two undrained 4 MiB READ
    # replies were enough to wedge every worker, and with them every client.
    daemon = start_daemon(
        tmp_path, extra="", nbd_options=f'max_inflight = {MAX_INFLIGHT}\nsend_timeout = "4s"',
        pool_options='normal_budget = "96MiB"',
    )
    nbd = import_libnbd()
    try:
        free_before = metric(daemon, "netswap_pool_free_bytes")
        hostiles = [hostile_reader(daemon, 4 * MAX_INFLIGHT) for _ in range(3)]
        time.sleep(1.0)  # let the daemon fill their sockets and queue the rest

        # Bounded: each hostile holds at most max_inflight replies' buffers (plus its
        # receive window); the requests beyond those wait in the kernel, unread.
        held = free_before - metric(daemon, "netswap_pool_free_bytes")
        assert 0 < held <= 3 * (MAX_INFLIGHT * REQUEST + 1 * MiB), held

        # Meanwhile another client gets every request served: the workers are not stuck.
        good = nbd.NBD()
        good.connect_uri(daemon.uri("disk"))
        pattern = bytes(range(256)) * 16
        for i in range(200):
            good.pwrite(pattern, i * 4096)
            assert good.pread(4096, i * 4096) == pattern
        good.shutdown()
        # ...and it was all done while the hostiles were still connected.
        assert metric(daemon, "netswap_send_timeouts_total") == 0

        # After send_timeout each hostile is cut off and its buffers return.
        wait_until(lambda: metric(daemon, "netswap_send_timeouts_total") >= 3, timeout=30,
                   interval=0.2, what="three send timeouts")
        assert metric(daemon, "netswap_send_timeouts_total") == 3
        # The daemon's side is closed.
        wait_until(lambda: metric(daemon, "netswap_connections") == 0, what="no connection left")
        assert metric(daemon, "netswap_pool_free_bytes") == free_before
        for sock in hostiles:
            # Whatever the daemon had queued is gone with the connection; don't wait for it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        assert "took no replies for 4 s: disconnecting" in daemon.log()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()
    assert "Traceback" not in daemon.log()


def receive(sock: socket.socket, count: int) -> bytes:
    data = bytearray(count)
    view = memoryview(data)
    got = 0
    while got < count:
        n = sock.recv_into(view[got:])
        assert n, "closed by the daemon"
        got += n
    return bytes(data)


def test_a_slow_reader_gets_every_reply_in_order(tmp_path):
    """Replies that do not fit the socket at once are finished later, in order, intact."""
    daemon = start_daemon(tmp_path, nbd_options=f"max_inflight = {MAX_INFLIGHT}")
    try:
        sock = socket.socket()
        # Set before connecting, so the window it advertises is small from the start.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect(("127.0.0.1", daemon.port))
        recv_exact(sock, 18)
        sock.sendall(struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE))
        go(sock, b"ram")
        chunk = 1 * MiB
        blocks = 12
        for cookie in range(blocks):  # distinct contents per MiB
            payload = bytes([cookie + 1]) * chunk
            sock.sendall(struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_WRITE, cookie,
                                     cookie * chunk, chunk) + payload)
            magic, error, got = struct.unpack(">IIQ", recv_exact(sock, 16))
            assert (error, got) == (0, cookie)

        def send_reads():
            for cookie in range(blocks):
                sock.sendall(struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, 100 + cookie,
                                         cookie * chunk, chunk))

        sender = threading.Thread(target=send_reads)
        sender.start()
        seen = {}
        for _ in range(blocks):
            time.sleep(0.05)  # read slowly: the daemon's sends back up behind us
            magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
            assert magic == C.SIMPLE_REPLY_MAGIC and error == 0
            seen[cookie] = receive(sock, chunk)
        sender.join()
        assert sorted(seen) == [100 + i for i in range(blocks)]
        for cookie, data in seen.items():
            assert data == bytes([cookie - 100 + 1]) * chunk
        sock.close()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()
