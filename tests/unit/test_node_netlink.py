"""netswap-node's nbd generic netlink messages, byte by byte against the kernel's layout.

The expected bytes are packed here by hand from include/uapi/linux/nbd-netlink.h and
drivers/block/nbd.c (the numbers are written out, not taken from the module): nlmsghdr
(len u32, type u16, flags u16, seq u32, pid u32), the genl header (cmd u8, version u8,
reserved u16), then attributes as TLVs (nla_len u16, nla_type u16, payload, padded to 4 bytes).
This host has no nbd module, so the commands go to a stand-in for pyroute2's socket and the
kernel's replies are hand-built; NbdNetlink against a real kernel is tested on the nodes.
"""

from __future__ import annotations

import errno
import glob
import os
import socket
import struct
from types import SimpleNamespace

import pytest
from pyroute2.netlink import nlmsgerr
from pyroute2.netlink.exceptions import NetlinkError

from netswap.node import netlink as nl
from netswap.node.netlink import (CLIENT_FLAG_DESTROY_ON_DISCONNECT,
                                  CLIENT_FLAG_DISCONNECT_ON_CLOSE, LinkDeadListener, NbdMessage,
                                  NbdNetlink, NbdNetlinkError, link_dead_indices,
                                  sockets_attr, status_from_reply)

FAMILY = 0x1F  # the family id the genl controller hands out at run time
NLM_F_REQUEST, NLM_F_ACK = 1, 4
CONNECT, DISCONNECT, RECONFIGURE, LINK_DEAD, STATUS = 1, 2, 3, 4, 5
(INDEX, SIZE_BYTES, BLOCK_SIZE_BYTES, TIMEOUT, SERVER_FLAGS, CLIENT_FLAGS, SOCKETS,
 DEAD_CONN_TIMEOUT, DEVICE_LIST, BACKEND_IDENTIFIER) = range(1, 11)
SOCK_ITEM = SOCK_FD = 1
DEVICE_ITEM = DEVICE_INDEX = 1
DEVICE_CONNECTED = 2


# -- the layout, by hand ----------------------------------------------------------------------

def tlv(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def u8(kind, value):
    return tlv(kind, struct.pack("=B", value))


def u32(kind, value):
    return tlv(kind, struct.pack("=I", value))


def u64(kind, value):
    return tlv(kind, struct.pack("=Q", value))


def genl(cmd: int) -> bytes:
    return struct.pack("=BBH", cmd, 1, 0)  # version 1 (NBD_GENL_VERSION)


def nlmsg(kind: int, payload: bytes, flags=0, seq=0, pid=0) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, pid) + payload


def sockets(*fds) -> bytes:
    return tlv(SOCKETS, b"".join(tlv(SOCK_ITEM, u32(SOCK_FD, fd)) for fd in fds))


def split(data: bytes) -> list[bytes]:
    """The top-level TLVs of an attribute area, each as its padded bytes."""
    out = []
    while data:
        length, _ = struct.unpack_from("=HH", data)
        assert length >= 4
        padded = length + (-length % 4)
        assert len(data) >= padded
        out.append(data[:padded])
        data = data[padded:]
    return out


def decoded(data: bytes) -> NbdMessage:
    msg = NbdMessage(data)
    msg.decode()
    return msg


def ack(seq=0) -> nlmsgerr:
    msg = nlmsgerr(nlmsg(2, struct.pack("=i", 0) + nlmsg(FAMILY, b"", seq=seq)))
    msg.decode()
    return msg


