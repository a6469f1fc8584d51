"""Free node slots, as a node choosing a server sees them (issue 16): the swap exports'
description over INFO/GO and LIST (read with nbdinfo and libnbd), `netswapctl status` and
the metrics, following nodes as they attach, fill the server, and detach."""

from __future__ import annotations

import json
import struct
import subprocess

import pytest

from netswap.nbd import constants as C
from support.daemon import netswapctl, start_daemon, stop_clean, wait_for_log
from support.libnbd import import_libnbd
from support.metrics import metric
from support.nbd_raw import connect_raw, read_option_reply, send_option
from support.wait import wait_until

nbd = import_libnbd()

MAX_NODES = 2
GRACE = 3  # seconds: long enough to look at a node in its grace period, short to wait out
SWAP = f'max_nodes = {MAX_NODES}\ndetach_grace = "{GRACE}s"\ndescription = "netswap swap"\n'


@pytest.fixture
def daemon(tmp_path):
    running = start_daemon(tmp_path, swap_options=SWAP)
    yield running
    stop_clean(running)


def nbdinfo(daemon, *args) -> dict:
    result = subprocess.run(["nbdinfo", "--json", *args], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def described(daemon, node: str) -> str:
    """nbdinfo nbd://…/swap/NODE's description (INFO and GO: it attaches `node`)."""
    [export] = nbdinfo(daemon, daemon.uri(f"swap/{node}"))["exports"]
    return export["description"]


def listed(daemon) -> dict:
    """nbdinfo --list: each export's description."""
    info = nbdinfo(daemon, "--list", f"nbd://127.0.0.1:{daemon.port}")
    return {export["export-name"]: export["description"] for export in info["exports"]}


def list_entries(daemon) -> dict:
    """The descriptions in LIST's own entries (nbdinfo --list shows INFO's where it has one)."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(f"nbd://127.0.0.1:{daemon.port}")
    entries = {}
    h.opt_list(lambda name, description: entries.__setitem__(name, description) or 0)
    h.opt_abort()
    return entries


def status_line(daemon) -> str:
    result = netswapctl(daemon, "status")
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("node slots:")]
    return line


def assert_free(daemon, free: int, attached: tuple[str, ...]) -> None:
    """Every view says `free` of MAX_NODES; `attached`: nodes holding a slot, whose
    nbdinfo takes no new one."""
    note = f"{free} of {MAX_NODES} node slots free"
    assert metric(daemon, "netswap_swap_node_slots") == MAX_NODES
    assert metric(daemon, "netswap_swap_node_slots_free") == free
    assert status_line(daemon) == f"node slots: {free} of {MAX_NODES} free"
    shown, entries = listed(daemon), list_entries(daemon)
    assert shown["disk"] == entries["disk"] == "a file export"  # a static export's own
    for node in attached:
        assert described(daemon, node) == f"netswap swap; {note}"
        assert shown[f"swap/{node}"] == entries[f"swap/{node}"] == f"netswap swap; {note}"


def go_reply(daemon, name: bytes) -> tuple[int, bytes]:
    sock = connect_raw(daemon)
    try:
        send_option(sock, C.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        _, reply_type, message = read_option_reply(sock)
        return reply_type, message
    finally:
        sock.close()


def test_free_slots_go_down_as_nodes_attach_and_up_after_their_grace(daemon):
    assert_free(daemon, 2, attached=())
    a = nbd.NBD()
    a.connect_uri(daemon.uri("swap/a"))
    assert_free(daemon, 1, attached=("a",))
    b = nbd.NBD()
    b.connect_uri(daemon.uri("swap/b"))
    assert_free(daemon, 0, attached=("a", "b"))

    # Full: a third node is refused with ERR_POLICY, and says why.
    c = nbd.NBD()
    with pytest.raises(nbd.Error) as err:
        c.connect_uri(daemon.uri("swap/c"))
    assert "policy" in str(err.value), err.value
    reply_type, message = go_reply(daemon, b"swap/c")
    assert reply_type == C.REP_ERR_POLICY and b"node slots" in message, message
    assert metric(daemon, "netswap_attach_refused_total", reason="max_nodes") == 2

    # b leaves: its slot stays held through its grace period, then is free again.
    b.shutdown()
    wait_for_log(daemon, "node 'b' has no connection left")
    assert metric(daemon, "netswap_swap_node_slots_free") == 0
    assert status_line(daemon) == f"node slots: 0 of {MAX_NODES} free"
    wait_until(lambda: metric(daemon, "netswap_swap_node_slots_free") == 1, timeout=GRACE + 10,
               what="a free slot after b's grace period")
    assert_free(daemon, 1, attached=("a",))

    # Now c gets b's slot.
    c = nbd.NBD()
    c.connect_uri(daemon.uri("swap/c"))
    assert_free(daemon, 0, attached=("a", "c"))
    c.shutdown()
    a.shutdown()
