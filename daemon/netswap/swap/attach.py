"""Attaching a node's swap (the seed's part 5): attach, I/O, detach, for both protocols.

Attaching a node's swap, over NBD (a connection to its swap export) or NFS (its MNT or
swap-file I/O, nfs/swapnodes.py), is the seed's swapon: the node's reservation groups
(request buffers and receive windows) are created in the pool and connected, which raises
the pool's watermark by their reservation. The attach is refused if `swap.max_nodes` nodes
hold a reserve already, or if the pool cannot cover it (`Lifecycle.node_slots` says how many
more nodes could attach). While the pool is still being faulted in (the first seconds after
a start), the attach waits until the pool has faulted in enough to back the reservation.
Everything a node attaches through (its NBD connections, its NFS swap file) shares the
node's groups: the node is attached by name, not by export. When the node's last
connection closes, its reservation stays connected for `swap.detach_grace` (a node
reconnecting after a network blip must find its reserve still there); then it is
disconnected and the watermark lowered: the seed's swapoff.

Non-swap (static) NBD exports attach without a reservation: they never touch the reserve.

Wipe (`wipe = true`): a node's swap is discarded when the node detaches for good (its grace
period ends, an operator releases it, the daemon stops), and a static export's contents when
its last connection closes. The wipe runs under the lock that attaching takes, so a client
attaching meanwhile waits and then finds the export empty, never half wiped; and only while
no connection is attached to the node, whose WRITEs would otherwise land after the zeroing
(an NBD connection's requests in flight all end before it lets go of its attachment). An
operator's release or wipe of a node that attached again since its connections were closed
is refused (`NodeAttached`): it would wipe under a live connection, and take its reserve.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

from ..counters import Counters, declare
from ..errors import AttachRefused
from ..reserve.pool import Pool, ReserveError
from ..reserve.tree import Group, node_slot_group, node_template

ATTACH_REFUSED = declare(
    "swap", "attach_refused", "netswap_attach_refused_total",
    "Swap attaches refused, by reason: max_nodes (every node slot is taken), reserve (the "
    "pool could not back the node's reserve).",
    label="reason")
SWAP_ATTACHES = declare(
    "swap", "swap_attaches", "netswap_node_attaches_total",
    "Nodes whose reserve was connected (first NBD connection, or NFS MNT or swap-file I/O, "
    "after none).")
SWAP_DETACHES = declare(
    "swap", "swap_detaches", "netswap_node_detaches_total",
    "Nodes whose reserve was released after the detach grace period.")
WIPES = declare(
    "swap", "wipes", "netswap_wipes_total",
    "Exports whose contents were discarded (wipe = true, or netswapctl detach --wipe).",
    label="export")
WIPE_FAILURES = declare(
    "swap", "wipe_failures", "netswap_wipe_failures_total",
    "Wipes that failed: the export's old contents remain (logged).",
    label="export")

log = logging.getLogger("netswap.lifecycle")


class NodeAttached(Exception):
    """An operator's release or wipe of a node that is attached (again): refused."""


# Discards all of a node's swap behind one name (its NBD export's backend, its NFS swap
# file), durably; raises OSError.
Discard = Callable[[], None]


@dataclass
class Attachment:
    """What one user of a node's swap (an NBD connection, the NFS side's hold on a node)
    or one connection to a static export holds while attached."""

    node: Optional[str] = None  # the node, for a swap attachment
    requests: Optional[object] = None  # PoolGroup charged for request buffers, swap only
    windows: Optional[object] = None  # PoolGroup charged for receive windows, swap only
    static_export: Optional[object] = None  # a wipe = true static export, counted
    _lifecycle: Optional["Lifecycle"] = None

    @property
    def is_swap(self) -> bool:
        return self.requests is not None

    def release(self, for_good: bool = True) -> None:
        """Give the attachment back. `for_good` = False: the node is only idle (NFS), its
        swap still holds its pages, so swap.wipe must not discard them when it detaches."""
        if self._lifecycle is not None:
            if self.is_swap:
                self._lifecycle._release(self.node, for_good)
            else:
                self._lifecycle._release_static(self.static_export)
        self._lifecycle = None


@dataclass(frozen=True)
class NodeSlots:
    """How many more nodes could attach now (`free`) of the `total` (swap.max_nodes); see
    Lifecycle.node_slots."""

    total: int
    free: int

    def __str__(self) -> str:
        return f"{self.free} of {self.total} node slots free"

    def describe(self, description: str, limit: int) -> str:
        """A swap export's description with the count behind it ("netswap per-node swap; 3
        of 8 node slots free"), at most `limit` UTF-8 bytes: the description is what is
        cut, never the count."""
        note = str(self)
        if not description:
            return note
        room = max(limit - len(note.encode()) - 2, 0)
        return f"{description.encode()[:room].decode(errors='ignore')}; {note}"


class _Node:
    def __init__(self, tree_entry: Group, name: str, discard: Discard) -> None:
        self.tree_entry = tree_entry
        # Every name the node attached through (its NBD swap export, its NFS swap file),
        # with how to discard it: swap.wipe discards all of them when it detaches for good.
        self.discards = {name: discard}
        self.connections = 0
        self.expiry: Optional[threading.Timer] = None
        self.wipe_at_expiry = True  # as the last release said (for good, or only idle)

    @property
    def groups(self):
        return [child.pool_group for child in self.tree_entry.children]


