"""The kernel's nbd driver over generic netlink (family "nbd", include/uapi/linux/nbd-netlink.h).

Netlink, not ioctls: only netlink gives a running device a new socket in place of a dead one
(RECONFIGURE), says when a connection dies (the LINK_DEAD multicast), and leaves the device
configured after the process that set it up exits. Numbers are the kernel's (nbd-netlink.h,
drivers/block/nbd.c), which parses nbd commands leniently (GENL_DONT_VALIDATE_STRICT): an
attribute a kernel does not know is ignored, not refused.

pyroute2 0.9's synchronous sockets run a private asyncio event loop per calling thread, so
NbdNetlink must not be called from a thread that runs an event loop. LinkDeadListener is a plain
socket, so that poll() and a non-blocking read() see exactly what the kernel queued.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections import namedtuple

from pyroute2.netlink import (CTRL_CMD_GETFAMILY, GENL_ID_CTRL, NETLINK_ADD_MEMBERSHIP,
                              NETLINK_GENERIC, NLM_F_ACK, NLM_F_REQUEST, SOL_NETLINK, ctrlmsg,
                              genlmsg, nla)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket
from pyroute2.netlink.marshal import Marshal

NBD_GENL_FAMILY_NAME, NBD_GENL_VERSION, NBD_GENL_MCAST_GROUP_NAME = "nbd", 1, "nbd_mc_group"
NBD_CMD_CONNECT, NBD_CMD_DISCONNECT, NBD_CMD_RECONFIGURE, NBD_CMD_LINK_DEAD, NBD_CMD_STATUS = (
    1, 2, 3, 4, 5)
COMMAND_NAMES = {1: "CONNECT", 2: "DISCONNECT", 3: "RECONFIGURE", 4: "LINK_DEAD", 5: "STATUS"}
NBD_ATTR_BACKEND_IDENTIFIER = 10  # the newest attribute: NBD_ATTR_MAX where it exists

CLIENT_FLAG_DESTROY_ON_DISCONNECT = 1  # NBD_CFLAG_*, include/uapi/linux/nbd.h
CLIENT_FLAG_DISCONNECT_ON_CLOSE = 2


class NbdNetlinkError(OSError):
    """A request the kernel refused (errno is its error), or a family or group not there."""


# Subclasses of genlmsg and nla themselves: pyroute2 compiles an nla_map once per class, and a
# subclass of an already compiled class would silently encode with its parent's map.
class NbdMessage(genlmsg):
    """An nbd generic netlink message: genl header (cmd, version) and the NBD_ATTR_* TLVs."""

    nla_map = (
        (0, "NBD_ATTR_UNSPEC", "none"),
        (1, "NBD_ATTR_INDEX", "uint32"),
        (2, "NBD_ATTR_SIZE_BYTES", "uint64"),
        (3, "NBD_ATTR_BLOCK_SIZE_BYTES", "uint64"),
        (4, "NBD_ATTR_TIMEOUT", "uint64"),  # seconds
        (5, "NBD_ATTR_SERVER_FLAGS", "uint64"),
        (6, "NBD_ATTR_CLIENT_FLAGS", "uint64"),
        (7, "NBD_ATTR_SOCKETS", "sockets"),
        (8, "NBD_ATTR_DEAD_CONN_TIMEOUT", "uint64"),  # seconds
        (9, "NBD_ATTR_DEVICE_LIST", "device_list"),
        (10, "NBD_ATTR_BACKEND_IDENTIFIER", "asciiz"),
    )

    class sockets(nla):
        nla_map = ((0, "NBD_SOCK_ITEM_UNSPEC", "none"), (1, "NBD_SOCK_ITEM", "sock_item"))

        class sock_item(nla):
            nla_map = ((0, "NBD_SOCK_UNSPEC", "none"), (1, "NBD_SOCK_FD", "uint32"))

    class device_list(nla):
        nla_map = ((0, "NBD_DEVICE_ITEM_UNSPEC", "none"), (1, "NBD_DEVICE_ITEM", "device_item"))

        class device_item(nla):
            nla_map = ((0, "NBD_DEVICE_UNSPEC", "none"), (1, "NBD_DEVICE_INDEX", "uint32"),
                       (2, "NBD_DEVICE_CONNECTED", "uint8"))


def sockets_attr(fds) -> list:
    """NBD_ATTR_SOCKETS: an NBD_SOCK_ITEM holding an NBD_SOCK_FD per socket."""
    return ["NBD_ATTR_SOCKETS",
            {"attrs": [["NBD_SOCK_ITEM", {"attrs": [["NBD_SOCK_FD", fd]]}] for fd in fds]}]


def status_from_reply(reply: NbdMessage) -> dict[int, bool]:
    """Device index -> connected, from a STATUS reply's NBD_ATTR_DEVICE_LIST. "Connected" is
    the kernel's "has a configuration": still true while every connection is dead."""
    devices = reply.get_attr("NBD_ATTR_DEVICE_LIST")
    if devices is None:
        return {}
    return {item.get_attr("NBD_DEVICE_INDEX"): bool(item.get_attr("NBD_DEVICE_CONNECTED"))
            for item in devices.get_attrs("NBD_DEVICE_ITEM")}


