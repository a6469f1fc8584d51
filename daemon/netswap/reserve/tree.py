"""Reservation groups (the seed's part 3a): a tree of named limits whose sum sizes the pool.

    netswapd
    ├── normal                       pool.normal_budget: non-swap consumers and swap's normal path
    └── nbd
        ├── unrouted                 connections tagged by peer address whose export is not swap
        └── swap/<node> × max_nodes  one slot per node that may be attached at once (its
            │                        swap over NBD, NFS or both)
            ├── requests             swap.reserve_inflight × swap.reserve_request
            └── windows              swap.max_connections × the receive window

A leaf's reservation comes from configuration; an inner group's is the sum of its children.
The pool is the root's total plus pool.headroom, so every reservation a node can be promised
is backed by locked memory before the first node attaches. The leaves that draw on the pool
are C pool groups (reserve/pool.py): their usage is charged and uncharged in C, and this tree
only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

from ..config import Config, ConfigError, format_size
from ..counters import declare
from ..transport.window import DEFAULT_WINDOW

EMERGENCY_DROPPED = declare(
    "reserve", "emergency_dropped", "netswap_emergency_dropped_total",
    "Reserve buffers released unprocessed because their consumer is not swap.",
    label="consumer")
POOL_WAITS = declare(
    "reserve", "pool_waits", "netswap_held_back_total",
    "Requests that waited for pool memory (the reader stopped reading).",
    label="consumer")

# Kernel socket buffers of a swap connection are sized to hold its in-flight data; they are
# kernel memory, shown beside the tree but not drawn from the pool.
SOCKET_BUFFER_MIN = 256 * 1024
# The name of the node slots' template group (followed by "×max_nodes").
NODE_SLOTS = "swap/<node>"


@dataclass
class Group:
    """One named group. Leaves that draw on the pool carry a C pool group."""

    name: str
    reservation: int = 0
    children: list["Group"] = field(default_factory=list)
    count: int = 1  # a template slot stands for `count` identical groups
    detail: str = ""  # how the reservation was derived, for operators
    pool_group: object = None  # reserve.pool.PoolGroup for leaves that are live

    @property
    def total(self) -> int:
        """Bytes this group (all `count` copies of it) reserves."""
        own = sum(child.total for child in self.children) if self.children else self.reservation
        return own * self.count

    @property
    def each(self) -> int:
        return self.total // self.count

    def usage(self) -> int:
        if self.children:
            return sum(child.usage() for child in self.children)
        return self.pool_group.stats()["usage"] if self.pool_group is not None else 0

    def walk(self, depth: int = 0) -> Iterator[tuple[int, "Group"]]:
        yield depth, self
        for child in self.children:
            yield from child.walk(depth + 1)

    def find(self, name: str) -> Optional["Group"]:
        return next((group for _, group in self.walk() if group.name == name), None)


def node_template(config: Config, name: str = "swap/<node>", count: int = 1) -> Group:
    swap = config.swap
    return Group(
        name,
        count=count,
        children=[
            Group("requests", swap.reserve_inflight * swap.reserve_request,
                  detail=f"{swap.reserve_inflight} × {format_size(swap.reserve_request)}"),
            Group("windows", swap.max_connections * DEFAULT_WINDOW,
                  detail=f"{swap.max_connections} × {format_size(DEFAULT_WINDOW)}"),
        ],
    )


def node_slot_group(tree: Group) -> Optional[Group]:
    """The template of the node slots (`count` = swap.max_nodes, `each` = one node's reserve),
    or None when the daemon serves no swap (neither over NBD nor over NFS)."""
    nbd = tree.find("nbd")
    return next((group for group in nbd.children if group.name.startswith(NODE_SLOTS)), None)


def build_tree(config: Config) -> Group:
    """The reservation tree the configuration asks for (no node attached yet)."""
    swap = config.swap
    unrouted = Group("unrouted", swap.reserve_inflight * swap.reserve_request,
                     detail="tagged-by-peer connections to non-swap exports")
    nbd = Group("nbd", children=[unrouted])
    # A node's reserve serves its swap over NBD, NFS or both (one slot per node).
    if swap.enabled or (config.nfs.enabled and config.nfs.swap_export):
        template = node_template(config, f"{NODE_SLOTS} ×{swap.max_nodes}", swap.max_nodes)
        template.detail = "a swap node, over NBD or NFS"
        nbd.children.append(template)
    return Group("netswapd", children=[
        Group("normal", config.pool.normal_budget, detail="pool.normal_budget"),
        nbd,
    ])


def pool_size(config: Config, tree: Group) -> int:
    """pool bytes = the tree's total + headroom, or the explicit pool.size if it covers that."""
    needed = tree.total + config.pool.headroom
    needed = -(-needed // 4096) * 4096
    if config.pool.size is None:
        return needed
    if config.pool.size < needed:
        raise ConfigError(
            "pool.size",
            f"is smaller than the reservations it must back ({human_size(needed)} = reserve tree "
            f"{human_size(tree.total)} + pool.headroom {human_size(config.pool.headroom)})",
            value=config.pool.size,
            allowed=f'"auto" or at least {needed} bytes; or lower pool.normal_budget, '
            "swap.max_nodes, swap.reserve_inflight or swap.reserve_request",
            source=config.source,
        )
    return config.pool.size


def socket_buffer_size(config: Config) -> int:
    """SO_SNDBUF/SO_RCVBUF of a swap connection: room for the in-flight data it may have."""
    swap = config.swap
    return max(SOCKET_BUFFER_MIN, swap.reserve_inflight * swap.reserve_request // swap.max_connections)


def human_size(n: int) -> str:
    """Bytes for a human: exact units where they divide ("4MiB"), else one decimal ("4.3MiB")."""
    exact = format_size(n)
    if not exact.endswith("bytes") or n < 1024:
        return exact if n else "0"
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f}{unit}"
    return exact


def render(tree: Group, *, with_usage: bool = True) -> str:
    """The tree as indented text: name, reservation, usage, and how it was derived."""
    rows = []
    for depth, group in tree.walk():
        label = "  " * depth + group.name
        each = f" ({human_size(group.each)} each)" if group.count > 1 else ""
        usage = f"{human_size(group.usage()):>10}" if with_usage else ""
        notes = " ".join(part for part in (group.detail, each.strip()) if part)
        rows.append(f"{label:<34}{human_size(group.total):>10}{usage}  {notes}".rstrip())
    header = f"{'group':<34}{'reserved':>10}{'used' if with_usage else '':>10}".rstrip()
    return "\n".join([header, *rows])
