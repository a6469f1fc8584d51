"""network.shape = true: the daemon puts its qdisc on the interface at start and removes it
on exit (one end of a veth pair stands in for the interface facing the nodes; this kernel
has no dummy interfaces)."""

import subprocess

import pytest

from support.daemon import start_daemon

INTERFACE = "nsshape0"


@pytest.fixture
def veth_interface():
    subprocess.run(["ip", "link", "del", INTERFACE], capture_output=True)
    subprocess.run(["ip", "link", "add", INTERFACE, "type", "veth", "peer", "name", INTERFACE + "p"],
                   check=True)
    subprocess.run(["ip", "link", "set", INTERFACE, "up"], check=True)
    yield INTERFACE
    subprocess.run(["ip", "link", "del", INTERFACE], capture_output=True)


def root_qdisc(interface):
    out = subprocess.run(["tc", "qdisc", "show", "dev", interface, "root"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[1] if out.strip() else ""


def test_daemon_installs_and_removes_its_shaping(tmp_path, veth_interface):
    before = root_qdisc(veth_interface)
    daemon = start_daemon(tmp_path, extra=f"""
        [network]
        mark = 0x5357
        shape = true
        interface = "{veth_interface}"
    """)
    try:
        assert root_qdisc(veth_interface) == "htb"
        filters = subprocess.run(["tc", "filter", "show", "dev", veth_interface],
                                 capture_output=True, text=True, check=True).stdout
        assert filters.strip(), "no mark filter installed"
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert root_qdisc(veth_interface) == before
