"""When an NFS swap node holds its reserve.

NFS has no connection per swap device: one TCP connection carries every file of a mount,
and the kernel closes and reopens it at will. So a node's reserve (the lifecycle's attach,
shared with its NBD swap if it has one) follows what the node does: its MNT of the swap
export or its swap-file I/O attaches it, its UMNT or an idle timeout releases it. Record
buffers taken from the reserve hold a loan on it, so a release never destroys a group under
a buffer.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Optional

from ..counters import declare
from ..errors import AttachRefused
from ..swap.nodes import nfs_swap_name

NFS_NODE_RELEASES = declare(
    "nfs", "nfs_node_releases", "netswap_nfs_node_releases_total",
    "NFS swap nodes whose reserve the NFS side gave back, by reason (umnt, idle, stop); "
    "swap.detach_grace runs after it.",
    label="reason")

log = logging.getLogger("netswap.nfs")


class _Hold:
    """The NFS side's attachment of one node, and what keeps it."""

    __slots__ = ("attachment", "last_io", "loans", "ending")

    def __init__(self, attachment) -> None:
        self.attachment = attachment
        self.last_io = time.monotonic()
        self.loans = 0  # buffers taken from the node's reserve, not yet back
        self.ending: Optional[str] = None  # released for good (why) once its loans are back


class _ReserveLoan:
    """A record buffer's claim on its node's reserve: the node stays attached (its groups
    cannot be destroyed under a buffer) until the loan is released."""

    __slots__ = ("group", "_nodes", "_node", "_hold")

    def __init__(self, nodes: "SwapNodes", node: str, hold: _Hold) -> None:
        self.group = hold.attachment.requests
        self._nodes = nodes
        self._node = node
        self._hold = hold

    def release(self) -> None:
        self._nodes._return_loan(self._node, self._hold)