def link_dead_indices(data: bytes, family_id: int) -> list[int]:
    """Device indices of the LINK_DEAD messages in one datagram read from the group."""
    marshal = Marshal()
    marshal.msg_map[family_id] = NbdMessage
    return [msg.get_attr("NBD_ATTR_INDEX") for msg in marshal.parse(data)
            if msg["header"]["type"] == family_id and msg.get("cmd") == NBD_CMD_LINK_DEAD
            and msg.get_attr("NBD_ATTR_INDEX") is not None]


def _error(command: str, exc: Exception) -> NbdNetlinkError:
    code = exc.code if isinstance(exc, NetlinkError) else (exc.errno or errno.EIO)
    detail = exc.args[1] if isinstance(exc, NetlinkError) and len(exc.args) > 1 else None
    return NbdNetlinkError(code, f"nbd {command}: {detail or os.strerror(code)}")


_Family = namedtuple("_Family", "id maxattr groups")  # maxattr 0: the controller did not say


def _lookup_family(sock: GenericNetlinkSocket) -> _Family:
    """Ask the genl controller about "nbd". Not sock.bind(), which keeps the family id and
    groups but not maxattr, and logs on the root logger when the family is absent."""
    sock.marshal.msg_map[GENL_ID_CTRL] = ctrlmsg
    msg = ctrlmsg()
    msg["cmd"], msg["version"] = CTRL_CMD_GETFAMILY, 1
    msg["attrs"] = [["CTRL_ATTR_FAMILY_NAME", NBD_GENL_FAMILY_NAME]]
    try:
        replies = tuple(sock.nlm_request(msg, msg_type=GENL_ID_CTRL,
                                         msg_flags=NLM_F_REQUEST | NLM_F_ACK))
    except NetlinkError as e:
        if e.code == errno.ENOENT:
            raise NbdNetlinkError(errno.ENOENT, "no generic netlink family 'nbd': is the nbd "
                                                "module loaded (modprobe nbd), and is this the "
                                                "initial network namespace?") from None
        raise _error("family lookup", e) from None
    (reply,) = [r for r in replies if r["header"]["type"] == GENL_ID_CTRL]
    groups = {g.get_attr("CTRL_ATTR_MCAST_GRP_NAME"): g.get_attr("CTRL_ATTR_MCAST_GRP_ID")
              for g in reply.get_attr("CTRL_ATTR_MCAST_GROUPS") or ()}
    return _Family(reply.get_attr("CTRL_ATTR_FAMILY_ID"),
                   reply.get_attr("CTRL_ATTR_MAXATTR") or 0, groups)


