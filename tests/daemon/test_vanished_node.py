"""A node that vanishes without a word (power loss, a pulled cable) sends no reset: the
daemon must notice by itself, or the node's connection, buffers and reserve stay held until
a restart. The node here is a client in its own network namespace behind a veth pair;
a blackhole route in its namespace makes it silent, as a dead machine is, while the link
stays up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from support.daemon import free_port, start_daemon
from support.metrics import metric_matching
from support.wait import wait_until

NODE_IP, SERVER_IP = "10.205.0.2", "10.205.0.1"

# The node: attach to its swap export, write a page, then idle with the socket open.
NODE = textwrap.dedent("""
    import socket, struct, sys, time
    host, port = sys.argv[1], int(sys.argv[2])
    sock = socket.create_connection((host, port))
    def recv(n):
        data = b""
        while len(data) < n:
            data += sock.recv(n - len(data))
        return data
    recv(18)
    sock.sendall(struct.pack(">I", 1))  # FIXED_NEWSTYLE
    name = b"swap/ghost"
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(name) + 2)
                 + struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        _, _, rtype, length = struct.unpack(">QIII", recv(20))
        recv(length)
        if rtype == 1:  # ACK
            break
    sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, 0, 4096) + b"g" * 4096)
    assert struct.unpack(">IIQ", recv(16))[1] == 0
    print("attached", flush=True)
    time.sleep(3600)
""")


def run(*argv: str, check=True):
    return subprocess.run(argv, capture_output=True, text=True, check=check)


@pytest.fixture
def node_link():
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2")
    tag = f"{os.getpid() % 10000}"
    namespace, near, far = f"nsw-{tag}-node", f"nswk{tag}a", f"nswk{tag}b"
    try:
        run("ip", "netns", "add", namespace)
        run("ip", "link", "add", near, "type", "veth", "peer", "name", far, "netns", namespace)
        run("ip", "addr", "add", f"{SERVER_IP}/24", "dev", near)
        run("ip", "-n", namespace, "addr", "add", f"{NODE_IP}/24", "dev", far)
        run("ip", "link", "set", near, "up")
        run("ip", "-n", namespace, "link", "set", far, "up")
        run("ip", "-n", namespace, "link", "set", "lo", "up")
        yield namespace
    finally:
        run("ip", "netns", "del", namespace, check=False)  # takes the veth pair with it
        run("ip", "link", "del", near, check=False)


def test_a_node_that_goes_silent_is_disconnected_and_its_reserve_released(tmp_path, node_link):
    namespace = node_link
    port = free_port()
    daemon = start_daemon(tmp_path, listen=f'["{SERVER_IP}:{port}"]',
                          nbd_options='keepalive = "2s"', swap_options='detach_grace = "1s"')
    node = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c", NODE,
                             SERVER_IP, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        watermark_before = metric_matching(daemon, "netswap_pool_watermark_bytes")
        assert node.stdout.readline().strip() == "attached"
        assert metric_matching(daemon, "netswap_node_connections", node="ghost") == 1
        # The node's reserve is held: the watermark rose by it.
        assert metric_matching(daemon, "netswap_pool_watermark_bytes") > watermark_before

        # The node goes silent, as a machine that lost power: nothing it would send (not
        # even the answer to a keepalive probe) leaves it, and the link stays up.
        run("ip", "-n", namespace, "route", "add", "blackhole", f"{SERVER_IP}/32")
        # keepalive 2 s: probes after 2 s of silence, 3 of them ~1 s apart; then the grace.
        wait_until(lambda: metric_matching(daemon, "netswap_pool_watermark_bytes") == watermark_before,
                   timeout=30, interval=0.25, what="the node's reserve released")
        assert metric_matching(daemon, "netswap_node_connections", node="ghost") == 0
        assert metric_matching(daemon, "netswap_pool_watermark_bytes") == watermark_before  # released
        assert metric_matching(daemon, "netswap_connections_lost_total", reason="TimeoutError") == 1
        assert "connection lost" in daemon.log()
    finally:
        node.kill()
        node.wait()
        code = daemon.stop()
    assert code == 0, daemon.log()
    assert "Traceback" not in daemon.log()
