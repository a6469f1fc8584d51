"""Isolation between clients, against a real netswapd: allow lists (TCP networks, Unix uids),
per-node binding of swap exports (by address and by secret), and wipe.

127.0.0.1 and 127.0.0.2 (both on lo) play two nodes. libnbd cannot choose its source
address, so the other node speaks raw NBD from a socket bound to 127.0.0.2; the allowed
cases use libnbd and nbdinfo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from netswap.nbd import constants as C
from support.daemon import REPO, free_port, start_daemon, stop_clean, wait_for_log
from support.libnbd import import_libnbd
from support.metrics import metric
from support.nbd_raw import closed_by_server, read_option_reply, recv_exact, send_option

MiB = 1 << 20
NODE_A, NODE_B = "127.0.0.1", "127.0.0.2"
SECRET = "c0ffee-0123456789abcdef-s3cret"
PATTERN = b"node secret page " * 241  # 4097 bytes: no run of zeros matches it by chance


# A raw client that can choose its source address ------------------------------------------


def raw_client(port: int, source: str = NODE_A) -> socket.socket:
    """A handshake from `source` (bound before connecting) to the daemon on loopback."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
    magic, ihaveopt, _ = struct.unpack(">QQH", recv_exact(sock, 18))
    assert (magic, ihaveopt) == (C.NBDMAGIC, C.IHAVEOPT)
    sock.sendall(struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE))
    return sock


def ask(sock, option: int, name: str) -> tuple[int, bytes]:
    """INFO or GO for `name`: (the final reply type, its payload)."""
    raw = name.encode()
    send_option(sock, option, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
    while True:
        _, rtype, payload = read_option_reply(sock)
        if rtype != C.REP_INFO:
            return rtype, payload


def listing(sock) -> list[str]:
    send_option(sock, C.OPT_LIST)
    names = []
    while True:
        _, rtype, payload = read_option_reply(sock)
        if rtype == C.REP_ACK:
            return names
        assert rtype == C.REP_SERVER
        (length,) = struct.unpack_from(">I", payload)
        names.append(payload[4 : 4 + length].decode())


def opens(port: int, name: str, source: str = NODE_A) -> bool:
    """GO from `source`: True if it enters transmission, False if refused with ERR_POLICY."""
    sock = raw_client(port, source)
    try:
        rtype, payload = ask(sock, C.OPT_GO, name)
        if rtype == C.REP_ACK:
            sock.sendall(struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_DISC, 1, 0, 0))
            return True
        assert rtype == C.REP_ERR_POLICY, (rtype, payload)
        # The client learns it is not allowed, and nothing about whose export it is or why.
        assert payload == b"access to this export is not allowed"
        return False
    finally:
        sock.close()


def write_with_libnbd(uri: str, offset: int = 0, data: bytes = PATTERN) -> None:
    nbd = import_libnbd()
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        h.shutdown()


# Allow lists ------------------------------------------------------------------------------

ALLOW_EXPORTS = """
    [[exports]]
    name = "disk"
    path = "disk.img"
    size = "4MiB"
    allow = ["127.0.0.1"]

    [[exports]]
    name = "v6only"
    backend = "memory"
    size = "4MiB"
    allow = ["::1/128"]

    [[exports]]
    name = "open"
    backend = "memory"
    size = "4MiB"
"""


