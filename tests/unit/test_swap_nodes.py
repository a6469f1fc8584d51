"""Who is which node: one address normalisation for NBD and NFS (swap/nodes.py)."""

import ipaddress

from netswap.swap.nodes import client_address, in_networks, node_named

NODES = ((ipaddress.ip_network("10.0.0.7/32"), "alpha"),
         (ipaddress.ip_network("10.0.0.0/24"), "rest"),
         (ipaddress.ip_network("fd00::/64"), "six"))


def test_an_ipv4_mapped_peer_is_its_ipv4_address():
    assert client_address("::ffff:10.0.0.7") == ipaddress.ip_address("10.0.0.7")
    assert node_named("::ffff:10.0.0.7", NODES) == node_named("10.0.0.7", NODES) == "alpha"
    assert in_networks("::ffff:10.0.0.9", [NODES[1][0]])


def test_the_most_specific_network_listed_first_wins():
    assert node_named("10.0.0.8", NODES) == "rest"
    assert node_named("10.0.1.8", NODES) is None


def test_ipv6_peers_and_scope_ids():
    assert node_named("fd00::5", NODES) == "six"
    assert client_address("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert not in_networks("fe80::1%eth0", [NODES[2][0]])
