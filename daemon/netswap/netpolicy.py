"""What netswapd asks of the kernel for the sockets that carry swap, and of the egress queue.

A userspace daemon cannot get the kernel's emergency reserves for its sockets (the kernel
gives SOCK_MEMALLOC to its own sockets only). What it can do is make swap traffic cheap and
first in line:

- tag_emergency(sock, policy) sets, on one connected socket, the options that make the kernel
  and the network treat it as urgent: SO_PRIORITY (queueing priority on this host), the DSCP
  in IP_TOS / IPV6_TCLASS (for switches and routers), optionally SO_MARK (for firewall,
  routing and the Shaper below), fixed send and receive buffers (kernel memory that is sized
  once instead of growing under autotuning while memory is short) and TCP_NODELAY (a swap
  reply must not wait for Nagle). It never raises for an option the kernel refuses: it
  returns the refusals, for the caller to log and count, because a connection that could not
  be fully tagged must still be served.

- Shaper installs, on the serving interface, a root qdisc that sends packets carrying the swap
  mark before anything else, and removes exactly that on remove().

The Shaper's qdisc is HTB used as a strict-priority scheduler, with a classic-BPF cls_bpf
filter on the mark, rather than the textbook prio qdisc with an fw filter: sch_prio and
cls_fw are optional kernel features that minimal kernels leave out (the VM netswap is
developed on has neither), while HTB and cls_bpf are present in those kernels and in every
distribution kernel. The behaviour is the same: HTB serves the leaf classes that are within
their rate in order of their prio, and both classes get a rate far above any link, so they
always are: the swap class (prio 0) is dequeued first whenever it has packets, and everything
else gets the interface the rest of the time.

Public API:
    SocketPolicy(priority, dscp, mark, sndbuf, rcvbuf)
    SocketPolicy.from_config(network, *, sndbuf, rcvbuf)   from a NetworkConfig-like object
    tag_emergency(sock, policy) -> list[str]               the options the kernel refused
    Shaper(netns=None): install(interface, mark), remove(), installed, interface
    ShapeError
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import struct
from dataclasses import dataclass

from .counters import declare
from .reserve.tree import socket_buffer_size

SOCKET_TAG_FAILURES = declare(
    "transport", "socket_tag_failures", "netswap_socket_tag_failures_total",
    "Swap sockets whose kernel tagging (priority, DSCP, mark, buffers) was incomplete.")

log = logging.getLogger("netswap.netpolicy")

# Python's socket module lacks some of these on some builds; the values are the
# asm-generic ones (x86, arm, riscv...), which is what netswapd runs on.
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_PRIORITY = getattr(socket, "SO_PRIORITY", 12)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
IPV6_TCLASS = getattr(socket, "IPV6_TCLASS", 67)

_INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_GRANT_NET_ADMIN = "grant CAP_NET_ADMIN (AmbientCapabilities=CAP_NET_ADMIN in the unit)"


@dataclass(frozen=True)
class SocketPolicy:
    """The socket options of a swap (emergency) connection.

    priority: SO_PRIORITY (values above 6 need CAP_NET_ADMIN).
    dscp: the DSCP code point (0..63); the TOS / traffic-class byte is dscp << 2, the low
        two bits being ECN, which the kernel manages for TCP.
    mark: SO_MARK (needs CAP_NET_ADMIN); 0 leaves the socket's mark alone.
    sndbuf, rcvbuf: bytes of kernel buffer (what SO_SNDBUF / SO_RCVBUF are given; the
        kernel doubles it for its bookkeeping); 0 leaves the kernel's autotuning in charge.
    """

    priority: int
    dscp: int
    mark: int = 0
    sndbuf: int = 0
    rcvbuf: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.dscp <= 63:
            raise ValueError(f"dscp {self.dscp} is outside 0..63")
        if not 0 <= self.priority < 2**32:
            raise ValueError(f"priority {self.priority} is not a 32-bit unsigned value")
        if not 0 <= self.mark < 2**32:
            raise ValueError(f"mark {self.mark:#x} is not a 32-bit unsigned value")
        for name in ("sndbuf", "rcvbuf"):
            # SO_SNDBUF takes an int that the kernel then doubles.
            if not 0 <= getattr(self, name) <= (2**31 - 1) // 2:
                raise ValueError(f"{name} {getattr(self, name)} is outside 0..{(2**31 - 1) // 2}")

    @classmethod
    def from_config(cls, network, *, sndbuf: int, rcvbuf: int) -> SocketPolicy:
        """The policy for `network` (anything with .priority, .dscp and .mark, such as the
        [network] section of the config) with buffers sized by the caller (from the swap
        group's in-flight bytes)."""
        return cls(priority=network.priority, dscp=network.dscp, mark=network.mark,
                   sndbuf=sndbuf, rcvbuf=rcvbuf)


def swap_socket_policy(config) -> SocketPolicy:
    """The policy of a swap node's socket, NBD or NFS alike: [network]'s options, and
    buffers with room for the in-flight data a swap connection may have."""
    size = socket_buffer_size(config)
    return SocketPolicy.from_config(config.network, sndbuf=size, rcvbuf=size)


def _describe_error(option: str, error: OSError, advice: str = "") -> str:
    name = errno.errorcode.get(error.errno, str(error.errno))
    text = f"{option}: {name} ({error.strerror})"
    return f"{text}: {advice}" if advice else text


def _set_option(sock, level: int, option: int, value: int, label: str,
                failures: list[str], advice: str = "") -> None:
    try:
        sock.setsockopt(level, option, value)
    except OSError as e:
        failures.append(_describe_error(label, e, advice if e.errno == errno.EPERM else ""))


def _set_buffer(sock, size: int, force_option: int, plain_option: int, label: str,
                sysctl: str, failures: list[str]) -> None:
    # The FORCE variant ignores net.core.[wr]mem_max but needs CAP_NET_ADMIN; the plain one
    # is silently capped at that sysctl. So: FORCE when permitted, else plain, then read the
    # result back, because a capped buffer is a refusal the kernel does not report.
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_option, size)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, plain_option, size)
        except OSError as e:
            failures.append(_describe_error(label, e))
            return
    granted = sock.getsockopt(socket.SOL_SOCKET, plain_option) // 2  # the kernel doubles it
    if granted < size:
        failures.append(
            f"{label}: {size} bytes asked, {granted} granted: capped by {sysctl}; "
            f"{_GRANT_NET_ADMIN} for {label}FORCE, or raise {sysctl}"
        )


