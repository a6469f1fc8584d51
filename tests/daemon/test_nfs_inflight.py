"""Calls of one NFS connection served on its own thread (one alone) and on the workers (many
in flight), mixed on one connection against a live netswapd: every call answered once, by
xid, the data where it was written, every pool byte free again afterwards."""

from __future__ import annotations

import os

import pytest

from netswap.nfs.server import MAX_INFLIGHT_CALLS
from netswap.rpc import constants as RC
from netswap.rpc import message as rpc
from netswap.rpc.xdr import Unpacker
from support.daemon import stop_clean
from support.metrics import metric
from support.nfs import (
    ALPHA, CREATE, FILE_SYNC, Nfs, NFS3_OK, READ, RpcClient, UNSTABLE, WRITE, header, sattr3,
    start_nfs_daemon, xdr,
)
from support.wait import wait_until

BLOCK = 4096


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    daemon = start_nfs_daemon(tmp_path_factory.mktemp("nfs-inflight"))
    alpha = None
    try:
        alpha = Nfs(daemon, ALPHA)
        scratch = alpha.root("/scratch")
        u = alpha.proc(CREATE, xdr(("o", scratch), ("o", b"inflight.bin"), ("u", 0)) + sattr3())
        assert u.uint() == NFS3_OK and u.bool()
        yield daemon, alpha, bytes(u.opaque(64))
    finally:
        if alpha is not None:
            alpha.close()
        stop_clean(daemon)


def write_call(xid: int, handle: bytes, index: int, data: bytes, stable: int) -> bytes:
    call = header(xid, proc=WRITE) + xdr(("o", handle), ("h", index * BLOCK), ("u", len(data)),
                                         ("u", stable), ("o", data))
    return rpc.fragment_header(len(call)) + call


def answered(client: RpcClient, xids: list[int]) -> None:
    """One SUCCESS reply with NFS3_OK per xid, in any order, and nothing else."""
    replies = [rpc.parse_reply(client.receive_record()) for _ in xids]
    assert sorted(r.xid for r in replies) == sorted(xids)
    for reply in replies:
        assert reply.accepted and reply.stat == RC.SUCCESS
        assert Unpacker(reply.results).uint() == NFS3_OK


def all_pool_bytes_come_back(daemon, when: str) -> None:
    """This daemon serves no NBD: with no call in flight the whole pool is free. (Not a
    count taken before the calls: the buffers of the call before may still be on their way
    back, released after its reply was sent, which the client can see first.)"""
    size = metric(daemon, "netswap_pool_size_bytes")
    wait_until(lambda: metric(daemon, "netswap_pool_free_bytes") == size,
               what=lambda: f"{size - metric(daemon, 'netswap_pool_free_bytes')} pool bytes"
                            f" still held {when}")


def test_calls_alone_and_in_bursts_past_the_in_flight_limit_all_land(served):
    daemon, alpha, handle = served
    blocks = {}
    client = RpcClient(daemon.nfs_port, ALPHA)
    try:
        index = 0
        for round_ in range(3):
            # One call alone: the reader thread serves it.
            data = os.urandom(BLOCK)
            xid = client.next_xid()
            client.sock.sendall(write_call(xid, handle, index, data, FILE_SYNC))
            answered(client, [xid])
            blocks[index] = data
            index += 1
            # A burst of more calls than may be in flight: the reader stops at the limit
            # until replies free slots, the workers serve them.
            burst = []
            for _ in range(2 * MAX_INFLIGHT_CALLS + round_):
                data = os.urandom(BLOCK)
                burst.append((client.next_xid(), index, data))
                blocks[index] = data
                index += 1
            client.sock.sendall(b"".join(write_call(x, handle, i, d, UNSTABLE)
                                         for x, i, d in burst))
            answered(client, [x for x, _, _ in burst])
        for i, data in blocks.items():
            status, got, _ = alpha.read(handle, i * BLOCK, BLOCK)
            assert (status, got) == (NFS3_OK, data), i
    finally:
        client.close()
    all_pool_bytes_come_back(daemon, "after the calls")


def test_a_connection_closed_with_calls_in_flight_holds_nothing(served):
    daemon, alpha, handle = served
    client = RpcClient(daemon.nfs_port, ALPHA)
    try:
        client.sock.sendall(b"".join(
            rpc.fragment_header(len(call)) + call
            for call in (header(client.next_xid(), proc=READ)
                         + xdr(("o", handle), ("h", 0), ("u", BLOCK))
                         for _ in range(2 * MAX_INFLIGHT_CALLS))))
    finally:
        client.close()  # before reading a single reply
    all_pool_bytes_come_back(daemon, "after the close")
    status, _, _ = alpha.read(handle, 0, BLOCK)  # the daemon serves on
    assert status == NFS3_OK