def _send_timeout(fd: int) -> bytes:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16)


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NbdNetlink(_Closing):
    """One generic netlink socket for commands (and a second one for the multicast group, see
    LinkDeadListener). Calls are serialized; all but STATUS need CAP_SYS_ADMIN. The kernel
    runs a command to completion before it answers."""

    def __init__(self) -> None:
        sock = GenericNetlinkSocket(ext_ack=True)
        try:
            family = _lookup_family(sock)
        except BaseException:
            sock.close()
            raise
        self._adopt(sock, family)

    def _adopt(self, sock, family: _Family) -> None:
        self._sock, self._family_id = sock, family.id
        self._lock = threading.Lock()
        self._timeouts: dict[int, int] = {}
        sock.marshal.msg_map[family.id] = NbdMessage
        # maxattr unknown: send it anyway, a kernel without it ignores it (lenient parsing).
        self.has_backend_identifier = (not family.maxattr
                                       or family.maxattr >= NBD_ATTR_BACKEND_IDENTIFIER)

    def _command(self, cmd: int, attrs: list) -> list[NbdMessage]:
        msg = NbdMessage()
        msg["cmd"], msg["version"], msg["attrs"] = cmd, NBD_GENL_VERSION, attrs
        with self._lock:
            try:
                replies = tuple(self._sock.nlm_request(msg, msg_type=self._family_id,
                                                       msg_flags=NLM_F_REQUEST | NLM_F_ACK))
            except (NetlinkError, OSError) as e:
                raise _error(COMMAND_NAMES[cmd], e) from None
        return [r for r in replies if r["header"]["type"] == self._family_id]

    def connect(self, sockets: list[int], size: int, block_size: int, server_flags: int,
                timeout: int, dead_conn_timeout: int, client_flags: int = 0,
                backend_identifier: str | None = None, index: int | None = None) -> int:
        """Configure device `index` (or one the kernel picks) on these negotiated sockets;
        the kernel takes its own reference to each. backend_identifier is left out where the
        kernel does not know it (has_backend_identifier)."""
        attrs = [["NBD_ATTR_SIZE_BYTES", size], ["NBD_ATTR_BLOCK_SIZE_BYTES", block_size],
                 ["NBD_ATTR_TIMEOUT", timeout], ["NBD_ATTR_SERVER_FLAGS", server_flags],
                 ["NBD_ATTR_CLIENT_FLAGS", client_flags],
                 ["NBD_ATTR_DEAD_CONN_TIMEOUT", dead_conn_timeout], sockets_attr(sockets)]
        if index is not None:
            attrs.insert(0, ["NBD_ATTR_INDEX", index])
        if backend_identifier is not None and self.has_backend_identifier:
            attrs.append(["NBD_ATTR_BACKEND_IDENTIFIER", backend_identifier])
        for reply in self._command(NBD_CMD_CONNECT, attrs):
            index = reply.get_attr("NBD_ATTR_INDEX", index)
        if index is None:  # the kernel could not allocate its reply; only the ack came
            raise NbdNetlinkError(errno.EIO, "nbd CONNECT: the kernel sent no device index")
        self._timeouts[index] = timeout
        return index

    def reconfigure(self, index: int, sockets: list[int] = (),
                    dead_conn_timeout: int | None = None, timeout: int | None = None,
                    backend_identifier: str | None = None) -> None:
        """Put each socket in place of a dead connection of device `index`; set timeouts.

        Raises NbdNetlinkError ENOSPC when a socket found no dead connection to replace. The
        kernel answers success then (nbd_genl_reconfigure turns nbd_reconnect_socket's
        -ENOSPC into 0) and drops the socket; to a socket it takes, it gives the device's
        TIMEOUT as send timeout. So a socket whose SO_SNDTIMEO did not change was not taken,
        unless the device's TIMEOUT is 0: known if this object connected the device or
        `timeout` is passed, else assumed nonzero.
        """
        attrs = [["NBD_ATTR_INDEX", index]]
        if backend_identifier is not None:
            # A device connected with one must be reconfigured with the same ("must specify
            # backend" otherwise): the kernel's check that a new socket serves the same image.
            attrs.append(["NBD_ATTR_BACKEND_IDENTIFIER", backend_identifier])
        if timeout is not None:
            attrs.append(["NBD_ATTR_TIMEOUT", timeout])
            self._timeouts[index] = timeout
        if dead_conn_timeout is not None:
            attrs.append(["NBD_ATTR_DEAD_CONN_TIMEOUT", dead_conn_timeout])
        if sockets:
            attrs.append(sockets_attr(sockets))
        before = [_send_timeout(fd) for fd in sockets]
        self._command(NBD_CMD_RECONFIGURE, attrs)
        if self._timeouts.get(index) == 0:
            return
        left = sum(_send_timeout(fd) == old for fd, old in zip(sockets, before))
        if left:
            raise NbdNetlinkError(errno.ENOSPC, f"nbd RECONFIGURE: nbd{index} had no dead "
                                                f"connection left for {left} of "
                                                f"{len(sockets)} socket(s)")

    def disconnect(self, index: int) -> None:
        self._command(NBD_CMD_DISCONNECT, [["NBD_ATTR_INDEX", index]])
        self._timeouts.pop(index, None)

    def status(self, index: int | None = None) -> dict[int, bool]:
        """Device index -> connected, of every device or of `index` ({} if there is none)."""
        attrs = [] if index is None else [["NBD_ATTR_INDEX", index]]
        replies = self._command(NBD_CMD_STATUS, attrs)  # one reply, or an error
        return status_from_reply(replies[0]) if replies else {}

    def close(self) -> None:
        self._sock.close()


class LinkDeadListener(_Closing):
    """Subscribed to nbd_mc_group; fileno() for poll(); read() -> list of device indices whose
    connection died (non-blocking: [] when nothing is pending)."""

    def __init__(self) -> None:
        with GenericNetlinkSocket() as lookup:
            family = _lookup_family(lookup)
        group = family.groups.get(NBD_GENL_MCAST_GROUP_NAME)
        if group is None:
            raise NbdNetlinkError(errno.ENOENT, "nbd: no multicast group nbd_mc_group")
        self._family_id = family.id
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                   NETLINK_GENERIC)
        try:
            self._sock.bind((0, 0))
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> list[int]:
        """Everything pending. Raises NbdNetlinkError ENOBUFS when the kernel dropped
        notifications for want of room: which devices they named is lost, so any device may
        have lost a connection."""
        indices: list[int] = []
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return indices
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    raise NbdNetlinkError(errno.ENOBUFS, "nbd LINK_DEAD: notifications were "
                                                         "dropped unread") from None
                raise
            indices.extend(link_dead_indices(data, self._family_id))

    def close(self) -> None:
        self._sock.close()
