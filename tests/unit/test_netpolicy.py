"""Swap-connection tagging and egress shaping, checked against the kernel.

tag_emergency is checked by reading every option back with getsockopt on real connected
sockets (TCP over IPv4, IPv6 and a v4-mapped dual-stack socket, and a Unix socket pair),
with and without CAP_NET_ADMIN. The Shaper is checked inside two network namespaces joined by
a veth pair: tc shows its qdisc, classes and filter, marked packets are counted in the swap
class and unmarked ones are not, and remove() leaves the interface as it was.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from netswap.netpolicy import (
    SO_MARK,
    SO_PRIORITY,
    IPV6_TCLASS,
    Shaper,
    ShapeError,
    SocketPolicy,
    tag_emergency,
)

KiB = 1024
EF = 46  # the default DSCP: expedited forwarding
MARK = 0x5A


def connected_pair(family: int, listen_host: str, connect_host: str, *, v6only=None):
    """(client, accepted server side) of a TCP connection over loopback."""
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        if v6only is not None:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        listener.bind((listen_host, 0))
        listener.listen(1)
        client = socket.create_connection((connect_host, listener.getsockname()[1]))
        server, _ = listener.accept()
    return client, server


def option(sock, level, name) -> int:
    return sock.getsockopt(level, name)


@pytest.mark.parametrize("priority", [5, 7])  # 7 needs CAP_NET_ADMIN, which tests run with
@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"),
                                         (socket.AF_INET6, "::1")], ids=["ipv4", "ipv6"])
def test_tag_sets_every_option_on_tcp(family, host, priority):
    client, server = connected_pair(family, host, host)
    with client, server:
        policy = SocketPolicy(priority=priority, dscp=EF, mark=MARK,
                              sndbuf=256 * KiB, rcvbuf=192 * KiB)
        assert tag_emergency(server, policy) == []

        # The TOS byte's low two bits are ECN, which the kernel owns on TCP sockets.
        if family == socket.AF_INET:
            assert option(server, socket.IPPROTO_IP, socket.IP_TOS) >> 2 == EF
        else:
            assert option(server, socket.IPPROTO_IPV6, IPV6_TCLASS) >> 2 == EF
        # Set after the TOS on purpose: IP_TOS rewrites the priority (EF would give 4).
        assert option(server, socket.SOL_SOCKET, SO_PRIORITY) == priority
        assert option(server, socket.SOL_SOCKET, SO_MARK) == MARK
        # The kernel doubles buffer sizes for its own bookkeeping and reports the double.
        assert option(server, socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 256 * KiB
        assert option(server, socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 192 * KiB
        assert option(server, socket.IPPROTO_TCP, socket.TCP_NODELAY)
        # The untagged end is untouched.
        assert option(client, socket.SOL_SOCKET, SO_MARK) == 0
        assert not option(client, socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_tag_covers_ipv4_traffic_of_a_dual_stack_socket():
    # A listener on [::] accepts IPv4 clients as v4-mapped IPv6 sockets; their packets are
    # IPv4 and take their TOS from IP_TOS, not IPV6_TCLASS.
    client, server = connected_pair(socket.AF_INET6, "::", "127.0.0.1", v6only=0)
    with client, server:
        assert server.getpeername()[0] == "::ffff:127.0.0.1"
        assert tag_emergency(server, SocketPolicy(priority=6, dscp=EF)) == []
        assert option(server, socket.IPPROTO_IP, socket.IP_TOS) >> 2 == EF
        assert option(server, socket.IPPROTO_IPV6, IPV6_TCLASS) >> 2 == EF
        assert option(server, socket.SOL_SOCKET, SO_PRIORITY) == 6


def test_tag_gives_unix_sockets_only_their_buffers():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        policy = SocketPolicy(priority=6, dscp=EF, mark=MARK, sndbuf=128 * KiB, rcvbuf=64 * KiB)
        assert tag_emergency(left, policy) == []
        assert option(left, socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 128 * KiB
        assert option(left, socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 64 * KiB
        assert option(left, socket.SOL_SOCKET, SO_PRIORITY) == 0
        assert option(left, socket.SOL_SOCKET, SO_MARK) == 0


def test_zero_mark_and_buffers_leave_the_kernel_defaults():
    client, server = connected_pair(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    with client, server:
        sndbuf = option(server, socket.SOL_SOCKET, socket.SO_SNDBUF)
        rcvbuf = option(server, socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert tag_emergency(server, SocketPolicy(priority=6, dscp=EF)) == []
        assert option(server, socket.SOL_SOCKET, SO_MARK) == 0
        assert option(server, socket.SOL_SOCKET, socket.SO_SNDBUF) == sndbuf
        assert option(server, socket.SOL_SOCKET, socket.SO_RCVBUF) == rcvbuf


def test_policy_from_config_and_validation():
    class Network:  # duck-typed: any object with the [network] attribute names
        priority, dscp, mark, shape, interface = 6, 46, 7, False, ""

    policy = SocketPolicy.from_config(Network(), sndbuf=4096, rcvbuf=8192)
    assert policy == SocketPolicy(priority=6, dscp=46, mark=7, sndbuf=4096, rcvbuf=8192)
    with pytest.raises(ValueError, match="dscp"):
        SocketPolicy(priority=6, dscp=64)
    with pytest.raises(ValueError, match="mark"):
        SocketPolicy(priority=6, dscp=0, mark=2**32)


UNPRIVILEGED_TAGGING = textwrap.dedent("""
    import json, socket, sys
    from netswap.netpolicy import SocketPolicy, tag_emergency
    wmem_max = int(open("/proc/sys/net/core/wmem_max").read())
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    policy = SocketPolicy(priority=7, dscp=46, mark=0x5A, sndbuf=2 * wmem_max, rcvbuf=65536)
    failures = tag_emergency(server, policy)
    print(json.dumps({
        "failures": failures,
        "wmem_max": wmem_max,
        "tos": server.getsockopt(socket.IPPROTO_IP, socket.IP_TOS),
        "nodelay": server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        "sndbuf": server.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        "rcvbuf": server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
    }))