class Lifecycle:
    def __init__(self, pool: Pool, tree: Group, config, counters: Counters) -> None:
        self._pool = pool
        self._tree = tree
        self._config = config
        self._counters = counters
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self._closed = False
        self._static_lock = threading.Lock()  # held while a static export is wiped
        self._static_users: Counter = Counter()  # static Export -> its open connections
        # Tagged-by-peer connections whose export turns out not to be swap draw on this group
        # (their data is received before it is routed); it is part of the pool's sizing, so
        # it is connected for the daemon's whole life.
        unrouted = tree.find("unrouted")
        self.unrouted = pool.group(unrouted.reservation)
        self.unrouted.connect()
        unrouted.pool_group = self.unrouted
        self._nbd = tree.find("nbd")
        self._slot = node_slot_group(tree)  # None: no swap is served

    def apply_config(self, config) -> None:
        """A reload: reserve sizes are fixed at start (they sized the pool), but the grace
        period applies to detaches from now on."""
        self._config = config

    def attach(self, export) -> Attachment:
        """Attach an NBD connection to `export`; raises AttachRefused if its reserve cannot
        be backed."""
        if not getattr(export, "is_swap", False):
            if not self._static_wipes(export):
                return Attachment()
            # Counted (only) to know when the last client of a wipe = true export leaves.
            with self._static_lock:
                self._static_users[export] += 1
            return Attachment(static_export=export, _lifecycle=self)
        return self.attach_node(export.node, export.name, _backend_discard(export))

    def attach_node(self, node_name: str, name: str, discard: Discard) -> Attachment:
        """Attach one user of node `node_name`'s swap, reached as `name` (what swap.wipe
        discards through `discard` when the node detaches for good); raises AttachRefused
        if the node's reserve cannot be backed. Both protocols attach a node here, so a
        node swapping over NBD and NFS has one reserve."""
        with self._lock:
            if self._closed:
                raise AttachRefused("netswapd is shutting down", "shutdown")
            node = self._nodes.get(node_name)
            if node is None:
                self._check_slot_left(node_name)
                node = self._connect(node_name, name, discard)
                self._nodes[node_name] = node
            elif node.expiry is not None:
                node.expiry.cancel()  # reattached within the grace period: keep the reserve
                node.expiry = None
            node.discards.setdefault(name, discard)
            node.connections += 1
        requests, windows = node.groups
        return Attachment(node_name, requests, windows, _lifecycle=self)

    def attached_nodes(self) -> dict[str, int]:
        """Node name -> connections, for nodes whose reserve is connected (grace included)."""
        with self._lock:
            return {name: node.connections for name, node in self._nodes.items()}

    def node_slots(self) -> Optional[NodeSlots]:
        """The node slots: `total` = swap.max_nodes, `free` = how many nodes that hold no
        reserve now could attach right now (what a node choosing a server needs to know).

        A node slot is one node's reserve (reserve/tree.py: max_nodes of them sized the
        pool). A node holds its slot from its first attach, over NBD or NFS, until its
        reserve is released: its grace period (swap.detach_grace) after its last connection
        included, since it may come back. A node that holds one attaches again without
        another. So

            free = min(max_nodes - nodes holding a reserve,
                       node reserves the pool can still back: (pool size - pool.normal_budget
                       - watermark) // one node's reserve)

        which is what attach_node checks, in that order. With the pool sized from the tree
        the pool's term is never the smaller one (it backs max_nodes reserves and what
        pool.headroom spares, and the keys that size a reserve need a restart); it stays so
        that the count remains true to the pool if that ever changes. While the pool is
        still being faulted in at start a free slot's attach waits, it is not refused. 0
        once the daemon is stopping; None when no swap is served at all.

        Read without the lock attach holds while a reserve is being connected (which can
        wait for the pool's prefault): a snapshot, as a scrape or a handshake wants it.
        """
        if self._slot is None:
            return None
        total = self._config.swap.max_nodes
        if self._closed:
            return NodeSlots(total, 0)
        held = len(self._nodes)
        stats = self._pool.stats()
        room = self._pool.size - stats["min_normal"] - stats["watermark"]
        backed = max(room, 0) // self._slot.each
        return NodeSlots(total, max(0, min(total - held, backed)))

    @property
    def wipes_swap(self) -> bool:
        """Is a node's swap wiped when it detaches for good (swap.wipe)?"""
        return self._config.swap.wipe

    def wipe(self, export, why: str) -> None:
        """Discard all of NBD `export`'s contents and make that durable; raises OSError. A
        node's swap export only while the node is not attached (NodeAttached otherwise), and
        under the attach lock, so none attaches while it is wiped."""
        if not getattr(export, "is_swap", False):
            self._discard(export.name, _backend_discard(export), why)
            return
        with self._lock:
            if export.node in self._nodes:
                raise NodeAttached(f"node {export.node!r} is attached")
            self._discard(export.name, _backend_discard(export), why)

    def _discard(self, name: str, discard: Discard, why: str) -> None:
        discard()
        self._counters.inc(WIPES, name)
        log.info("export %r wiped (%s)", name, why)

    def release_now(self, name: str) -> bool:
        """Release a node's reserve without waiting for the grace period (an operator's
        detach, once its connections are closed). False if it had none connected;
        NodeAttached if a connection attached it again since."""
        with self._lock:
            if name not in self._nodes:
                return False
        self._expire(name, force=True, operator=True)
        return True

    def close(self) -> None:
        """Disconnect every reservation (daemon shutdown, after all connections ended)."""
        with self._lock:
            self._closed = True
            nodes = list(self._nodes)
        for name in nodes:
            self._expire(name, force=True)
        self.unrouted.disconnect()

    # Internals ----------------------------------------------------------------

    def _check_slot_left(self, node_name: str) -> None:
        # swap.max_nodes is what sized the pool: the pool also backs a node or so more out
        # of pool.headroom, but that is the allocator's slack, not a node's, and a node
        # choosing among servers must be able to trust the count they advertise.
        max_nodes = self._config.swap.max_nodes
        if len(self._nodes) < max_nodes:
            return
        self._counters.inc(ATTACH_REFUSED, "max_nodes")
        log.warning("refusing swap attach of node %r: all %d node slots are taken "
                    "(swap.max_nodes)", node_name, max_nodes)
        raise AttachRefused(
            f"swap/{node_name}: all {max_nodes} node slots of this server are taken", "max_nodes")

    def _connect(self, node_name: str, name: str, discard: Discard) -> _Node:
        entry = node_template(self._config, f"swap/{node_name}")
        connected = []
        try:
            for child in entry.children:
                group = self._pool.group(child.reservation)
                child.pool_group = group
                group.connect()
                connected.append(group)
        except ReserveError as exc:
            for group in connected:
                group.disconnect()
            for child in entry.children:
                if child.pool_group is not None:
                    child.pool_group.destroy()
            self._counters.inc(ATTACH_REFUSED, "reserve")
            log.warning("refusing swap attach of node %r: %s", node_name, exc)
            raise AttachRefused(
                f"swap/{node_name}: the pool cannot back this node's reserve: {exc}", "reserve"
            ) from exc
        self._nbd.children.append(entry)
        self._counters.inc(SWAP_ATTACHES)
        log.info("node %r attached: reserve of %d bytes connected, watermark now %d",
                 node_name, entry.total, self._pool.watermark)
        return _Node(entry, name, discard)

    def _release(self, name: str, for_good: bool = True) -> None:
        with self._lock:
            node = self._nodes.get(name)
            if node is None:
                return
            node.connections -= 1
            if node.connections > 0 or self._closed:
                return
            node.wipe_at_expiry = for_good
            grace = self._config.swap.detach_grace
            node.expiry = threading.Timer(grace, self._expire, args=(name,))
            node.expiry.daemon = True
            node.expiry.start()
            log.info("node %r has no connection left; its reserve stays %.0f s", name, grace)

    def _release_static(self, export) -> None:
        with self._static_lock:
            self._static_users[export] -= 1
            if self._static_users[export] > 0:
                return
            del self._static_users[export]
            self._wipe_logged(export.name, _backend_discard(export),
                              "its last client disconnected")

    def _static_wipes(self, export) -> bool:
        return any(spec.name == export.name and spec.wipe for spec in self._config.exports)

    def _wipe_logged(self, name: str, discard: Discard, why: str) -> None:
        try:
            self._discard(name, discard, why)
        except OSError as exc:
            # The data is still there: say so loudly, the operator promised it would not be.
            self._counters.inc(WIPE_FAILURES, name)
            log.error("export %r: wipe failed, its old contents remain: %s", name, exc)

    def _expire(self, name: str, force: bool = False, operator: bool = False) -> None:
        with self._lock:
            node = self._nodes.get(name)
            if node is not None and node.connections and operator:
                # Its connections closed, but one came back before this: wiping now would
                # race that connection's writes, and destroying the groups pull its reserve.
                raise NodeAttached(f"node {name!r} attached again")
            if node is None or (node.connections and not force):
                return  # reattached since the timer was set
            if node.expiry is not None:
                node.expiry.cancel()
            # An operator's detach and the daemon's stop (force) are for good.
            if self.wipes_swap and (force or node.wipe_at_expiry):
                for swap_name, discard in node.discards.items():
                    self._wipe_logged(swap_name, discard, "the node detached")
            del self._nodes[name]
            self._nbd.children.remove(node.tree_entry)
        for group in node.groups:
            group.disconnect()
            group.destroy()
        self._counters.inc(SWAP_DETACHES)
        log.info("node %r detached: reserve released, watermark now %d", name, self._pool.watermark)


def _backend_discard(export) -> Discard:
    """Discard an NBD export's contents: one request for the whole export, a hole punched
    in a file (fdatasync'd), pages dropped from a memory map; reads return zeros either way."""
    return lambda: export.backend.write_zeroes(0, export.size, may_trim=True, fua=True)
