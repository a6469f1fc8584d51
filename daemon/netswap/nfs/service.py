"""The NFS side of the daemon, put together: the exports, the swap nodes, and MOUNT, NFSv3
and the portmapper each on its listeners (server.py)."""

from __future__ import annotations

import functools
import time

from ..swap.attach import WIPES
from ..transport.admission import ConnectionLimits
from . import fastloop, mount, nfs3
from .exports import NfsExports
from .portmapper import Portmapper
from .server import RECORD_SLACK, RpcServer
from .swapnodes import SwapNodes


class NfsService:
    """The NFS side of the daemon: exports, swap nodes, MOUNT, NFSv3 and the portmapper."""

    def __init__(self, config, pool, counters, workers, send_poller, lifecycle,
                 socket_policy) -> None:
        nfs = config.nfs
        self._counters = counters
        self.exports = NfsExports(config, config.daemon.state_dir)
        self.swap_nodes = (SwapNodes(config, lifecycle, socket_policy, self.exports.swap,
                                     counters) if nfs.swap_export else None)
        max_record = nfs.max_io + RECORD_SLACK
        # NFS and MOUNT count together, apart from the NBD side's budget: a flood on one
        # service cannot lock swap nodes out of the other.
        limits = ConnectionLimits(nfs.max_connections, nfs.max_connections_per_client,
                                  ("nfs.max_connections", "nfs.max_connections_per_client"))
        program = nfs3.Nfs3Program(self.exports, pool, counters, nfs.max_io, self.swap_nodes)
        fast_loop = None
        if nfs.c_loop and (self.swap_nodes is not None or nfs.scratch_export):
            # The scrub epoch the C loops compare their swap handles' with, and their writes
            # a scrub waits for (fastloop.py).
            self._scrub = fastloop.ScrubState()
            if self.exports.swap is not None:
                self.exports.swap.loops = self._scrub

            def connection_fast_loop(connection):
                # A swap node's connection: its swap file and scratch files; anyone else's:
                # scratch files (a clock never attached: no swap file is served there).
                node = connection.node
                if node is None and not nfs.scratch_export:
                    return None
                clock = (self.swap_nodes.clock(node) if node is not None
                         else fastloop.NodeClock())
                return fastloop.NfsFastLoop(
                    sock_fd=connection.sock.fileno(), pool=pool, max_record=max_record,
                    max_io=nfs.max_io, exports=self.exports, verifier=program.verifier,
                    scrub=self._scrub, node_clock=clock, gate=connection.sender.gate,
                    counters=counters, service="nfs", peer=connection.peer, node=node,
                    record_timeout=nfs.record_timeout)
            fast_loop = connection_fast_loop
        self.nfs = RpcServer("nfs", nfs.listen, {nfs3.PROGRAM: program},
                             pool, counters, workers, send_poller, max_record, "nfs.listen",
                             swap_nodes=self.swap_nodes, limits=limits,
                             keepalive=nfs.keepalive, fast_loop=fast_loop,
                             record_timeout=nfs.record_timeout)
        self.mount = RpcServer("mount", nfs.mount_listen,
                               {mount.PROGRAM: mount.MountProgram(self.exports, counters,
                                                                  self.swap_nodes)},
                               pool, counters, workers, send_poller, max_record,
                               "nfs.mount_listen", limits=limits, keepalive=nfs.keepalive,
                               record_timeout=nfs.record_timeout)
        self.portmapper = Portmapper(nfs, counters, functools.partial(
            RpcServer, pool=pool, counters=counters, workers=workers, send_poller=send_poller,
            limits=limits, keepalive=nfs.keepalive, record_timeout=nfs.record_timeout))

    def start(self, wipe: bool = False) -> None:
        """Listen; with `wipe` (swap.wipe), first zero what a previous run left in every
        node's swap file, before any client can reach it."""
        if wipe and self.exports.swap is not None:
            for node in self.exports.swap.nodes():
                self.wipe_node(node)
        self.mount.start()
        try:
            self.nfs.start()
            self.portmapper.start(self.nfs, self.mount)  # publishes the ports just bound
        except BaseException:
            self.nfs.stop(0)
            self.mount.stop(0)
            raise
        if self.swap_nodes is not None:
            self.swap_nodes.start()

    def connection_counts(self) -> dict[str, int]:
        """Open connections per service (nfs, mount, portmap), for the metrics."""
        servers = [self.nfs, self.mount]
        if self.portmapper.server is not None:
            servers.append(self.portmapper.server)
        return {server.name: server.connection_count for server in servers}

    def knows_node(self, node: str) -> bool:
        """Is `node` a swap node here (named in swap.nodes, or with a swap file on disk)?"""
        if self.swap_nodes is None:
            return False
        return node in self.swap_nodes.names() or node in self.exports.swap.nodes()

    def drop_node(self, node: str) -> int:
        """An operator's detach: close the node's NFS connections and release its reserve
        for good. Returns how many connections were closed. A live node reconnects (hard
        mounts retry) and its next swap-file call attaches it again."""
        closed = self.nfs.close_node(node)
        if self.swap_nodes is not None:
            self.swap_nodes.release_for_good(node, "operator")
        return closed

    def wipe_node(self, node: str) -> bool:
        """Zero the node's NFS swap file (new generation: its handles go stale)."""
        if self.exports.swap is None or self.exports.swap.scrub(node) is None:
            return False
        self._counters.inc(WIPES, f"nfs:{node}")
        return True

    def stop(self, timeout: float) -> bool:
        """Close every connection and wait up to `timeout` seconds for their calls to end;
        True if they all did. The swap files are closed and the nodes' reserves released
        only then: a call still running could otherwise write through a descriptor number
        that now names another file, or hold a buffer of a reserve being destroyed."""
        deadline = time.monotonic() + timeout
        self.portmapper.stop(timeout)  # unregistered first: no client is sent here meanwhile
        clean = self.nfs.stop(max(0.0, deadline - time.monotonic()))
        clean = self.mount.stop(max(0.0, deadline - time.monotonic())) and clean
        if clean:
            if self.swap_nodes is not None:
                self.swap_nodes.stop()
            self.exports.close()
        return clean
