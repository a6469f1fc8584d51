"""Which servers a node swaps on: rendezvous (highest random weight) hashing of the node's name.

Every (server, node) pair gets a weight from a hash of both; a node ranks the servers by
weight and takes the first that accept it (two, mirrored). No coordinator is needed: every
node computes its own answer from the server list alone, the same answer every time, and the
list's order does not matter. When a server is added, a node moves only if the new server
outweighs the ones it had, which is about 1/N of the nodes for N servers; when one is removed,
only its own nodes move, each to its next in rank.

A server is named by its address as the node writes it ("10.0.0.1:10809"), so that two
servers on one host (different ports) weigh differently, and so that every node given the
same list ranks it alike.
"""

from __future__ import annotations

import hashlib
from typing import Sequence, TypeVar

from .config import format_server

Server = TypeVar("Server")


def weight(server: str, node: str) -> int:
    """The pair's weight: 64 bits of BLAKE2b over both names (stable across runs, machines
    and Python versions, unlike hash())."""
    digest = hashlib.blake2b(f"{server}\0{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(node: str, servers: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """`servers` ((host, port) pairs) in the order node `node` tries them: highest weight
    first."""
    return sorted(servers, key=lambda server: weight(format_server(server), node), reverse=True)