def test_the_message_class_encodes_the_kernels_layout():
    msg = NbdMessage()
    msg["cmd"], msg["version"] = CONNECT, 1
    msg["header"].update(type=FAMILY, flags=NLM_F_REQUEST | NLM_F_ACK, sequence_number=7,
                         pid=4242)
    msg["attrs"] = [
        ["NBD_ATTR_INDEX", 3],
        ["NBD_ATTR_SIZE_BYTES", 5 << 30],
        ["NBD_ATTR_BLOCK_SIZE_BYTES", 4096],
        ["NBD_ATTR_TIMEOUT", 30],
        ["NBD_ATTR_SERVER_FLAGS", 0x1ED],
        ["NBD_ATTR_CLIENT_FLAGS", CLIENT_FLAG_DESTROY_ON_DISCONNECT],
        sockets_attr([5, 6]),
        ["NBD_ATTR_DEAD_CONN_TIMEOUT", 120],
        ["NBD_ATTR_BACKEND_IDENTIFIER", "netswap:srv:10809/node-a"],
    ]
    msg.encode()
    assert bytes(msg.data) == nlmsg(
        FAMILY,
        genl(CONNECT) + u32(INDEX, 3) + u64(SIZE_BYTES, 5 << 30) + u64(BLOCK_SIZE_BYTES, 4096)
        + u64(TIMEOUT, 30) + u64(SERVER_FLAGS, 0x1ED) + u64(CLIENT_FLAGS, 1)
        + tlv(SOCKETS, tlv(SOCK_ITEM, u32(SOCK_FD, 5)) + tlv(SOCK_ITEM, u32(SOCK_FD, 6)))
        + u64(DEAD_CONN_TIMEOUT, 120) + tlv(BACKEND_IDENTIFIER, b"netswap:srv:10809/node-a\0"),
        flags=NLM_F_REQUEST | NLM_F_ACK, seq=7, pid=4242)
    assert (CLIENT_FLAG_DESTROY_ON_DISCONNECT, CLIENT_FLAG_DISCONNECT_ON_CLOSE) == (1, 2)


def test_a_hand_built_message_decodes():
    msg = decoded(nlmsg(FAMILY, genl(RECONFIGURE) + u32(INDEX, 2) + sockets(9)
                        + u64(DEAD_CONN_TIMEOUT, 60)))
    assert (msg["cmd"], msg["version"]) == (RECONFIGURE, 1)
    assert msg.get_attr("NBD_ATTR_INDEX") == 2
    assert msg.get_attr("NBD_ATTR_DEAD_CONN_TIMEOUT") == 60
    (item,) = msg.get_attr("NBD_ATTR_SOCKETS").get_attrs("NBD_SOCK_ITEM")
    assert item.get_attr("NBD_SOCK_FD") == 9


# -- commands, through a stand-in for pyroute2's socket ----------------------------------------

class FakeSocket:
    """What NbdNetlink uses of GenericNetlinkSocket: marshal.msg_map, nlm_request, close."""

    def __init__(self, replies=(), error=None, effect=None):
        self.marshal = SimpleNamespace(msg_map={})
        self.replies, self.error, self.effect = list(replies), error, effect
        self.sent: list[bytes] = []
        self.closed = False

    def nlm_request(self, msg, msg_type, msg_flags):
        msg["header"].update(type=msg_type, flags=msg_flags)
        msg.encode()
        self.sent.append(bytes(msg.data))
        if self.effect is not None:
            self.effect()
        if self.error is not None:
            raise self.error
        return tuple(self.replies)

    def close(self):
        self.closed = True


def netlink(sock: FakeSocket, maxattr=10) -> NbdNetlink:
    netlink = NbdNetlink.__new__(NbdNetlink)
    netlink._adopt(sock, nl._Family(FAMILY, maxattr, {"nbd_mc_group": 9}))
    assert sock.marshal.msg_map[FAMILY] is NbdMessage
    return netlink


def request(sock: FakeSocket, cmd: int) -> list[bytes]:
    """The one request sent: checks nlmsghdr and genl header, returns the TLVs."""
    (data,) = sock.sent
    length, kind, flags = struct.unpack_from("=IHH", data)
    assert (length, kind, flags) == (len(data), FAMILY, NLM_F_REQUEST | NLM_F_ACK)
    assert data[16:20] == genl(cmd)
    return split(data[20:])


def connect(netlink, **changes):
    args = dict(sockets=[7, 8], size=1 << 30, block_size=4096, server_flags=0x10D, timeout=30,
                dead_conn_timeout=300, backend_identifier="netswap:a:10809/n1")
    return netlink.connect(**dict(args, **changes))


