"""Connection limits and churn: a flood of connections is refused while an attached node keeps
swapping, and connect/disconnect churn leaves the daemon's memory flat."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from netswap.nbd import constants as C
from support.daemon import start_daemon
from support.libnbd import import_libnbd
from support.metrics import metric, samples
from support.nbd_raw import connect_raw, go, recv_exact, request, simple_reply
from support.process import rss_kib
from support.wait import wait_until

nbd = import_libnbd()
KiB = 1 << 10


def refused(sock: socket.socket) -> bool:
    """The server closed this connection without even sending its greeting."""
    sock.settimeout(10)
    try:
        return sock.recv(18) == b""
    except ConnectionResetError:
        return True


def swapping_node(daemon, stop: threading.Event, results: list) -> None:
    """A node on ::1 (its own client address) writing and reading back pages until stopped."""
    h = nbd.NBD()
    h.connect_uri(f"nbd://[::1]:{daemon.port}/swap/steady-node")
    rounds = 0
    while not stop.is_set():
        data = os.urandom(64 * KiB)
        h.pwrite(data, (rounds % 64) * 64 * KiB)
        assert h.pread(64 * KiB, (rounds % 64) * 64 * KiB) == data
        rounds += 1
    h.shutdown()
    results.append(rounds)


def test_flood_past_the_limits_is_refused_while_a_node_keeps_swapping(tmp_path):
    daemon = start_daemon(tmp_path, nbd_options="max_connections = 12\nmax_connections_per_client = 8")
    stop, results = threading.Event(), []
    node = threading.Thread(target=swapping_node, args=(daemon, stop, results))
    node.start()
    flood = []
    try:
        wait_until(lambda: metric(daemon, "netswap_connections") == 1, what="the node connected")
        # Per client: 8 connections from 127.0.0.1 are taken, the 9th and later are not.
        for _ in range(8):
            flood.append(socket.create_connection(("127.0.0.1", daemon.port)))
            assert len(recv_exact(flood[-1], 18)) == 18
        extra = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(20)]
        assert all(refused(sock) for sock in extra)
        # Globally: the node's connection + 8 + 3 more from the unix socket fill 12.
        for _ in range(3):
            unix = socket.socket(socket.AF_UNIX)
            unix.connect(str(daemon.unix_socket))
            assert len(recv_exact(unix, 18)) == 18
            flood.append(unix)
        unix = socket.socket(socket.AF_UNIX)
        unix.connect(str(daemon.unix_socket))
        assert refused(unix)
        wait_until(lambda: metric(daemon, "netswap_connections_refused_total",
                                  reason="max_connections") == 1, what="the refusal counted")
        # Closing frees the slots again.
        for sock in flood:
            sock.close()
        flood.clear()
        wait_until(lambda: metric(daemon, "netswap_connections") == 1,
                   what="only the node's connection left")
        sock = connect_raw(daemon)
        go(sock, b"disk")
        request(sock, C.CMD_FLUSH, cookie=3)
        assert simple_reply(sock) == (0, 3)
        sock.close()
        exported = samples(daemon.metrics())
    finally:
        stop.set()
        node.join(60)
        for sock in flood:
            sock.close()
        assert daemon.stop() == 0, daemon.log()
    assert results and results[0] > 0, "the swapping node did not make progress"
    assert exported[("netswap_connections_refused_total", (("reason", "max_connections_per_client"),))] == 20
    assert exported[("netswap_connections_refused_total", (("reason", "max_connections"),))] == 1
    assert "refusing connections from 127.0.0.1: max_connections_per_client reached" in daemon.log()
    print(f"\nlimits: node completed {results[0]} write+read rounds during the flood")


def test_ten_thousand_connect_disconnect_cycles_leave_rss_flat(tmp_path):
    daemon = start_daemon(tmp_path)
    pid = daemon.process.pid

    def cycles(count: int) -> None:
        for i in range(count):
            if i % 10 == 0:
                # Every tenth goes all the way: transmission, one request, disconnect.
                sock = connect_raw(daemon)
                go(sock, b"disk")
                request(sock, C.CMD_READ, 0, 4096, cookie=i)
                assert simple_reply(sock) == (0, i)
                recv_exact(sock, 4096)
                request(sock, C.CMD_DISC)
            else:
                sock = socket.create_connection(("127.0.0.1", daemon.port))
                recv_exact(sock, 18)
                sock.sendall(struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE))
            sock.close()

    try:
        cycles(1000)  # warm up: thread stacks, allocator arenas, caches
        wait_until(lambda: metric(daemon, "netswap_connections") == 0, what="every cycle closed")
        before = rss_kib(pid)
        started = time.monotonic()
        cycles(10_000)
        elapsed = time.monotonic() - started
        wait_until(lambda: metric(daemon, "netswap_connections") == 0, what="every cycle closed")
        after = rss_kib(pid)
    finally:
        assert daemon.stop() == 0, daemon.log()
    print(f"\nchurn: 10000 cycles in {elapsed:.1f} s, RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB")
    assert after - before < 4 * 1024, (before, after)