def _is_dual_stack(sock) -> bool:
    try:
        return not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    except OSError:
        return False


def tag_emergency(sock: socket.socket, policy: SocketPolicy) -> list[str]:
    """Apply `policy` to `sock`; return the options the kernel refused, as
    "OPTION: ERRNO (text)[: what to grant]" strings (empty when all took).

    Only what applies to the socket's family is set: a Unix socket gets its buffers only.
    Call it on a connected (accepted) socket, before the first reply is sent.
    """
    failures: list[str] = []
    if sock.family in _INET_FAMILIES:
        tos = policy.dscp << 2
        # The TOS goes first: on IPv4 (and on IPv4 traffic of a dual-stack IPv6 socket)
        # setting IP_TOS also rewrites the socket's priority from the TOS
        # (rt_tos2priority), which would undo an SO_PRIORITY set before it.
        if sock.family == socket.AF_INET6:
            _set_option(sock, socket.IPPROTO_IPV6, IPV6_TCLASS, tos, "IPV6_TCLASS", failures)
        if sock.family == socket.AF_INET or _is_dual_stack(sock):
            # A dual-stack socket carries IPv4 packets for a v4-mapped peer; those take
            # their TOS from IP_TOS, not from IPV6_TCLASS.
            _set_option(sock, socket.IPPROTO_IP, socket.IP_TOS, tos, "IP_TOS", failures)
        _set_option(sock, socket.SOL_SOCKET, SO_PRIORITY, policy.priority, "SO_PRIORITY",
                    failures, _GRANT_NET_ADMIN + " for priorities above 6")
        if policy.mark:
            _set_option(sock, socket.SOL_SOCKET, SO_MARK, policy.mark, "SO_MARK", failures,
                        _GRANT_NET_ADMIN)
        if sock.type == socket.SOCK_STREAM:
            _set_option(sock, socket.IPPROTO_TCP, socket.TCP_NODELAY, 1, "TCP_NODELAY",
                        failures)
    if policy.sndbuf:
        _set_buffer(sock, policy.sndbuf, SO_SNDBUFFORCE, socket.SO_SNDBUF, "SO_SNDBUF",
                    "net.core.wmem_max", failures)
    if policy.rcvbuf:
        _set_buffer(sock, policy.rcvbuf, SO_RCVBUFFORCE, socket.SO_RCVBUF, "SO_RCVBUF",
                    "net.core.rmem_max", failures)
    return failures


