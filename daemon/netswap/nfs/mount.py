"""MOUNT v3 (RFC 1813 §5), program 100005 version 3: hands out the root handle of an
export. Access is decided again on every NFS call (exports.py), so MNT grants nothing a
handle would not: it refuses the swap export to a client that is no node only so that the
mount fails where the operator looks, not at the first swapon."""

from __future__ import annotations

import logging

from ..access import ACCESS_DENIED
from ..counters import declare
from ..refusals import RefusalLog
from ..rpc import constants as RC
from ..rpc import message as rpc
from ..rpc import xdr
from ..rpc.message import RPC_PROTOCOL_ERRORS

MOUNT_CALLS = declare(
    "nfs", "mount_calls", "netswap_mount_calls_total",
    "MOUNT v3 calls, by procedure.",
    label="procedure")

log = logging.getLogger("netswap.nfs")

PROGRAM, VERSION = RC.PROG_MOUNT, RC.MOUNT_VERSION
MNT3_OK, MNT3ERR_NOENT, MNT3ERR_ACCES = 0, 2, 13
AUTH_SYS = 1
MNTPATHLEN = 1024
PROCEDURE_NAMES = {0: "null", 1: "mnt", 2: "dump", 3: "umnt", 4: "umntall", 5: "export"}


class MountProgram:
    version = VERSION

    def __init__(self, exports, counters, swap_nodes=None) -> None:
        self.exports = exports
        self._refusals = RefusalLog(log)  # bad calls in a loop must not flood the log
        self.counters = counters
        self.swap_nodes = swap_nodes  # MNT of the swap export attaches the node, UMNT releases it

    @staticmethod
    def procedure_name(call) -> str:
        return PROCEDURE_NAMES.get(call.proc, "unknown")

    def call(self, call, peer: str, release: list, emergency: bool = False,
             stopped=None):
        # `stopped` is for calls that wait for pool memory; none here does.
        name = PROCEDURE_NAMES.get(call.proc)
        if name is None:
            self.counters.inc(RPC_PROTOCOL_ERRORS, "proc_unavail")
            return [rpc.accepted(call.xid, RC.PROC_UNAVAIL)]
        self.counters.inc(MOUNT_CALLS, name)
        # Arguments it cannot decode raise XdrError: the transport answers GARBAGE_ARGS.
        body = getattr(self, "_" + name)(xdr.Unpacker(call.args), peer)
        return [rpc.accepted(call.xid), body]

    def _null(self, args, peer) -> bytes:
        args.done()
        return b""

    def _mnt(self, args, peer) -> bytes:
        path = args.string(MNTPATHLEN).decode("utf-8", "replace")
        args.done()
        packer = xdr.Packer()
        if path not in self.exports.roots:
            self._refusals.log("mnt_noent", logging.INFO, "mount %s: MNT %r: no such export",
                               peer, path)
            packer.uint(MNT3ERR_NOENT)
            return packer.bytes()
        if path == self.exports.config.swap_export and self.exports.node_of(peer) is None:
            self._refusals.log("mnt_acces", logging.WARNING,
                               "mount %s: MNT %r refused: the address is no node in swap.nodes",
                               peer, path)
            self.counters.inc(ACCESS_DENIED, "nfs:not_a_node")
            packer.uint(MNT3ERR_ACCES)
            return packer.bytes()
        log.info("mount %s: mounted %r", peer, path)
        if path == self.exports.config.swap_export and self.swap_nodes is not None:
            self.swap_nodes.swap_activity(self.exports.node_of(peer))
        packer.uint(MNT3_OK)
        packer.opaque(self.exports.root_handle(path))
        packer.uint(1)  # auth_flavors<>: AUTH_SYS only
        packer.uint(AUTH_SYS)
        return packer.bytes()

    def _dump(self, args, peer) -> bytes:
        args.done()
        packer = xdr.Packer()
        packer.bool(False)  # mounts are not tracked: NFSv3 is stateless, UMNT advisory
        return packer.bytes()

    def _umnt(self, args, peer) -> bytes:
        path = args.string(MNTPATHLEN).decode("utf-8", "replace")
        args.done()
        if path == self.exports.config.swap_export:
            self._unmounted(peer)
        return b""

    def _umntall(self, args, peer) -> bytes:
        args.done()
        self._unmounted(peer)
        return b""

    def _unmounted(self, peer: str) -> None:
        """The node says it is done with the swap export: its reserve goes (after
        swap.detach_grace). Advisory in NFSv3, and only ever about the caller's own node."""
        node = self.exports.node_of(peer)
        if node is not None and self.swap_nodes is not None:
            log.info("mount %s: node %r unmounted the swap export", peer, node)
            self.swap_nodes.unmounted(node)

    def _export(self, args, peer) -> bytes:
        args.done()
        packer = xdr.Packer()
        for path in sorted(self.exports.roots):
            packer.bool(True)
            packer.string(path.encode())
            packer.bool(False)  # no groups list: access is by address (swap.nodes)
        packer.bool(False)
        return packer.bytes()