def test_connect_sends_every_attribute_and_returns_the_kernels_index():
    sock = FakeSocket([decoded(nlmsg(FAMILY, genl(CONNECT) + u32(INDEX, 4))), ack()])
    with netlink(sock) as nbd:
        assert nbd.has_backend_identifier
        assert connect(nbd, client_flags=CLIENT_FLAG_DISCONNECT_ON_CLOSE) == 4
    assert sock.closed
    assert sorted(request(sock, CONNECT)) == sorted([
        u64(SIZE_BYTES, 1 << 30), u64(BLOCK_SIZE_BYTES, 4096), u64(TIMEOUT, 30),
        u64(SERVER_FLAGS, 0x10D), u64(CLIENT_FLAGS, 2), u64(DEAD_CONN_TIMEOUT, 300),
        sockets(7, 8), tlv(BACKEND_IDENTIFIER, b"netswap:a:10809/n1\0")])


def test_connect_to_a_chosen_index():
    sock = FakeSocket([decoded(nlmsg(FAMILY, genl(CONNECT) + u32(INDEX, 2)))])
    assert connect(netlink(sock), index=2) == 2
    assert u32(INDEX, 2) in request(sock, CONNECT)


def test_backend_identifier_follows_the_familys_maxattr():
    old = FakeSocket([decoded(nlmsg(FAMILY, genl(CONNECT) + u32(INDEX, 0)))])
    nbd = netlink(old, maxattr=9)  # NBD_ATTR_DEVICE_LIST: a kernel before the identifier
    assert not nbd.has_backend_identifier
    connect(nbd)
    assert all(struct.unpack_from("=H", t, 2)[0] != BACKEND_IDENTIFIER
               for t in request(old, CONNECT))
    assert netlink(FakeSocket(), maxattr=0).has_backend_identifier  # unknown: try


def test_connect_with_only_an_ack():
    assert connect(netlink(FakeSocket([ack()])), index=5) == 5
    with pytest.raises(NbdNetlinkError) as info:
        connect(netlink(FakeSocket([ack()])))
    assert info.value.errno == errno.EIO


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EBUSY, errno.EPERM, errno.ENOSPC])
def test_a_kernel_error_names_the_command(code):
    nbd = netlink(FakeSocket(error=NetlinkError(code)))
    with pytest.raises(NbdNetlinkError) as info:
        nbd.reconfigure(1, dead_conn_timeout=10)
    error = info.value
    assert isinstance(error, OSError) and error.errno == code
    assert "RECONFIGURE" in str(error) and os.strerror(code) in str(error)
    assert error.__suppress_context__ and error.__cause__ is None
    with pytest.raises(NbdNetlinkError, match="DISCONNECT: the kernel's own words"):
        netlink(FakeSocket(error=NetlinkError(code, "the kernel's own words"))).disconnect(1)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def adopt(sock: socket.socket, seconds=30):
    """What nbd_reconnect_socket does to a socket it takes: sk_sndtimeo = the device's TIMEOUT."""
    return lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                   struct.pack("ll", seconds, 0))  # native timeval


def test_reconfigure_sends_the_socket_and_timeouts(pair):
    sock = FakeSocket([ack()], effect=adopt(pair[0]))
    netlink(sock).reconfigure(3, [pair[0].fileno()], dead_conn_timeout=90, timeout=20)
    assert sorted(request(sock, RECONFIGURE)) == sorted([
        u32(INDEX, 3), u64(TIMEOUT, 20), u64(DEAD_CONN_TIMEOUT, 90), sockets(pair[0].fileno())])


def test_reconfigure_a_socket_the_kernel_did_not_take_is_enospc(pair):
    # The kernel answers 0 when it finds no dead slot (it turns its own -ENOSPC into 0).
    with pytest.raises(NbdNetlinkError) as info:
        netlink(FakeSocket([ack()])).reconfigure(3, [pair[0].fileno()])
    assert info.value.errno == errno.ENOSPC and "nbd3" in str(info.value)
    taken = FakeSocket([ack()], effect=adopt(pair[1]))
    with pytest.raises(NbdNetlinkError, match="1 of 2"):
        netlink(taken).reconfigure(3, [pair[1].fileno(), pair[0].fileno()])