# ---------------------------------------------------------------------------------------------
# Shaping the egress queue.


class ShapeError(Exception):
    """The Shaper cannot install (or will not replace what is there); the message says why."""


TC_H_ROOT = 0xFFFFFFFF
ETH_P_ALL = 0x0003
# "NS", so `tc qdisc show` says whose qdisc this is: qdisc htb 4e53: root.
SHAPER_HANDLE = 0x4E53_0000
SWAP_CLASS = SHAPER_HANDLE | 1  # 4e53:1, prio 0: packets with the swap mark
OTHER_CLASS = SHAPER_HANDLE | 2  # 4e53:2, prio 1: everything else (HTB's default class)
# Far above any link (2**40 bytes/s is about 8.8 Tbit/s), so that neither class ever runs out
# of tokens: HTB then picks among them by prio alone, which is all the Shaper uses it for.
_UNLIMITED_RATE = 1 << 40
# Token bucket depth of 10 ms at that rate; it only has to exceed one packet's cost.
_BURST = _UNLIMITED_RATE // 100
_QUANTUM = 65536  # bytes per DRR round; only one class per prio, so only a formality
# The kernel's DEFAULT_TX_QUEUE_LEN, for leaf queues of interfaces with txqueuelen 0.
_DEFAULT_QUEUE_PACKETS = 1000
_FILTER_PREF = 1

# The classic BPF program of the filter: A = skb->mark; return -1 (meaning: the filter's
# classid) if A == mark, else 0 (no match). Each instruction is struct sock_filter
# {u16 code; u8 jt; u8 jf; u32 k}.
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_SKF_AD_MARK = (-0x1000 + 20) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_MARK


def _mark_match_program(mark: int) -> tuple[int, bytes]:
    program = (
        (_BPF_LD_W_ABS, 0, 0, _SKF_AD_MARK),
        (_BPF_JEQ_K, 0, 1, mark),
        (_BPF_RET_K, 0, 0, 0xFFFFFFFF),
        (_BPF_RET_K, 0, 0, 0),
    )
    return len(program), b"".join(struct.pack("=HBBI", *insn) for insn in program)


@functools.cache
def _bpf_filter_message_class():
    """The RTM_NEWTFILTER message for a classic-BPF cls_bpf filter.

    pyroute2 can install cls_bpf only with an eBPF program fd, so this declares the message
    with TCA_BPF_OPS as raw bytes. It is its own nlmsg rather than a tcmsg subclass because
    pyroute2 compiles an attribute map once per class hierarchy, and a subclass of an
    already-used tcmsg would be encoded with tcmsg's map. Built on first use so that
    importing this module does not import pyroute2.
    """
    from pyroute2.netlink import nla, nlmsg

    class classic_bpf_filter(nlmsg):
        prefix = "TCA_"
        fields = (("family", "B"), ("pad1", "B"), ("pad2", "H"), ("index", "i"),
                  ("handle", "I"), ("parent", "I"), ("info", "I"))
        nla_map = (("TCA_UNSPEC", "none"), ("TCA_KIND", "asciiz"), ("TCA_OPTIONS", "options"))

        class options(nla):
            nla_map = (
                ("TCA_BPF_UNSPEC", "none"),
                ("TCA_BPF_ACT", "none"),
                ("TCA_BPF_POLICE", "none"),
                ("TCA_BPF_CLASSID", "uint32"),
                ("TCA_BPF_OPS_LEN", "uint16"),
                ("TCA_BPF_OPS", "cdata"),
            )

    return classic_bpf_filter


def _format_handle(handle: int) -> str:
    return f"{handle >> 16:x}:{handle & 0xFFFF:x}" if handle & 0xFFFF else f"{handle >> 16:x}:"