def test_allow_list_admits_listed_addresses_and_refuses_others(tmp_path):
    daemon = start_daemon(tmp_path, exports=ALLOW_EXPORTS)
    try:
        # Node A is listed: real clients get in.
        write_with_libnbd(daemon.uri("disk"))
        info = subprocess.run(["nbdinfo", "--json", daemon.uri("disk")], capture_output=True,
                              text=True, timeout=30)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["exports"][0]["export-size"] == 4 * MiB

        # Node B is not: INFO and GO get ERR_POLICY, EXPORT_NAME a close; other exports serve.
        sock = raw_client(daemon.port, NODE_B)
        rtype, message = ask(sock, C.OPT_INFO, "disk")
        assert rtype == C.REP_ERR_POLICY
        assert message == b"access to this export is not allowed"  # no rule, no address
        assert ask(sock, C.OPT_GO, "disk")[0] == C.REP_ERR_POLICY
        sock.close()
        b_list = listing(raw_client(daemon.port, NODE_B))
        a_list = listing(raw_client(daemon.port, NODE_A))
        assert "disk" not in b_list and "v6only" not in b_list and "open" in b_list
        assert "disk" in a_list and "open" in a_list
        assert opens(daemon.port, "open", NODE_B)
        assert not opens(daemon.port, "disk", NODE_B)

        sock = raw_client(daemon.port, NODE_B)
        send_option(sock, C.OPT_EXPORT_NAME, b"disk")
        assert closed_by_server(sock)

        # IPv6: ::1 is the only client of v6only; 127.0.0.1 is not ::1, and ::1 is not in disk's list.
        nbd = import_libnbd()
        h = nbd.NBD()
        h.connect_uri(f"nbd://[::1]:{daemon.port}/v6only")
        assert h.get_size() == 4 * MiB
        h.shutdown()
        assert not opens(daemon.port, "v6only", NODE_A)
        six = raw_client(daemon.port, "::1")
        assert ask(six, C.OPT_INFO, "disk")[0] == C.REP_ERR_POLICY
        assert "v6only" in listing(six) and "disk" not in listing(six)
        six.close()

        assert metric(daemon, "netswap_access_denied_total", export_reason="disk:allow") >= 5
        assert metric(daemon, "netswap_access_denied_total", export_reason="v6only:allow") >= 1
        assert re.search(r"refused address 127\.0\.0\.2 access to disk: allow", daemon.log())
    finally:
        stop_clean(daemon)


def test_ipv4_entries_match_ipv4_mapped_peers_on_a_dual_stack_listener(tmp_path):
    port = free_port()
    daemon = start_daemon(tmp_path, exports=ALLOW_EXPORTS, listen=f'["*:{port}"]')
    try:
        # Accepted on an IPv6 socket as ::ffff:127.0.0.x, judged as 127.0.0.x.
        assert opens(port, "disk", NODE_A)
        assert not opens(port, "disk", NODE_B)
        assert not opens(port, "v6only", NODE_A)
    finally:
        stop_clean(daemon)


# The Unix socket: peer uids --------------------------------------------------------------


