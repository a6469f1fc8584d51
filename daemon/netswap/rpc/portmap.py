"""The portmapper, program 100000 (RFC 1833), without any I/O: the program netswapd serves
itself, and the rpcbind v4 calls with which it registers at a running rpcbind.

Why here, not in nfs/: the portmapper belongs to ONC RPC, not to NFS. It knows program
numbers, versions, transports and addresses; which programs the daemon publishes is decided
by the NFS side (nfs/portmapper.py), which hands this module a finished table of
`Registration`s.

Serving. Which versions clients ask, checked in their sources and with strace:
- PMAP v2 (§3) over IPv4: the kernel's rpcbind client (net/sunrpc/rpcb_clnt.c), mount.nfs
  (nfs-utils support/nfs/getport.c: "try an AF_INET request via rpcbind v2") and libnfs
  (PMAP2 NULL, then GETPORT).
- rpcbind v4 then v3 GETADDR (§2.2) over IPv6 (the kernel, mount.nfs), and from libtirpc
  before it falls back to v2: `rpcinfo -p HOST` first asks GETADDR v4, v3 over TCP for where
  the portmapper itself is, and its v2 fallback goes over UDP, which we do not serve.
So versions 2 to 4 are served, each with the minimum: NULL, GETPORT (v2) or GETADDR (v3/v4),
DUMP, and SET/UNSET refused; anything else is PROC_UNAVAIL.

- GETPORT/GETADDR answer from the table; anything not in it is port 0 (§3.2) or the empty
  address (§2.2). GETADDR with an empty netid means the caller's own transport.
- SET, UNSET: always FALSE. The table is what this daemon listens on, nothing else; letting
  any caller edit it would let a peer point nodes' mounts at a port of its own (rpcbind
  allows it from loopback only, and loopback is every local user). A host that needs a
  general portmapper runs rpcbind, and netswapd registers there.
- CALLIT (v2), CALLIT/BCAST and INDIRECT (v3/v4): PROC_UNAVAIL. They run a procedure of
  another program on the caller's behalf, so the call reaches NFS and MOUNT from our own
  address: past the per-address node checks (every loopback client is node "localhost").
  Over UDP CALLIT is also an amplifier; we serve TCP only, but the first reason suffices.
  RFC 1833 lets a server stay silent on failure, which over TCP leaves the client waiting
  for its timeout; PROC_UNAVAIL tells it at once.

Arguments that do not decode (cut short, or bytes left over) get GARBAGE_ARGS.

Registering (rpcbind v4, RFC 1833 §2.2). `set_call`/`unset_call`/`dump_call` build the call
records, `parse_bool_reply`/`parse_dump_reply` read the answers. They go to rpcbind's AF_LOCAL
socket, where rpcbind offers versions 3 and 4 only (not PMAP v2), because that is where every
rpcbind build takes SET from a local caller and records the caller's uid as the owner (root:
"superuser"), so no other local user can UNSET our mappings. Over IP loopback, upstream
rpcbind declines SET unless started insecure or "old-style local"; Debian's 1.2.6 takes it
from any local port, recording the owner "unknown" for an unprivileged one.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import threading
from dataclasses import dataclass
from typing import Optional

from ..access import ACCESS_DENIED
from ..counters import declare
from ..refusals import RefusalLog
from . import constants as RC
from . import message as rpc
from . import xdr
from .message import RPC_PROTOCOL_ERRORS

PORTMAP_CALLS = declare(
    "nfs", "portmap_calls", "netswap_portmap_calls_total",
    "Portmapper calls served (PMAP v2, rpcbind v3/v4), by procedure.",
    label="procedure")

log = logging.getLogger("netswap.nfs")

PROGRAM = RC.PROG_PORTMAP
VERSION = 2            # PMAP_VERS (§3)
RPCBIND_VERSION = 4    # RPCBVERS4 (§2.2), for registering
PORT = 111

# Procedure numbers: v2 (§3.2) and v3/v4 (§2.2) share 0-5, with GETPORT and GETADDR at 3.
PROC_NULL, PROC_SET, PROC_UNSET, PROC_GETADDR, PROC_DUMP = 0, 1, 2, 3, 4
PMAPPROC_GETPORT = PROC_GETADDR
RPCBPROC_SET, RPCBPROC_UNSET, RPCBPROC_DUMP = PROC_SET, PROC_UNSET, PROC_DUMP
# What is served, by version; the rest (CALLIT, GETTIME, INDIRECT, ...) is PROC_UNAVAIL.
_SERVED = {2: {0: "null", 1: "set", 2: "unset", 3: "getport", 4: "dump"},
           3: {0: "null", 1: "set", 2: "unset", 3: "getaddr", 4: "dump"},
           4: {0: "null", 1: "set", 2: "unset", 3: "getaddr", 4: "dump"}}
_RELAYS = {2: {5: "callit"}, 3: {5: "callit"}, 4: {5: "bcast", 10: "indirect"}}

IPPROTO_TCP, IPPROTO_UDP = 6, 17
_PROT_NETID = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}  # PMAP v2 is IPv4 only
RPCB_STRING_MAX = 1024  # no bound in the RFC; rpcbind's own entries are far shorter

# Bounds the wait of a call that races the start; the publish follows the bind at once.
_PUBLISH_WAIT = 10.0

_MAPPING = struct.Struct(">4I")  # prog, vers, prot, port
_U32 = struct.Struct(">I")
_FALSE = _U32.pack(0)


@dataclass(frozen=True)
class Registration:
    """An rpcbind entry (`rpcb`, §2.2): program `prog` version `vers` over `netid` ("tcp",
    "tcp6") at `address`, a universal address; `owner` is what rpcbind records (it
    substitutes the caller's uid on its local socket)."""

    prog: int
    vers: int
    netid: str
    address: str
    owner: str = ""

    @property
    def port(self) -> int:
        """The port of the universal address (its last two fields, RFC 5665 §5.2.3)."""
        high, low = self.address.rsplit(".", 2)[1:]
        return int(high) << 8 | int(low)


def universal_address(host: str, port: int) -> tuple[str, str]:
    """(netid, universal address) of a TCP listener (RFC 5665 §5.2.3: the address, then the
    port's high and low bytes, dot-separated). An unspecified host ("" or 0.0.0.0) is the
    IPv4 wildcard, as rpcbind writes it."""
    ip = ipaddress.ip_address(host or "0.0.0.0")
    netid = "tcp" if ip.version == 4 else "tcp6"
    return netid, f"{ip.compressed}.{port >> 8}.{port & 0xFF}"


class PortmapProgram:
    """Portmapper v2 and rpcbind v3/v4 over a fixed table (see the module docstring); the
    transport calls `call`.

    The table includes the portmapper's own port, known only once its listener is bound
    (port 0 in the config), so the owner `publish`es it after the transport has started;
    a call that arrives in between waits for it rather than being told "port 0"."""

    version = VERSION
    versions = (2, 4)  # served range: PROG_MISMATCH answers name it

    def __init__(self, counters) -> None:
        self.entries: tuple[Registration, ...] = ()
        self.counters = counters
        self._refusals = RefusalLog(log)  # bad calls in a loop must not flood the log
        self._published = threading.Event()

    def publish(self, entries) -> None:
        self.entries = tuple(entries)
        self._published.set()

    @staticmethod
    def procedure_name(call) -> str:
        return (_SERVED[call.vers].get(call.proc) or _RELAYS[call.vers].get(call.proc)
                or "unknown")

    def call(self, call, peer: str, release: list, emergency: bool = False,
             stopped=None):
        # `stopped` is for calls that wait for pool memory; none here does.
        self._published.wait(_PUBLISH_WAIT)
        name = _SERVED[call.vers].get(call.proc)
        if name is None:
            relay = _RELAYS[call.vers].get(call.proc)
            if relay is not None:
                self.counters.inc(PORTMAP_CALLS, relay)
                self._refusals.log("relay", logging.INFO, "portmap %s: %s refused: it would "
                                   "relay calls from our own address", peer, relay.upper())
            else:
                self.counters.inc(RPC_PROTOCOL_ERRORS, "proc_unavail")
            return [rpc.accepted(call.xid, RC.PROC_UNAVAIL)]
        self.counters.inc(PORTMAP_CALLS, name)
        # Arguments it cannot decode raise XdrError: the transport answers GARBAGE_ARGS.
        args = xdr.Unpacker(call.args)
        if call.vers == VERSION:
            body = getattr(self, "_pmap_" + name)(args, peer)
        else:
            body = getattr(self, "_rpcb_" + name)(args, peer)
        args.done()
        return [rpc.accepted(call.xid), body]

    def _refuse_change(self, what: str, peer, described: str) -> bytes:
        self.counters.inc(ACCESS_DENIED, f"portmap:{what.lower()}")
        self._refusals.log("change", logging.WARNING, "portmap %s: %s of %s refused: this "
                           "portmapper lists netswapd's own programs only", peer, what, described)
        return _FALSE

    # PMAP v2 (§3.2) --------------------------------------------------------------------

    def _pmap_null(self, args, peer) -> bytes:
        return b""

    def _pmap_set(self, args, peer) -> bytes:
        prog, vers, prot, port = args.unpack(_MAPPING)
        return self._refuse_change("SET", peer, f"program {prog} version {vers} protocol "
                                   f"{prot} port {port}")

    def _pmap_unset(self, args, peer) -> bytes:
        prog, vers, prot, port = args.unpack(_MAPPING)
        return self._refuse_change("UNSET", peer, f"program {prog} version {vers}")

    def _pmap_getport(self, args, peer) -> bytes:
        prog, vers, prot, _ = args.unpack(_MAPPING)  # the port in the arguments is ignored
        netid = _PROT_NETID.get(prot)
        for entry in self.entries:
            if (entry.prog, entry.vers, entry.netid) == (prog, vers, netid):
                return _U32.pack(entry.port)
        return _U32.pack(0)

    def _pmap_dump(self, args, peer) -> bytes:
        packer = xdr.Packer()
        for entry in self.entries:  # pmaplist: a linked list, each entry behind TRUE
            if entry.netid == "tcp":
                packer.bool(True)
                packer.pack(_MAPPING, entry.prog, entry.vers, IPPROTO_TCP, entry.port)
        packer.bool(False)
        return packer.bytes()

    # rpcbind v3/v4 (§2.2) --------------------------------------------------------------

    def _rpcb_null(self, args, peer) -> bytes:
        return b""

    def _rpcb_set(self, args, peer) -> bytes:
        entry = _unpack_rpcb(args)
        return self._refuse_change("SET", peer, f"program {entry.prog} version {entry.vers} "
                                   f"on {entry.netid!r} at {entry.address!r}")

    def _rpcb_unset(self, args, peer) -> bytes:
        entry = _unpack_rpcb(args)
        return self._refuse_change("UNSET", peer, f"program {entry.prog} version {entry.vers}")

    def _rpcb_getaddr(self, args, peer) -> bytes:
        wanted = _unpack_rpcb(args)
        # No netid: the one the caller came in on (rpcbind does the same); an IPv4 caller
        # on a dual-stack listener shows as ::ffff:a.b.c.d.
        netid = wanted.netid or _netid_of(peer)
        packer = xdr.Packer()
        for entry in self.entries:
            if (entry.prog, entry.vers, entry.netid) == (wanted.prog, wanted.vers, netid):
                packer.string(entry.address, RPCB_STRING_MAX)
                return packer.bytes()
        packer.string(b"")
        return packer.bytes()

    def _rpcb_dump(self, args, peer) -> bytes:
        packer = xdr.Packer()
        for entry in self.entries:  # rpcblist: a linked list, each entry behind TRUE
            packer.bool(True)
            _pack_rpcb(packer, entry)
        packer.bool(False)
        return packer.bytes()


def _netid_of(peer: str) -> str:
    ip = ipaddress.ip_address(peer)
    return "tcp6" if ip.version == 6 and ip.ipv4_mapped is None else "tcp"


def _unpack_rpcb(args: xdr.Unpacker) -> Registration:
    prog, vers = args.uint(), args.uint()
    netid, address, owner = (args.string(RPCB_STRING_MAX).decode("utf-8", "replace")
                             for _ in range(3))
    return Registration(prog, vers, netid, address, owner)


# --------------------------------------------------------------------------- rpcbind v4 client


def _pack_rpcb(packer: xdr.Packer, entry: Registration) -> None:
    packer.uint(entry.prog)
    packer.uint(entry.vers)
    packer.string(entry.netid, RPCB_STRING_MAX)
    packer.string(entry.address, RPCB_STRING_MAX)
    packer.string(entry.owner, RPCB_STRING_MAX)


def _call(xid: int, proc: int, entry: Optional[Registration]) -> bytes:
    packer = xdr.Packer()
    if entry is not None:
        _pack_rpcb(packer, entry)
    return rpc.call_header(xid, PROGRAM, RPCBIND_VERSION, proc) + packer.bytes()


def set_call(xid: int, entry: Registration) -> bytes:
    """RPCBPROC_SET: the record (without its fragment header)."""
    return _call(xid, RPCBPROC_SET, entry)


def unset_call(xid: int, entry: Registration) -> bytes:
    """RPCBPROC_UNSET: removes prog/vers on `entry.netid` (rpcbind ignores the address)."""
    return _call(xid, RPCBPROC_UNSET, entry)


def dump_call(xid: int) -> bytes:
    return _call(xid, RPCBPROC_DUMP, None)


class RpcbindError(rpc.RpcError):
    reason = "bad_reply"


def _results(record, xid: int) -> xdr.Unpacker:
    reply = rpc.parse_reply(record)  # BadReply is an RpcError too
    if reply.xid != xid:
        raise RpcbindError(f"reply to xid {reply.xid}, expected {xid}")
    if not reply.accepted:
        raise RpcbindError(f"call denied (reject_stat {reply.stat})", "denied")
    if reply.stat != RC.SUCCESS:
        name = RC.ACCEPT_STAT_NAMES.get(reply.stat, str(reply.stat))
        raise RpcbindError(f"call not accepted: {name}", name)
    return xdr.Unpacker(reply.results)


def parse_bool_reply(record, xid: int) -> bool:
    """The answer to SET or UNSET."""
    results = _results(record, xid)
    try:
        answer = results.bool()
        results.done()
    except xdr.XdrError as exc:
        raise RpcbindError(f"malformed result: {exc}") from None
    return answer


def parse_dump_reply(record, xid: int) -> list[Registration]:
    """The answer to DUMP: every entry rpcbind holds."""
    results = _results(record, xid)
    entries = []
    try:
        while results.bool():
            entries.append(_unpack_rpcb(results))
        results.done()
    except xdr.XdrError as exc:
        raise RpcbindError(f"malformed DUMP result: {exc}") from None
    return entries
