"""What netswapctl can ask of a running daemon: status, exports, detach.

Each command reads snapshots (connections, the reserve tree's C counters, the pressure
monitor) and returns plain JSON-able data; netswapctl formats it for humans or passes it on
with --json.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from . import __version__
from .control import CommandError
from .reserve.tree import render
from .swap.attach import NodeAttached

log = logging.getLogger("netswap.operations")

# How long a detach waits for the node's connections to finish closing.
_DETACH_WAIT = 10.0


class Operations:
    def __init__(self, *, server, registry, lifecycle, pool, tree, pressure, started: float,
                 access=None, nfs=None) -> None:
        self._server = server
        self._nfs = nfs  # the NFS side (NfsService), or None
        self._registry = registry
        self._lifecycle = lifecycle
        self._access = access
        self._pool = pool
        self._tree = tree
        self._pressure = pressure
        self._started = started

    def commands(self) -> dict:
        return {"status": self.status, "exports": self.exports, "detach": self.detach}

    def status(self, _request: dict) -> dict:
        connections = self._server.connections()
        per_export = Counter(c.export.name for c in connections if c.export is not None)
        per_node = Counter(c.export.node for c in connections
                           if c.export is not None and getattr(c.export, "node", None))
        pressure = None
        if self._pressure is not None:
            pressure = {
                "emergency": self._pressure.emergency,
                "transitions": self._pressure.transitions,
                "psi_some_avg10": self._pressure.psi_some_avg10,
                "available_bytes": self._pressure.available_bytes,
            }
        return {
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self._started, 1),
            "connections": len(connections),
            "in_handshake": sum(1 for c in connections if c.export is None),
            "connections_per_export": dict(per_export),
            "connections_per_node": dict(per_node),
            "attached_nodes": self._lifecycle.attached_nodes(),
            "node_slots": _slots(self._lifecycle.node_slots()),
            "exports": [name for name, _ in self._registry.list()],
            "pool": self._pool.stats(),
            "reserve_tree": render(self._tree),
            "pressure": pressure,
        }

    def exports(self, _request: dict) -> dict:
        """Every export. Swap images a previous run left on disk are listed but not opened:
        looking them up would open a file for each, and keep it open, just to be listed."""
        connections = Counter(c.export.name for c in self._server.connections() if c.export is not None)
        open_swap = {export.name: export for export in self._registry.swap_exports().values()}
        rows = []
        for name, description in self._registry.list():
            export = open_swap.get(name)
            if export is None and not name.startswith("swap/"):
                export = self._registry.lookup(name)  # static: never creates anything
            if export is None:
                rows.append({"name": name, "description": description, "swap": True,
                             "open": False, "connections": 0})
                continue
            rows.append({
                "name": name,
                "description": description,
                "size": export.size,
                "read_only": export.read_only,
                "swap": export.is_swap,
                "node": export.node,
                "open": True,
                "backend": type(export.backend).__name__,
                "allocated_bytes": export.backend.allocated_bytes(),
                "connections": connections.get(name, 0),
            })
        return {"exports": rows}

    def detach(self, request: dict) -> dict:
        """Close a node's connections, release its reserve now, and optionally wipe its swap
        and free it from the client it is bound to (a replaced node may then attach)."""
        node = request.get("node")
        if not isinstance(node, str) or not node:
            raise CommandError("detach needs a node name")
        name = f"swap/{node}"
        # Only a node that has a swap export (open, or on disk from an earlier run), over NBD
        # or NFS: looking up any other name would create one.
        over_nbd = name in {listed for listed, _ in self._registry.list()}
        over_nfs = self._nfs is not None and self._nfs.knows_node(node)
        if not over_nbd and not over_nfs:
            raise CommandError(f"no swap export for node {node!r}")
        dropped = self._server.drop_node(node) if over_nbd else 0
        if over_nfs:
            dropped += self._nfs.drop_node(node)
        deadline = time.monotonic() + _DETACH_WAIT
        while self._lifecycle.attached_nodes().get(node, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._lifecycle.attached_nodes().get(node, 0):
            raise CommandError(f"node {node!r}: connections did not close within {_DETACH_WAIT:.0f} s")
        try:
            released = self._lifecycle.release_now(node)
        except NodeAttached:
            raise CommandError(f"node {node!r} attached again during the detach: its reserve "
                               "stays and nothing was wiped; detach it again") from None
        wiped = released and self._lifecycle.wipes_swap  # swap.wipe did it on release
        unbound = None
        if request.get("wipe"):
            if not wiped:
                # Swap holds whatever the node had in memory: discard it all, durably.
                try:
                    if over_nbd:
                        self._lifecycle.wipe(self._registry.lookup(name),
                                             "operator's detach --wipe")
                except NodeAttached:
                    raise CommandError(f"node {node!r} attached again during the detach: its "
                                       "reserve is released, its swap not wiped; detach it "
                                       "again") from None
                if over_nfs:
                    self._nfs.wipe_node(node)  # its writes in flight are held off by the scrub
                wiped = True
            if self._access is not None:
                unbound = self._access.unbind(node)
        log.info("operator detached node %r: %d connections closed, reserve %s%s%s", node,
                 dropped, "released" if released else "was not connected",
                 ", swap wiped" if wiped else "", f", unbound from {unbound}" if unbound else "")
        return {"node": node, "connections_closed": dropped, "reserve_released": released,
                "wiped": wiped, "unbound": unbound}


def _slots(slots) -> dict | None:
    """Lifecycle.node_slots as JSON: {"total", "free"}, None when no swap is served."""
    return None if slots is None else {"total": slots.total, "free": slots.free}