@pytest.fixture
def open_tmp():
    """A directory others may traverse, so a client under another uid reaches the socket
    (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="netswap-access-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def nbdinfo_as(uid: int | None, uri: str) -> subprocess.CompletedProcess:
    command = ["nbdinfo", "--size", uri]
    if uid is not None:
        command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client under another uid needs root")
def test_unix_socket_clients_are_admitted_by_uid(open_tmp):
    exports = """
        [[exports]]
        name = "rootonly"
        backend = "memory"
        size = "4MiB"
        allow_uids = [0]

        [[exports]]
        name = "nobody"
        backend = "memory"
        size = "4MiB"
        allow_uids = [65534]
    """
    daemon = start_daemon(open_tmp, exports=exports)
    try:
        daemon.unix_socket.chmod(0o666)
        mine = nbdinfo_as(None, daemon.unix_uri("rootonly"))
        assert mine.returncode == 0 and mine.stdout.strip() == str(4 * MiB), mine.stderr
        other = nbdinfo_as(65534, daemon.unix_uri("rootonly"))
        assert other.returncode != 0 and "policy" in other.stderr, other
        theirs = nbdinfo_as(65534, daemon.unix_uri("nobody"))
        assert theirs.returncode == 0, theirs.stderr
        assert nbdinfo_as(None, daemon.unix_uri("nobody")).returncode != 0
        assert "refused uid 65534 access to rootonly: allow" in daemon.log()

        # A node's swap attached over the socket is bound to that uid.
        write_with_libnbd(daemon.unix_uri("swap/local"))
        assert nbdinfo_as(65534, daemon.unix_uri("swap/local")).returncode != 0
        assert nbdinfo_as(None, daemon.unix_uri("swap/local")).returncode == 0
        assert "node 'local' bound to uid 0" in daemon.log()
    finally:
        stop_clean(daemon)


# Binding of a node's swap ----------------------------------------------------------------


def netswapctl(daemon, *args):
    socket_path = daemon.config_path.parent / "control.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
    return subprocess.run([sys.executable, "-m", "netswap.ctl", "--socket", str(socket_path),
                           *args], capture_output=True, text=True, timeout=60, env=env)


def test_a_nodes_swap_is_bound_to_its_first_client_across_restarts(tmp_path):
    options = dict(exports="", swap_size="4MiB", swap_options='detach_grace = "200ms"')
    daemon = start_daemon(tmp_path, **options)
    try:
        write_with_libnbd(daemon.uri("swap/n1"))  # node A attaches first: n1 is A's
        assert not opens(daemon.port, "swap/n1", NODE_B)
        sock = raw_client(daemon.port, NODE_B)
        assert ask(sock, C.OPT_INFO, "swap/n1")[0] == C.REP_ERR_POLICY
        assert "swap/n1" not in listing(sock)
        sock.close()
        assert opens(daemon.port, "swap/n2", NODE_B)  # B gets a node of its own
        assert "swap/n2" not in listing(raw_client(daemon.port, NODE_A))
        assert "swap/n1" in listing(raw_client(daemon.port, NODE_A))
        assert opens(daemon.port, "swap/n1", NODE_A)
        assert metric(daemon, "netswap_access_denied_total", export_reason="swap:bound") >= 2
        assert "refused address 127.0.0.2 access to swap/n1: bound (bound to address 127.0.0.1)" \
            in daemon.log()
    finally:
        stop_clean(daemon)

    bindings = json.loads((daemon.state_dir / "swap-bindings.json").read_text())["nodes"]
    assert bindings == {"n1": "address 127.0.0.1", "n2": "address 127.0.0.2"}
    assert (daemon.state_dir / "swap-bindings.json").stat().st_mode & 0o077 == 0

    daemon = start_daemon(tmp_path, **options)  # the same state dir
    try:
        assert not opens(daemon.port, "swap/n1", NODE_B)
        assert not opens(daemon.port, "swap/n2", NODE_A)
        assert opens(daemon.port, "swap/n1", NODE_A)

        # The node behind A is replaced: the operator's wipe frees n1 for whoever comes next.
        result = netswapctl(daemon, "detach", "n1", "--wipe")
        assert result.returncode == 0, result.stderr
        assert "binding to address 127.0.0.1 dropped" in result.stdout
        assert opens(daemon.port, "swap/n1", NODE_B)
        assert not opens(daemon.port, "swap/n1", NODE_A)
        assert metric(daemon, "netswap_wipes_total", export="swap/n1") == 1
    finally:
        stop_clean(daemon)


def test_help_of_detach_says_wipe_drops_the_binding():
    env = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
    out = subprocess.run([sys.executable, "-m", "netswap.ctl", "detach", "--help"],
                         capture_output=True, text=True, env=env).stdout
    assert "binding" in out


def test_secret_binding_needs_the_nodes_secret(tmp_path):
    swap = f'bind = "secret"\n[swap.secrets]\nn1 = "{SECRET}"\nn2 = "{SECRET[::-1]}"\n'
    daemon = start_daemon(tmp_path, exports="", swap_size="4MiB", swap_options=swap)
    try:
        # Right secret: real clients attach, from any address.
        write_with_libnbd(daemon.uri(f"swap/n1:{SECRET}"))
        info = subprocess.run(["nbdinfo", "--json", daemon.uri(f"swap/n1:{SECRET}")],
                              capture_output=True, text=True, timeout=30)
        assert info.returncode == 0, info.stderr
        # The server names the export without the secret (NBD_INFO_NAME): it is never echoed.
        assert json.loads(info.stdout)["exports"][0]["export-name"] == "swap/n1"
        assert opens(daemon.port, f"swap/n1:{SECRET}", NODE_B)

        # Missing, wrong, another node's, a node without one: refused.
        assert not opens(daemon.port, "swap/n1", NODE_A)
        assert not opens(daemon.port, "swap/n1:" + "x" * len(SECRET), NODE_A)
        assert not opens(daemon.port, f"swap/n1:{SECRET[::-1]}", NODE_A)
        assert not opens(daemon.port, f"swap/n3:{SECRET}", NODE_A)
        assert not opens(daemon.port, f"swap/N1:{SECRET}", NODE_A)
        sock = raw_client(daemon.port, NODE_A)
        send_option(sock, C.OPT_EXPORT_NAME, b"swap/n1:wrong")
        assert closed_by_server(sock)

        # Swap exports are never listed (LIST carries no secret), static ones still are.
        assert [n for n in listing(raw_client(daemon.port, NODE_A)) if n.startswith("swap/")] == []
        assert metric(daemon, "netswap_access_denied_total", export_reason="swap:no_secret") == 1
        assert metric(daemon, "netswap_access_denied_total", export_reason="swap:wrong_secret") >= 4
    finally:
        log = stop_clean(daemon)
    assert SECRET not in log and SECRET[::-1] not in log


# Wipe -------------------------------------------------------------------------------------


def image_holds_pattern(path: Path) -> bool:
    return PATTERN in path.read_bytes()


def test_a_nodes_swap_is_wiped_when_it_detaches_for_good(tmp_path):
    daemon = start_daemon(tmp_path, exports="", swap_size="8MiB",
                          swap_options='detach_grace = "300ms"\nwipe = true')
    image = daemon.state_dir / "swap" / "w1.img"
    try:
        nbd = import_libnbd()
        h = nbd.NBD()
        h.connect_uri(daemon.uri("swap/w1"))
        for offset in range(0, 8 * MiB, MiB):
            h.pwrite(PATTERN, offset)
        h.flush()
        # The data is really in the backing file while the node is attached...
        assert image_holds_pattern(image)
        assert image.stat().st_blocks * 512 >= 8 * len(PATTERN)
        h.shutdown()
        # ...and gone once the grace period has passed.
        wait_for_log(daemon, "export 'swap/w1' wiped (the node detached)")
        assert not image_holds_pattern(image)
        assert image.stat().st_size == 8 * MiB
        assert image.stat().st_blocks * 512 <= 64 * 1024
        assert metric(daemon, "netswap_wipes_total", export="swap/w1") == 1

        # The node comes back to an empty swap, not an error.
        h = nbd.NBD()
        h.connect_uri(daemon.uri("swap/w1"))
        assert h.pread(len(PATTERN), 0) == bytes(len(PATTERN))
        h.shutdown()
    finally:
        stop_clean(daemon)


def test_swap_images_left_on_disk_are_wiped_at_start(tmp_path):
    swap_dir = tmp_path / "state" / "swap"
    swap_dir.mkdir(parents=True, mode=0o700)
    left = swap_dir / "old.img"
    with open(left, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(PATTERN)
    assert image_holds_pattern(left)
    daemon = start_daemon(tmp_path, exports="", swap_size="4MiB", swap_options="wipe = true")
    try:
        assert not image_holds_pattern(left)
        assert left.stat().st_size == 4 * MiB and left.stat().st_blocks == 0
        assert metric(daemon, "netswap_wipes_total", export="swap/old") == 1
        assert "wiped at start (swap.wipe): swap/old" in daemon.log()
    finally:
        stop_clean(daemon)


def test_without_wipe_swap_survives_detach_and_restart(tmp_path):
    # The counterpart of the two tests above: without wipe = true nothing is discarded.
    daemon = start_daemon(tmp_path, exports="", swap_size="4MiB",
                          swap_options='detach_grace = "100ms"')
    image = daemon.state_dir / "swap" / "keep.img"
    try:
        write_with_libnbd(daemon.uri("swap/keep"))
        wait_for_log(daemon, "node 'keep' detached")
    finally:
        stop_clean(daemon)
    assert image_holds_pattern(image)
    daemon = start_daemon(tmp_path, exports="", swap_size="4MiB")
    stop_clean(daemon)
    assert image_holds_pattern(image)


def test_static_export_with_wipe_is_wiped_at_start_and_after_its_last_client(tmp_path):
    exports = """
        [[exports]]
        name = "scratch"
        path = "scratch.img"
        size = "4MiB"
        wipe = true
    """
    backing = tmp_path / "state" / "scratch.img"
    backing.parent.mkdir(parents=True)
    with open(backing, "wb") as f:
        f.truncate(4 * MiB)
        f.write(PATTERN)
    daemon = start_daemon(tmp_path, exports=exports)
    try:
        assert not image_holds_pattern(backing)
        nbd = import_libnbd()
        first, second = nbd.NBD(), nbd.NBD()
        first.connect_uri(daemon.uri("scratch"))
        second.connect_uri(daemon.uri("scratch"))
        first.pwrite(PATTERN, 0)
        first.flush()
        first.shutdown()
        # One client is still connected: its data stays.
        assert second.pread(len(PATTERN), 0) == PATTERN
        assert image_holds_pattern(backing)
        second.shutdown()
        wait_for_log(daemon, "export 'scratch' wiped (its last client disconnected)")
        assert not image_holds_pattern(backing)
        assert metric(daemon, "netswap_wipes_total", export="scratch") == 2  # start + last client
    finally:
        stop_clean(daemon)


def test_config_node_rule_matches_the_registry():
    from netswap import config
    from netswap.swap import nodes

    assert config._NODE_NAME_RE.pattern == nodes.NODE_NAME.pattern
