"""The swap side's metrics: the node slots, every attached node (NBD, NFS or both) with its
swap, and the events swap/ declared (attaches, detaches, refusals, wipes)."""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional

from prometheus_client.core import GaugeMetricFamily

from ..metrics import event_families

log = logging.getLogger("netswap.metrics")


class SwapCollector:
    """`lifecycle` says which nodes are attached; `swap_exports()` gives the open NBD swap
    exports by node, `swap_files()` the NFS swap files (None when NFS is off). Only exports
    and files already open are read: neither is ever opened for a scrape."""

    def __init__(self, counters, lifecycle, swap_exports: Callable[[], dict],
                 swap_files: Callable[[], Optional[object]]) -> None:
        self._counters = counters
        self._lifecycle = lifecycle
        self._swap_exports = swap_exports
        self._swap_files = swap_files

    def collect(self) -> Iterator:
        yield from self._slot_metrics()
        yield from self._node_metrics()
        yield from event_families(self._counters, "swap")

    def _slot_metrics(self) -> Iterator:
        slots = self._lifecycle.node_slots()  # as swap/attach.py defines them
        if slots is None:
            return  # no swap is served: no node can attach
        yield GaugeMetricFamily(
            "netswap_swap_node_slots",
            "Swap nodes that may hold a reserve at once (swap.max_nodes).", value=slots.total)
        yield GaugeMetricFamily(
            "netswap_swap_node_slots_free",
            "Swap nodes that could attach now: node slots not held by a node (its detach "
            "grace period included) and that the pool can back.", value=slots.free)

    def _node_metrics(self) -> Iterator:
        labels = ["node", "export"]
        connections = GaugeMetricFamily(
            "netswap_node_connections",
            "Connections of an attached node (0 during the detach grace period).", labels=labels)
        size = GaugeMetricFamily("netswap_node_swap_size_bytes",
                                 "Size of an attached node's swap export.", labels=labels)
        used = GaugeMetricFamily(
            "netswap_node_swap_used_bytes",
            "Bytes of storage an attached node's swap export holds; trimmed ranges are released "
            "(a memory export under mlockall keeps them, zeroed).",
            labels=labels)
        exports = self._swap_exports()
        files = self._swap_files()
        for node, count in sorted(self._lifecycle.attached_nodes().items()):
            export = exports.get(node)
            if export is None and files is not None:
                export = files.opened(node)  # an NFS-only node: its swap file
            if export is None:
                continue
            key = [node, export.name]
            connections.add_metric(key, count)
            size.add_metric(key, export.size)
            try:
                # st_blocks of the image, or the map's pages holding data (a read of
                # /proc/self/pagemap: ~20 ms per 4 GiB, paid by the scrape, not by requests).
                used.add_metric(key, export.backend.allocated_bytes())
            except (OSError, ValueError) as exc:
                # Closed under us at shutdown: the node's other series still say it is there.
                log.debug("metrics: swap of node %r not readable: %s", node, exc)
        yield from (connections, size, used)