class SwapNodes:
    """Which NFS clients are swap nodes, and when each holds its reserve.

    NFS has no connection per swap device (one connection carries every file of a mount;
    the kernel reconnects at will), so a node's reserve follows what it does instead: it is
    attached on the node's MNT of the swap export or its first READ/WRITE/COMMIT of its swap
    file, and released on its UMNT of the swap export, or when it has made no such call for
    nfs.swap_idle_timeout (then the lifecycle's detach_grace runs as for NBD). A later
    swap-file call attaches again. The kernel's UMNT goes over UDP, which this TCP-only
    server does not hear: the idle timeout is what detaches a Linux node."""

    def __init__(self, config, lifecycle, socket_policy, swap_files, counters) -> None:
        self._nfs = config.nfs
        self._swap = config.swap
        self._lifecycle = lifecycle
        self.socket_policy = socket_policy
        self._swap_files = swap_files
        self._counters = counters
        self._lock = threading.Lock()
        self._holds: dict[str, _Hold] = {}
        # Per node, what the NFS C loops (fastloop.py) read and write: attached or not, and
        # their last swap-file call. Made on a loop's first ask, kept for the daemon's life.
        self._clocks: dict[str, object] = {}
        self._stop = threading.Event()
        self._sweeper: Optional[threading.Thread] = None

    def node_of(self, peer: str):
        if not self._nfs.node_port_allowed(getattr(peer, "port", None)):
            return None
        return self._swap.node_of(peer)

    def names(self) -> set[str]:
        return {name for _, name in self._swap.nodes}

    def start(self) -> None:
        if self._nfs.swap_idle_timeout is not None:
            self._sweeper = threading.Thread(target=self._sweep_loop, name="nfs-idle-detach",
                                             daemon=True)
            self._sweeper.start()

    def stop(self) -> None:
        """Release every node (daemon stop, after the connections ended): for good."""
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join()
        with self._lock:
            holds = list(self._holds.items())
            self._holds.clear()
            for node, _ in holds:
                self._set_attached(node, False)
        for node, hold in holds:
            self._release(node, hold, "stop", for_good=True)

    def clock(self, node: str):
        """The node's NodeClock (nfs/fastloop.py) for a C loop of its connection."""
        from .fastloop import NodeClock
        with self._lock:
            clock = self._clocks.get(node)
            if clock is None:
                clock = self._clocks[node] = NodeClock()
                hold = self._holds.get(node)
                clock.attached = hold is not None and hold.ending is None
            return clock

    def _set_attached(self, node: str, attached: bool) -> None:
        """(Holding the lock.) What the C loops see: while not attached (or released once its
        loans are back) they leave the node's calls to Python, whose swap_activity attaches."""
        clock = self._clocks.get(node)
        if clock is not None:
            clock.attached = attached

    def _last_io(self, node: str, hold: _Hold) -> float:
        """(Holding the lock.) The node's last swap-file call, Python's or a C loop's."""
        clock = self._clocks.get(node)
        return hold.last_io if clock is None else max(hold.last_io, clock.last_io)

    def swap_activity(self, node: str) -> None:
        """The node mounted the swap export or did I/O on its swap file: attach it if it is
        not, and restart its idle clock. A refused attach (the pool cannot back another
        reserve) is logged and counted by the lifecycle; the call itself goes on without a
        reserve, and the next one tries again."""
        with self._lock:
            hold = self._holds.get(node)
            if hold is not None:
                hold.last_io = time.monotonic()
                hold.ending = None  # mounted or used again since
                self._set_attached(node, True)
                return
            try:
                # By node name (swap/attach.py), so a node that also swaps over NBD shares
                # one reserve between the two; swap.wipe scrubs its file when it detaches
                # for good: zeroed in place, still fully allocated (a hole would make swapon
                # refuse it), and given a new generation so that handles from before go stale.
                attachment = self._lifecycle.attach_node(
                    node, nfs_swap_name(node), functools.partial(self._swap_files.scrub, node))
            except AttachRefused as exc:
                log.warning("nfs: node %r not attached: %s", node, exc)
                return
            self._holds[node] = _Hold(attachment)
            self._set_attached(node, True)
        log.info("nfs: node %r attached (swap-file activity)", node)

    def unmounted(self, node: str) -> None:
        """The node's UMNT of the swap export (or UMNTALL): it says it is done, for good."""
        self.release_for_good(node, "umnt")

    def release_for_good(self, node: str, reason: str) -> bool:
        """Release the node's reserve now (UMNT, an operator's detach); with buffers of its
        reserve still out, when the last one is back. False if it was not attached."""
        with self._lock:
            hold = self._holds.get(node)
            if hold is None:
                return False
            self._set_attached(node, False)
            if hold.loans:
                hold.ending = reason  # its last buffer back releases it
                return True
            del self._holds[node]
        self._release(node, hold, reason, for_good=True)
        return True

    def borrow_reserve(self, node: str) -> Optional[_ReserveLoan]:
        """A loan of the node's request reserve for one record, or None if not attached."""
        with self._lock:
            hold = self._holds.get(node)
            if hold is None:
                return None
            hold.loans += 1
            return _ReserveLoan(self, node, hold)

    def _return_loan(self, node: str, hold: _Hold) -> None:
        with self._lock:
            hold.loans -= 1
            if hold.loans or hold.ending is None or self._holds.get(node) is not hold:
                return
            del self._holds[node]
        self._release(node, hold, hold.ending, for_good=True)

    def _sweep_loop(self) -> None:
        timeout = self._nfs.swap_idle_timeout
        while not self._stop.wait(min(timeout / 4, 10.0)):
            self.sweep_idle(time.monotonic() - timeout)

    def sweep_idle(self, before: float) -> None:
        """Release the nodes whose last swap activity is older than `before`."""
        with self._lock:
            idle = [(node, hold) for node, hold in self._holds.items()
                    if self._last_io(node, hold) < before and not hold.loans]
            for node, _ in idle:
                del self._holds[node]
                self._set_attached(node, False)
        for node, hold in idle:
            self._release(node, hold, "idle", for_good=False)

    _WHY = {"umnt": "it unmounted the swap export", "stop": "the daemon stops",
            "operator": "an operator detached it",
            "idle": "no swap-file call for nfs.swap_idle_timeout (its file keeps its pages)"}

    def _release(self, node: str, hold: _Hold, reason: str, for_good: bool) -> None:
        # An idle node's swapped pages are still in its file: not for good, so swap.wipe
        # keeps them when the lifecycle detaches it.
        self._counters.inc(NFS_NODE_RELEASES, reason)
        log.info("nfs: node %r released: %s", node, self._WHY[reason])
        hold.attachment.release(for_good)