class Shaper:
    """Puts swap-marked packets first on one interface's egress.

    install(interface, mark) adds, as the interface's root qdisc, HTB 4e53: with class 4e53:1
    (prio 0) for packets whose mark is `mark` and 4e53:2 (prio 1, the default) for all other
    packets, each with a pfifo leaf. It refuses (ShapeError) when the interface's root qdisc
    is not the kernel's default one: a qdisc someone configured is not netswapd's to replace.
    remove() deletes that root qdisc, with its classes and filter, if it is still the one
    install() added, and the kernel puts the interface's default qdisc back.

    netns names a network namespace (as `ip netns` does) to work in instead of the
    daemon's own. Both calls talk netlink through pyroute2's asyncio API, so they must not
    be called from a thread that is running an asyncio event loop.
    """

    def __init__(self, *, netns: str | None = None) -> None:
        self.netns = netns
        self.interface: str | None = None
        self.mark: int | None = None

    @property
    def installed(self) -> bool:
        return self.interface is not None

    def install(self, interface: str, mark: int) -> None:
        if self.installed:
            raise ShapeError(f"already shaping {self.interface}")
        if not 0 < mark < 2**32:
            raise ShapeError(
                f"mark {mark:#x}: shaping needs a nonzero 32-bit mark (network.mark) to tell "
                "swap packets from the rest"
            )
        self._run(interface, self._install(interface, mark))
        self.interface, self.mark = interface, mark
        log.info("shaping %s: packets marked %#x go first (htb %s with a cls_bpf mark filter)",
                 interface, mark, _format_handle(SHAPER_HANDLE))

    def remove(self) -> None:
        """Undo install(); does nothing if nothing is installed."""
        if not self.installed:
            return
        interface = self.interface
        self._run(interface, self._remove(interface))
        self.interface = self.mark = None

    # -- netlink -------------------------------------------------------------------------------

    def _run(self, interface: str, operation) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            asyncio.run(operation)
        except OSError as e:
            # Opening the netlink socket: chiefly a netns that does not exist.
            where = f" in network namespace {self.netns!r}" if self.netns else ""
            raise ShapeError(f"cannot shape {interface}{where}: {e}") from e
        except NetlinkError as e:  # one the steps did not expect, such as a failed dump
            raise self._error(interface, "talking to the kernel", e) from e

    def _netlink(self):
        from pyroute2 import AsyncIPRoute

        # flags=0: a misspelt namespace name is an error, not a new empty namespace.
        return AsyncIPRoute(netns=self.netns, flags=0) if self.netns else AsyncIPRoute()

    @staticmethod
    def _error(interface: str, doing: str, error: Exception, *, adding: bool = False
               ) -> ShapeError:
        code = getattr(error, "code", None)
        if code == errno.EPERM:
            advice = f": {_GRANT_NET_ADMIN}"
        elif code == errno.ENOENT and adding:
            # What the kernel answers for a qdisc or filter kind it was built without.
            advice = (": does the kernel have HTB and cls_bpf (CONFIG_NET_SCH_HTB, "
                      "CONFIG_NET_CLS_BPF)?")
        else:
            advice = ""
        reason = os.strerror(code) if isinstance(code, int) else str(error)
        return ShapeError(f"cannot shape {interface}: {doing}: {reason}{advice}")

    async def _interface_index(self, ipr, interface: str) -> tuple[int, int]:
        """(ifindex, txqueuelen) of `interface`."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            (link,) = await ipr.link("get", ifname=interface)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                raise ShapeError(f"cannot shape {interface}: no such interface") from None
            raise self._error(interface, "looking it up", e) from e
        return link["index"], link.get_attr("IFLA_TXQLEN") or 0

    @staticmethod
    async def _root_qdisc(ipr, index: int):
        """(kind, handle) of the interface's root qdisc, or None if it has none listed."""
        async for qdisc in await ipr.tc("dump", index=index):
            if qdisc["index"] == index and qdisc["parent"] == TC_H_ROOT:
                return qdisc.get_attr("TCA_KIND"), qdisc["handle"]
        return None

    async def _install(self, interface: str, mark: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        async with self._netlink() as ipr:
            index, txqueuelen = await self._interface_index(ipr, interface)
            root = await self._root_qdisc(ipr, index)
            if root == ("htb", SHAPER_HANDLE):
                # A netswapd that was killed before remove() left it; same owner, so ours
                # to replace.
                log.warning("%s still has the shaping qdisc of an earlier netswapd; "
                            "replacing it", interface)
                await self._delete_root(ipr, index, interface)
            elif root is not None and root[1] != 0:
                # The kernel's own root qdiscs (pfifo_fast, mq, noqueue, the default_qdisc)
                # have handle 0; any other was put there by someone, for a reason.
                kind, handle = root
                raise ShapeError(
                    f"will not shape {interface}: its root qdisc is {kind} "
                    f"{_format_handle(handle)}, which netswapd did not install and will not "
                    f"replace; remove it (tc qdisc del dev {interface} root) or set "
                    "network.shape = false and put network.mark first in your own tc setup"
                )
            try:
                await self._add_qdisc(ipr, index, txqueuelen, mark)
            except NetlinkError as e:
                error = self._error(interface, "adding the htb qdisc and its mark filter", e,
                                    adding=True)
                # Leave the interface as it was: a half-built tree may have no filter.
                if await self._root_qdisc(ipr, index) == ("htb", SHAPER_HANDLE):
                    await self._delete_root(ipr, index, interface)
                raise error from e

    async def _add_qdisc(self, ipr, index: int, txqueuelen: int, mark: int) -> None:
        await ipr.tc("add", "htb", index=index, handle=SHAPER_HANDLE, parent=TC_H_ROOT,
                     default=OTHER_CLASS & 0xFFFF)
        for classid, prio in ((SWAP_CLASS, 0), (OTHER_CLASS, 1)):
            await ipr.tc("add-class", "htb", index=index, handle=classid, parent=SHAPER_HANDLE,
                         rate=_UNLIMITED_RATE, ceil=_UNLIMITED_RATE, burst=_BURST,
                         cburst=_BURST, prio=prio, quantum=_QUANTUM)
            # Explicit leaves: HTB's default leaf is a pfifo as long as txqueuelen, and one
            # packet long on interfaces with txqueuelen 0, which would drop the very backlog
            # a priority queue is there to reorder.
            await ipr.tc("add", "pfifo", index=index, handle=(classid & 0xFFFF) << 16,
                         parent=classid, limit=txqueuelen or _DEFAULT_QUEUE_PACKETS)
        await self._add_mark_filter(ipr, index, mark)

    @staticmethod
    async def _add_mark_filter(ipr, index: int, mark: int) -> None:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
        from pyroute2.netlink.rtnl import RTM_NEWTFILTER

        length, program = _mark_match_program(mark)
        message = _bpf_filter_message_class()()
        message["family"] = socket.AF_UNSPEC
        message["index"] = index
        message["handle"] = 0
        message["parent"] = SHAPER_HANDLE
        # tcm_info of a filter: its preference (priority) above, protocol below, in
        # network byte order; ETH_P_ALL so that ARP and IPv6 are classified too.
        message["info"] = (_FILTER_PREF << 16) | socket.htons(ETH_P_ALL)
        message["attrs"] = [
            ["TCA_KIND", "bpf"],
            ["TCA_OPTIONS", {"attrs": [
                ["TCA_BPF_CLASSID", SWAP_CLASS],
                ["TCA_BPF_OPS_LEN", length],
                ["TCA_BPF_OPS", program],
            ]}],
        ]
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        async for _ in await ipr.nlm_request(message, msg_type=RTM_NEWTFILTER,
                                             msg_flags=flags):
            pass  # the ack; an error reply raises

    async def _delete_root(self, ipr, index: int, interface: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        # Deleting the root qdisc takes its classes, leaves and filter with it, and makes the
        # kernel attach the interface's default qdisc again.
        try:
            await ipr.tc("del", index=index, handle=SHAPER_HANDLE, parent=TC_H_ROOT)
        except NetlinkError as e:
            raise self._error(interface, "deleting the htb qdisc", e) from e

    async def _remove(self, interface: str) -> None:
        async with self._netlink() as ipr:
            try:
                index, _ = await self._interface_index(ipr, interface)
            except ShapeError as e:
                # The interface is gone, and its qdiscs with it.
                log.info("not unshaping %s: %s", interface, e)
                return
            root = await self._root_qdisc(ipr, index)
            if root != ("htb", SHAPER_HANDLE):
                now = f"{root[0]} {_format_handle(root[1])}" if root else "no root qdisc"
                log.warning("not unshaping %s: its root qdisc is no longer netswapd's (%s)",
                            interface, now)
                return
            await self._delete_root(ipr, index, interface)
            log.info("unshaped %s", interface)
