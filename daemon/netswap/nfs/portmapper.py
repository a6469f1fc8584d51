"""How NFS clients find the NFS and MOUNT ports without port= and mountport= (nfs.portmapper).

"serve": netswapd answers PMAP v2 itself on nfs.portmapper_listen (rpc/portmap.py: a fixed
table of NFS v3, MOUNT v3 and the portmapper, all TCP; SET/UNSET refused, CALLIT refused).
It fails the start like any listener whose address is taken, since an operator asked for it.

"register": at start the mappings are SET at the rpcbind listening on nfs.rpcbind_socket
(its AF_LOCAL socket, where it accepts SET from local callers and records their uid), and at
stop exactly the ones that were taken are UNSET. Nothing here is fatal: without an rpcbind,
or with one that refuses, the daemon logs a warning, counts it, and serves as before (clients
then give the ports). A mapping rpcbind already holds for another address belongs to
someone else (knfsd, nfs-ganesha) and is left alone, never replaced or removed. One that
already points at our own address (left by a run that was killed) rpcbind accepts again as
a SET like any other, so a restart takes it over.

"off": neither.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
from typing import Callable, Optional

from ..counters import declare
from ..rpc import constants as RC
from ..rpc import message as rpc
from ..rpc import portmap

RPCBIND_REGISTRATION_FAILURES = declare(
    "nfs", "rpcbind_registration_failures", "netswap_rpcbind_registration_failures_total",
    "NFS and MOUNT mappings the local rpcbind did not take (or give back at stop), by reason.",
    label="reason")

log = logging.getLogger("netswap.nfs")

# A call is its RPC header (credentials at most 400 bytes each) and a mapping (four words)
# or an rpcb (two words and three short strings).
PORTMAP_MAX_RECORD = 2048
# rpcbind answers from memory; a slow answer means it is stuck, and the start must not be.
RPCBIND_TIMEOUT = 2.0
# A DUMP lists every registration of the host: generous, but bounded.
RPCBIND_MAX_REPLY = 1 << 20

NFS_PROGRAM, NFS_VERSION = RC.PROG_NFS, RC.NFS_VERSION
MOUNT_PROGRAM, MOUNT_VERSION = RC.PROG_MOUNT, RC.MOUNT_VERSION


class Portmapper:
    """The nfs.portmapper mode, started after the NFS and MOUNT listeners have their ports.

    `serve_rpc(name, addresses, programs, max_record=, key=)` makes an RpcServer (the NFS
    transport, with the daemon's pool and workers)."""

    def __init__(self, nfs_config, counters, serve_rpc: Callable) -> None:
        self.mode = nfs_config.portmapper
        self._program: Optional[portmap.PortmapProgram] = None
        self.server = None
        self._registrar: Optional[RpcbindRegistrar] = None
        if self.mode == "serve":
            self._program = portmap.PortmapProgram(counters)
            self.server = serve_rpc("portmap", nfs_config.portmapper_listen,
                                    {portmap.PROGRAM: self._program},
                                    max_record=PORTMAP_MAX_RECORD, key="nfs.portmapper_listen")
        elif self.mode == "register":
            self._registrar = RpcbindRegistrar(nfs_config.rpcbind_socket, counters)

    def start(self, nfs, mount) -> None:
        """`nfs` and `mount`: the started RpcServers whose ports are published."""
        if self.server is not None:
            self.server.start()
            self._program.publish(served_table(nfs, mount, self.server))
        if self._registrar is not None:
            self._registrar.register(published(((nfs, NFS_PROGRAM, NFS_VERSION),
                                                (mount, MOUNT_PROGRAM, MOUNT_VERSION))))

    def stop(self, timeout: float) -> None:
        if self._registrar is not None:
            self._registrar.unregister()
        if self.server is not None:
            self.server.stop(timeout)


def published(programs) -> list[portmap.Registration]:
    """Entries for (server, prog, vers) triples: per program, the first listener of each
    address family (rpcbind keeps one address per program, version and netid)."""
    entries: list[portmap.Registration] = []
    for server, prog, vers in programs:
        netids = set()
        for host, port in server.addresses:
            netid, address = portmap.universal_address(host, port)
            if netid not in netids:
                netids.add(netid)
                entries.append(portmap.Registration(prog, vers, netid, address, "netswapd"))
    return entries


def served_table(nfs, mount, portmapper) -> tuple[portmap.Registration, ...]:
    """Our own portmapper's table: NFS v3, MOUNT v3 and the portmapper v2-v4, all TCP.

    rpcbind answers GETADDR for a wildcard listener with the address the caller reached it
    on; the transport does not tell us that, so a wildcard is answered with the
    portmapper's own first specific address of the family (the caller reached us there),
    and stays the wildcard when the portmapper listens on a wildcard too. PMAP v2 answers
    carry only the port and are unaffected."""
    entries = published(((nfs, NFS_PROGRAM, NFS_VERSION),
                         (mount, MOUNT_PROGRAM, MOUNT_VERSION),
                         *((portmapper, portmap.PROGRAM, vers) for vers in (2, 3, 4))))
    specific = {}
    for host, port in portmapper.addresses:
        netid, address = portmap.universal_address(host, port)
        if not ipaddress.ip_address(host or "0.0.0.0").is_unspecified:
            specific.setdefault(netid, address.rsplit(".", 2)[0])
    table = []
    for entry in entries:
        host, high, low = entry.address.rsplit(".", 2)
        if ipaddress.ip_address(host).is_unspecified and entry.netid in specific:
            entry = dataclasses.replace(entry, address=f"{specific[entry.netid]}.{high}.{low}")
        table.append(entry)
    return tuple(table)


class RpcbindUnavailable(Exception):
    """No rpcbind answered on the socket (absent, not running, stuck, or not rpcbind)."""


class RpcbindRegistrar:
    """SET at start, UNSET at stop, on the local rpcbind's AF_LOCAL socket (blocking, one
    connection per batch: this runs twice in the daemon's life)."""

    def __init__(self, socket_path, counters, timeout: float = RPCBIND_TIMEOUT) -> None:
        self.socket_path = str(socket_path)
        self.counters = counters
        self.timeout = timeout
        self.registered: list[portmap.Registration] = []  # what stop must UNSET
        self._xid = 0

    def register(self, entries: list[portmap.Registration]) -> None:
        if not entries:
            return
        try:
            with self._connect() as sock:
                for entry in entries:
                    self._register_one(sock, entry)
        except RpcbindUnavailable as exc:
            left = len(entries) - len(self.registered)
            self.counters.inc(RPCBIND_REGISTRATION_FAILURES, "unreachable", left)
            log.warning("rpcbind: %s; NFS clients must give port= and mountport= "
                        "(or set nfs.portmapper = \"serve\")", exc)

    def _register_one(self, sock, entry: portmap.Registration) -> None:
        what = _describe(entry)
        if self._exchange_bool(sock, portmap.set_call, entry):
            self.registered.append(entry)
            log.info("rpcbind: registered %s", what)
            return
        # FALSE: rpcbind maps this program, version and netid to another address (to the
        # same one it answers TRUE). Another server's, which is not ours to touch; the DUMP
        # only tells the operator whose.
        held = [found for found in self._dump(sock)
                if (found.prog, found.vers, found.netid) == (entry.prog, entry.vers,
                                                              entry.netid)]
        self.counters.inc(RPCBIND_REGISTRATION_FAILURES, "taken")
        others = ", ".join(found.address for found in held) or "an address it did not list"
        log.warning("rpcbind: not registering %s: rpcbind maps it to %s already (another "
                    "NFS server?); clients must give the port", what, others)

    def unregister(self) -> None:
        if not self.registered:
            return
        entries, self.registered = self.registered, []
        try:
            with self._connect() as sock:
                while entries:
                    entry = entries[0]
                    if not self._exchange_bool(sock, portmap.unset_call, entry):
                        self.counters.inc(RPCBIND_REGISTRATION_FAILURES, "unset_refused")
                        log.warning("rpcbind: UNSET of %s refused", _describe(entry))
                    else:
                        log.info("rpcbind: unregistered %s", _describe(entry))
                    entries.pop(0)
        except RpcbindUnavailable as exc:
            self.counters.inc(RPCBIND_REGISTRATION_FAILURES, "unreachable", len(entries))
            log.warning("rpcbind: %s; %d mapping(s) left registered", exc, len(entries))

    # The wire ------------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise RpcbindUnavailable(f"cannot reach {self.socket_path}: {exc}") from None
        return sock

    def _next_xid(self) -> int:
        self._xid = (self._xid + 1) & 0xFFFF_FFFF
        return self._xid

    def _exchange_bool(self, sock, make_call, entry) -> bool:
        xid = self._next_xid()
        record = self._exchange(sock, make_call(xid, entry))
        try:
            return portmap.parse_bool_reply(record, xid)
        except rpc.RpcError as exc:
            raise RpcbindUnavailable(f"{self.socket_path} answered badly: {exc}") from None

    def _dump(self, sock) -> list[portmap.Registration]:
        xid = self._next_xid()
        record = self._exchange(sock, portmap.dump_call(xid))
        try:
            return portmap.parse_dump_reply(record, xid)
        except rpc.RpcError as exc:
            raise RpcbindUnavailable(f"{self.socket_path} answered DUMP badly: {exc}") from None

    def _exchange(self, sock, call: bytes) -> bytes:
        """Send one call record, return the reply record."""
        try:
            sock.sendall(rpc.fragment_header(len(call)) + call)
            assembler = rpc.RecordAssembler(RPCBIND_MAX_REPLY)
            record = bytearray()
            while True:
                length = assembler.begin_fragment(_recv_exact(sock, 4))
                record += _recv_exact(sock, length)
                if assembler.end_fragment() is not None:
                    return bytes(record)
        except (OSError, rpc.RecordError) as exc:
            raise RpcbindUnavailable(f"no answer on {self.socket_path}: {exc}") from None


def _recv_exact(sock, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("rpcbind closed the connection")
        data += chunk
    return bytes(data)


def _describe(entry: portmap.Registration) -> str:
    name = {NFS_PROGRAM: "NFS", MOUNT_PROGRAM: "MOUNT"}.get(entry.prog, str(entry.prog))
    return f"{name} v{entry.vers} on {entry.netid} {entry.address}"
