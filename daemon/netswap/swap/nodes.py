"""Who is which node: what a node may be called, the names its swap goes by on each
protocol, a client's address as the swap rules compare it, and the node an address is.

An IPv4 client reaching a dual-stack listener shows as an IPv4-mapped IPv6 address
(::ffff:a.b.c.d); every rule is written for its IPv4 address, so one IPv4 rule covers both
listeners. That normalisation is made here and nowhere else.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable, Optional, Union

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# A node name is a lower-case RFC 1123 label: it names a file in the swap directories, so it
# can never lead out of them. fullmatch, not match with "$": "$" also matches before a
# trailing newline.
NODE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
SWAP_PREFIX = "swap/"  # a node's NBD swap export is swap/<node>


def valid_node(node: object) -> bool:
    """Whether `node` is a valid swap node name."""
    return isinstance(node, str) and NODE_NAME.fullmatch(node) is not None


def swap_node_from_name(name: str) -> Optional[str]:
    """The node of a valid ``swap/<node>`` NBD export name, else None."""
    if not isinstance(name, str) or not name.startswith(SWAP_PREFIX):
        return None
    node = name[len(SWAP_PREFIX):]
    return node if valid_node(node) else None


def nfs_swap_name(node: str) -> str:
    """The name `node`'s NFS swap file goes by where it is attached (swap/attach.py), wiped
    and measured (the node metrics' export label)."""
    return f"nfs:{node}"


def client_address(host: str) -> Address:
    """The address of a peer as accept() names it (a scope id is dropped), IPv4-mapped
    addresses as their IPv4 address; ValueError if `host` is no address."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(host: str, networks: Iterable[Network]) -> bool:
    """Is the peer at `host` in one of `networks` (swap.node_networks)?"""
    address = client_address(host)
    return any(address in network for network in networks)


def node_named(host: str, nodes: Iterable[tuple[Network, str]]) -> Optional[str]:
    """The node the peer at `host` is, by the first of `nodes` ((network, node) pairs, most
    specific first) that holds its address; None if none does."""
    address = client_address(host)
    for network, node in nodes:
        if address.version == network.version and address in network:
            return node
    return None