def test_reconfigure_cannot_tell_on_a_device_without_timeout(pair):
    nbd = netlink(FakeSocket([decoded(nlmsg(FAMILY, genl(CONNECT) + u32(INDEX, 1)))]))
    connect(nbd, timeout=0)
    nbd._sock = FakeSocket([ack()])
    nbd.reconfigure(1, [pair[0].fileno()])  # no send timeout to see: believed
    netlink(FakeSocket([ack()])).reconfigure(6, [pair[0].fileno()], timeout=0)


def test_disconnect(pair):
    sock = FakeSocket([ack()])
    netlink(sock).disconnect(12)
    assert request(sock, DISCONNECT) == [u32(INDEX, 12)]


# -- STATUS and LINK_DEAD, decoded from the kernel's bytes -------------------------------------

def status_reply(*devices) -> bytes:
    # nla_nest_start_noflag: the kernel sets no NLA_F_NESTED on these.
    items = b"".join(tlv(DEVICE_ITEM, u32(DEVICE_INDEX, index) + u8(DEVICE_CONNECTED, up))
                     for index, up in devices)
    return nlmsg(FAMILY, genl(STATUS) + tlv(DEVICE_LIST, items), seq=300, pid=1234)


def test_a_status_reply_decodes():
    assert status_from_reply(decoded(status_reply((0, 1), (1, 0), (3, 1)))) == {
        0: True, 1: False, 3: True}
    assert status_from_reply(decoded(status_reply())) == {}


def test_status_of_all_devices_and_of_one():
    every = FakeSocket([decoded(status_reply((0, 0), (1, 1))), ack()])
    assert netlink(every).status() == {0: False, 1: True}
    assert request(every, STATUS) == []
    one = FakeSocket([decoded(status_reply((1, 1)))])
    assert netlink(one).status(1) == {1: True}
    assert request(one, STATUS) == [u32(INDEX, 1)]


def link_dead(index: int) -> bytes:
    return nlmsg(FAMILY, genl(LINK_DEAD) + u32(INDEX, index))  # genlmsg_put(skb, 0, 0, ...)


def test_link_dead_multicasts_decode():
    other = nlmsg(FAMILY + 1, genl(LINK_DEAD) + u32(INDEX, 8))
    assert link_dead_indices(link_dead(2) + other + link_dead(5), FAMILY) == [2, 5]
    assert link_dead_indices(nlmsg(FAMILY, genl(STATUS) + u32(INDEX, 1)), FAMILY) == []


def listener(sock) -> LinkDeadListener:
    listener = LinkDeadListener.__new__(LinkDeadListener)
    listener._sock, listener._family_id = sock, FAMILY
    return listener


def test_the_listener_reads_everything_pending_without_blocking():
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    with kernel, listener(ours) as dead:
        assert dead.fileno() == ours.fileno()
        assert dead.read() == []
        kernel.send(link_dead(2))
        kernel.send(link_dead(0) + link_dead(2))
        assert dead.read() == [2, 0, 2]
        assert dead.read() == []
    assert ours.fileno() == -1


def test_the_listener_says_when_notifications_were_lost():
    def overrun(size):
        raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))

    with pytest.raises(NbdNetlinkError) as info:
        listener(SimpleNamespace(recv=overrun)).read()
    assert info.value.errno == errno.ENOBUFS


# -- this host: no nbd module -------------------------------------------------------------------

def nbd_may_be_there() -> bool:
    # Kernels since 6.4 alias the family to the module, so a lookup could load it.
    return os.path.exists("/sys/module/nbd") or bool(
        glob.glob(f"/lib/modules/{os.uname().release}/kernel/drivers/block/nbd.ko*"))


@pytest.mark.skipif(nbd_may_be_there(), reason="the nbd module is (or can be) loaded here")
@pytest.mark.parametrize("kind", [NbdNetlink, LinkDeadListener])
def test_without_the_nbd_module_a_clean_error(kind):
    with pytest.raises(OSError) as info:
        kind()
    error = info.value
    assert isinstance(error, NbdNetlinkError), repr(error)
    assert error.errno == errno.ENOENT and "modprobe nbd" in str(error)
    assert error.__cause__ is None and error.__suppress_context__  # no pyroute2 traceback