""")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_tag_reports_what_it_could_not_set_without_cap_net_admin():
    # Dropping the capabilities from the bounding set drops them from the child root process.
    result = subprocess.run(
        ["setpriv", "--bounding-set=-net_admin,-net_raw", sys.executable, "-c",
         UNPRIVILEGED_TAGGING],
        capture_output=True, text=True, check=True,
    )
    report = json.loads(result.stdout)
    failures = report["failures"]
    by_option = {failure.split(":")[0]: failure for failure in failures}
    assert set(by_option) == {"SO_PRIORITY", "SO_MARK", "SO_SNDBUF"}, failures
    assert by_option["SO_MARK"].startswith("SO_MARK: EPERM")
    assert "CAP_NET_ADMIN" in by_option["SO_MARK"]
    assert by_option["SO_PRIORITY"].startswith("SO_PRIORITY: EPERM")
    # SO_SNDBUFFORCE was refused, plain SO_SNDBUF was capped at net.core.wmem_max: reported.
    assert f"{report['wmem_max']} granted" in by_option["SO_SNDBUF"]
    assert "net.core.wmem_max" in by_option["SO_SNDBUF"]
    assert report["sndbuf"] == 2 * report["wmem_max"]
    # What needs no privilege still took, including a buffer under the cap (the fallback).
    assert report["rcvbuf"] == 2 * 65536
    assert report["tos"] >> 2 == EF
    assert report["nodelay"]


# ---------------------------------------------------------------------------------------------
# The Shaper, in two network namespaces joined by a veth pair.

_namespace_ids = itertools.count()


def run(*argv: str, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


class Link:
    """Namespace `near` holds `interface` (shaped, address near_ip); `far` holds its peer."""

    def __init__(self, tag: str):
        self.near, self.far = f"nsw-{tag}-near", f"nsw-{tag}-far"
        self.interface, self.peer = f"nsw{tag}a", f"nsw{tag}b"
        self.near_ip, self.far_ip = "10.203.0.1", "10.203.0.2"

    def near_run(self, *argv: str, check=True) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", self.near, *argv, check=check)

    def tc(self, *argv: str) -> str:
        return self.near_run("tc", *argv).stdout

    def root_qdiscs(self) -> list[dict]:
        qdiscs = json.loads(self.tc("-j", "qdisc", "show", "dev", self.interface))
        return [q for q in qdiscs if q.get("root")]

    def class_counters(self) -> dict[str, tuple[int, int]]:
        """{classid: (bytes, packets)} from `tc -s class show` (htb classes print no JSON)."""
        text = self.tc("-s", "class", "show", "dev", self.interface)
        return {classid: (int(sent), int(packets)) for classid, sent, packets in
                re.findall(r"^class htb (\S+) .*\n Sent (\d+) bytes (\d+) pkt", text, re.M)}

    def python_near(self, code: str, *args: str) -> str:
        return self.near_run(sys.executable, "-c", code, *map(str, args)).stdout

    def python_far(self, code: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.far, sys.executable, "-c", code,
                                 *map(str, args)], stdout=subprocess.PIPE, text=True)


@pytest.fixture
def link():
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs iproute2 (ip, tc)")
    link = Link(f"{os.getpid() % 10000}{next(_namespace_ids)}")
    try:
        run("ip", "netns", "add", link.near)
        run("ip", "netns", "add", link.far)
        run("ip", "-n", link.near, "link", "add", link.interface, "type", "veth",
            "peer", "name", link.peer, "netns", link.far)
        run("ip", "-n", link.near, "addr", "add", f"{link.near_ip}/24", "dev", link.interface)
        run("ip", "-n", link.far, "addr", "add", f"{link.far_ip}/24", "dev", link.peer)
        for namespace, interface in ((link.near, link.interface), (link.far, link.peer)):
            run("ip", "-n", namespace, "link", "set", interface, "up")
            run("ip", "-n", namespace, "link", "set", "lo", "up")
        yield link
    finally:
        # Deleting a namespace deletes the veth end in it, and with it the pair.
        run("ip", "netns", "del", link.near, check=False)
        run("ip", "netns", "del", link.far, check=False)


SEND_UDP = textwrap.dedent("""
    import socket, sys
    destination, count, mark = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, 36, mark)  # SO_MARK
    for _ in range(count):
        sock.sendto(b"s" * 200, (destination, 9))  # discard port; nobody needs to listen
""")

# Serves one TCP connection from the shaped side, tagged with tag_emergency when mark != 0.
SERVE_TCP = textwrap.dedent("""
    import socket, sys
    from netswap.netpolicy import SocketPolicy, tag_emergency
    address, size, mark = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with socket.create_server((address, 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        connection, _ = listener.accept()
        with connection:
            if mark:
                policy = SocketPolicy(priority=0, dscp=46, mark=mark)
                assert tag_emergency(connection, policy) == []
            connection.sendall(b"p" * size)
            connection.shutdown(socket.SHUT_WR)
            connection.recv(1)  # until the client has read everything and closed
""")

READ_TCP = textwrap.dedent("""
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as sock:
        total = 0
        while chunk := sock.recv(1 << 16):
            total += len(chunk)
    print(total)
""")

SWAP, OTHER = "4e53:1", "4e53:2"


def delta(before, after, classid) -> tuple[int, int]:
    return tuple(a - b for a, b in zip(after[classid], before[classid]))


def serve_one_tcp_connection(link: Link, size: int, mark: int) -> None:
    server = subprocess.Popen(
        ["ip", "netns", "exec", link.near, sys.executable, "-c", SERVE_TCP, link.near_ip,
         str(size), str(mark)], stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        client = link.python_far(READ_TCP, link.near_ip, port)
        assert client.communicate(timeout=30)[0].strip() == str(size)
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
        server.wait()


def test_shaper_puts_marked_traffic_in_the_swap_class(link):
    assert [q["kind"] for q in link.root_qdiscs()] == ["noqueue"]  # veth's default
    shaper = Shaper(netns=link.near)
    shaper.install(link.interface, MARK)
    try:
        assert shaper.installed and shaper.interface == link.interface
        (root,) = link.root_qdiscs()
        assert (root["kind"], root["handle"]) == ("htb", "4e53:")
        classes = link.tc("class", "show", "dev", link.interface)
        assert re.search(rf"^class htb {SWAP} root leaf \S+ prio 0 ", classes, re.M), classes
        assert re.search(rf"^class htb {OTHER} root leaf \S+ prio 1 ", classes, re.M), classes
        filters = json.loads(link.tc("-j", "filter", "show", "dev", link.interface))
        (mark_filter,) = [f for f in filters if "options" in f]
        assert mark_filter["kind"] == "bpf" and mark_filter["options"]["flowid"] == SWAP
        assert {"code": 21, "jt": 0, "jf": 1, "k": MARK} in \
            mark_filter["options"]["bytecode"]["insns"]  # jeq #MARK

        # UDP: exactly the marked datagrams are counted in the swap class.
        before = link.class_counters()
        link.python_near(SEND_UDP, link.far_ip, 100, MARK)
        middle = link.class_counters()
        assert delta(before, middle, SWAP)[1] == 100
        link.python_near(SEND_UDP, link.far_ip, 60, 0)
        after = link.class_counters()
        assert delta(middle, after, SWAP) == (0, 0)
        assert delta(middle, after, OTHER)[1] >= 60

        # TCP: a connection tagged by tag_emergency goes through the swap class, an untagged
        # one through the other.
        size = 1 << 20
        before = link.class_counters()
        serve_one_tcp_connection(link, size, MARK)
        middle = link.class_counters()
        assert delta(before, middle, SWAP)[0] > size
        serve_one_tcp_connection(link, size, 0)
        after = link.class_counters()
        assert delta(middle, after, SWAP) == (0, 0)
        assert delta(middle, after, OTHER)[0] > size
    finally:
        shaper.remove()
    assert not shaper.installed
    assert [q["kind"] for q in link.root_qdiscs()] == ["noqueue"]
    assert "4e53" not in link.tc("qdisc", "show", "dev", link.interface)
    assert link.tc("filter", "show", "dev", link.interface) == ""
    shaper.remove()  # nothing installed: nothing to do


def test_shaper_refuses_to_replace_a_qdisc_it_did_not_install(link):
    link.tc("qdisc", "add", "dev", link.interface, "root", "handle", "1:", "htb")
    shaper = Shaper(netns=link.near)
    with pytest.raises(ShapeError, match=r"root qdisc is htb 1:, which netswapd did not"):
        shaper.install(link.interface, MARK)
    assert not shaper.installed
    assert [(q["kind"], q["handle"]) for q in link.root_qdiscs()] == [("htb", "1:")]


def test_shaper_replaces_what_a_killed_netswapd_left(link):
    Shaper(netns=link.near).install(link.interface, MARK)  # never removed: the daemon died
    shaper = Shaper(netns=link.near)
    shaper.install(link.interface, MARK + 1)
    filters = link.tc("filter", "show", "dev", link.interface)
    assert f"21 0 1 {MARK + 1}," in filters and f"21 0 1 {MARK}," not in filters
    shaper.remove()
    assert [q["kind"] for q in link.root_qdiscs()] == ["noqueue"]


def test_shaper_remove_leaves_a_qdisc_someone_put_in_its_place(link, caplog):
    shaper = Shaper(netns=link.near)
    shaper.install(link.interface, MARK)
    link.tc("qdisc", "del", "dev", link.interface, "root")  # an operator's tc script
    link.tc("qdisc", "add", "dev", link.interface, "root", "handle", "1:", "htb")
    shaper.remove()
    assert not shaper.installed
    assert [(q["kind"], q["handle"]) for q in link.root_qdiscs()] == [("htb", "1:")]
    assert "no longer netswapd's (htb 1:)" in caplog.text


def test_shaper_errors_name_the_problem(link):
    shaper = Shaper(netns=link.near)
    with pytest.raises(ShapeError, match="nonzero 32-bit mark"):
        shaper.install(link.interface, 0)
    with pytest.raises(ShapeError, match="no-such0: no such interface"):
        shaper.install("no-such0", MARK)
    with pytest.raises(ShapeError, match="network namespace 'nsw-missing'"):
        Shaper(netns="nsw-missing").install(link.interface, MARK)
    assert not Path("/run/netns/nsw-missing").exists()  # looked for, not created
    assert [q["kind"] for q in link.root_qdiscs()] == ["noqueue"]
