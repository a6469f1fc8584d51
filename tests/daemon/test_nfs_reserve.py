"""The reserve on a multiplexed protocol (issue 7; the seed's part 2 for real).

One NFS connection of a swap node carries calls for every file of its mount. With the
normal budget held by someone else (a non-swap NBD client stalled in the middle of a large
WRITE, whose buffer the daemon holds while it waits for the payload), the node's records
are received into its reserve: a call for its swap file proceeds, a call for a scratch file
received that way is not executed (NFS3ERR_JUKEBOX, counted as an emergency drop), and a
client that is no node never touches the reserve: it waits until normal memory is back.
Each branch is proven on the wire, with the counters.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from netswap.nbd import constants as NBD
from netswap.rpc import message as rpc
from netswap.rpc.xdr import Unpacker
from support.daemon import stop_clean
from support.metrics import metric
from support.nbd_raw import request as nbd_request, transmission
from support.nfs import RpcClient, sattr3, start_nfs, xdr
from support.wait import wait_until

KiB, MiB = 1 << 10, 1 << 20
NFS_PROGRAM, MOUNT_PROGRAM = 100003, 100005
WRITE, CREATE, LOOKUP, READ = 7, 8, 3, 6
FATTR3_BYTES = 84
FILE_SYNC, NFS3ERR_JUKEBOX = 2, 10008
ROOT = rpc.AuthSys(stamp=0, machine="test", uid=0, gid=0)


def succeeded(reply: rpc.Reply) -> Unpacker:
    """The results of a call the RPC layer accepted and ran (status first)."""
    assert reply.accepted and reply.stat == 0, reply
    return Unpacker(reply.results)


def nfs_call(client: RpcClient, procedure: int, args: bytes) -> Unpacker:
    return succeeded(client.call(NFS_PROGRAM, 3, procedure, args, cred=ROOT))


def mount(daemon, source: str, path: str) -> bytes:
    client = RpcClient(daemon.mount_port, source)
    try:
        results = succeeded(client.call(MOUNT_PROGRAM, 3, 1, xdr(("o", path.encode())),
                                        cred=ROOT))
        assert results.uint() == 0
        return bytes(results.opaque(64))
    finally:
        client.close()


def write_args(handle: bytes, offset: int, data: bytes) -> bytes:
    return xdr(("o", handle), ("h", offset), ("u", len(data)), ("u", FILE_SYNC), ("o", data))


def write_status(client: RpcClient, handle: bytes, offset: int, data: bytes) -> int:
    return nfs_call(client, WRITE, write_args(handle, offset, data)).uint()


def lookup(client: RpcClient, directory: bytes, name: str) -> bytes:
    results = nfs_call(client, LOOKUP, xdr(("o", directory), ("o", name.encode())))
    assert results.uint() == 0
    return bytes(results.opaque(64))


def create_file(client: RpcClient, directory: bytes, name: str) -> bytes:
    """CREATE (UNCHECKED, no attributes set) of `name`: the new file's handle."""
    results = nfs_call(client, CREATE, xdr(("o", directory), ("o", name.encode()), ("u", 0))
                       + sattr3())
    assert results.uint() == 0 and results.bool()
    return bytes(results.opaque(64))


def start_reserve_daemon(tmp_path, nfs_extra: str = "", swap_extra: str = ""):
    return start_nfs(
        tmp_path,
        """
            swap_size = "4MiB"
            max_io = "64KiB"
            nodes = { localhost = ["127.0.0.1"] }
            """ + nfs_extra,
        nbd_options='max_request = "1MiB"',
        pool_options='normal_budget = "1MiB"\nheadroom = 0',
        # One node's reserve, small: the pool is then little more than the normal budget.
        swap_options='max_nodes = 1\nreserve_inflight = 4\nreserve_request = "64KiB"\n'
                     'max_connections = 1\n' + swap_extra,
    )


@pytest.fixture
def daemon(tmp_path):
    running = start_reserve_daemon(tmp_path)
    yield running
    stop_clean(running)


def exhaust_normal_budget(daemon) -> list:
    """Someone else takes the normal budget: non-swap NBD WRITEs of up to 1 MiB whose
    payload stalls after 4 KiB; the daemon holds their buffers while waiting for the rest.
    Returns the stalled connections (closing them gives the memory back)."""
    holders = []
    while (free := normal_free(daemon)) >= 64 * KiB and len(holders) < 16:
        size = min(MiB, 1 << (int(free).bit_length() - 1))  # a buddy block that fits
        hold = transmission(daemon)
        nbd_request(hold, NBD.CMD_WRITE, len(holders) * MiB, size, cookie=1,
                    payload=bytes(4 * KiB))
        holders.append(hold)
        time.sleep(0.2)
    assert normal_free(daemon) < 64 * KiB, "could not exhaust the normal budget"
    return holders


def normal_free(daemon) -> float:
    return (metric(daemon, "netswap_pool_free_bytes")
            - metric(daemon, "netswap_pool_watermark_bytes"))


def test_a_swap_nodes_records_use_its_reserve_and_non_swap_calls_are_dropped(daemon):
    swap_root = mount(daemon, "127.0.0.1", "/swap")
    scratch_root = mount(daemon, "127.0.0.1", "/scratch")
    node = RpcClient(daemon.nfs_port, "127.0.0.1")  # node "localhost": tagged, attached
    stranger = RpcClient(daemon.nfs_port, "127.0.0.3")  # no node: never the reserve
    swap_file = lookup(node, swap_root, "localhost")
    # A scratch file to write to later, made while normal memory is plentiful.
    scratch_file = create_file(node, scratch_root, "notes")
    block = os.urandom(32 * KiB)

    holders = exhaust_normal_budget(daemon)
    emergency_before = metric(daemon, "netswap_emergency_allocations_total")

    # Branch 1: the node's swap-file WRITE is received into its reserve and proceeds.
    assert write_status(node, swap_file, 0, block) == 0
    assert metric(daemon, "netswap_emergency_allocations_total") > emergency_before
    assert (daemon.state_dir / "nfs-swap" / "localhost").read_bytes()[:len(block)] == block

    # A swap-in: the data of the node's swap-file READ comes from its reserve too (normal
    # memory is still gone; waiting for it would leave the node's page fault hanging).
    emergency_before = metric(daemon, "netswap_emergency_allocations_total")
    results = nfs_call(node, READ, xdr(("o", swap_file), ("h", 0), ("u", len(block))))
    assert results.uint() == 0
    assert results.bool()  # post_op_attr present
    results.fixed_opaque(FATTR3_BYTES)
    assert results.uint() == len(block)
    results.bool()  # eof
    assert bytes(results.opaque(len(block))) == block
    assert metric(daemon, "netswap_emergency_allocations_total") >= emergency_before + 2

    # Branch 2: the same connection's WRITE to a scratch file, received into the reserve,
    # is not executed: JUKEBOX, counted, the file unchanged.
    assert write_status(node, scratch_file, 0, block) == NFS3ERR_JUKEBOX
    assert metric(daemon, "netswap_emergency_dropped_total", consumer="nfs") == 1
    assert (daemon.state_dir / "nfs-scratch" / "notes").stat().st_size == 0

    # Branch 3: a client that is no node waits for normal memory, never the reserve.
    xid = stranger.send_call(NFS_PROGRAM, 3, WRITE, write_args(scratch_file, 0, block), ROOT)
    stranger.sock.settimeout(1.5)
    with pytest.raises(socket.timeout):
        stranger.sock.recv(1)
    for hold in holders:  # normal memory comes back
        hold.close()
    stranger.sock.settimeout(10)
    assert succeeded(stranger.reply(xid)).uint() == 0
    assert (daemon.state_dir / "nfs-scratch" / "notes").read_bytes() == block
    assert metric(daemon, "netswap_emergency_dropped_total", consumer="nfs") == 1
    node.close()
    stranger.close()


def test_scratch_writes_the_c_loop_serves_never_take_the_reserve(daemon):
    # The NFS C loop serves scratch-file WRITEs too, with normal memory only: once that is
    # gone, the node's scratch WRITE is Python's (received into its reserve: JUKEBOX) and a
    # stranger's waits for memory, exactly as without the loop.
    mount(daemon, "127.0.0.1", "/swap")  # attaches the node: its records may use the reserve
    scratch_root = mount(daemon, "127.0.0.1", "/scratch")
    node = RpcClient(daemon.nfs_port, "127.0.0.1")
    stranger = RpcClient(daemon.nfs_port, "127.0.0.3")
    scratch_file = create_file(node, scratch_root, "served")
    path = daemon.state_dir / "nfs-scratch" / "served"
    block = os.urandom(32 * KiB)
    for client in (node, stranger):  # the first WRITE Python's, the next two the loop's
        for _ in range(3):
            assert write_status(client, scratch_file, 0, block) == 0
    served = metric(daemon, "netswap_nfs_c_loop_scratch_calls_total", procedure="write")
    assert served == 4

    holders = exhaust_normal_budget(daemon)
    emergency_before = metric(daemon, "netswap_emergency_allocations_total")
    other = os.urandom(32 * KiB)
    assert write_status(node, scratch_file, 0, other) == NFS3ERR_JUKEBOX
    assert metric(daemon, "netswap_emergency_dropped_total", consumer="nfs") == 1
    assert metric(daemon, "netswap_emergency_allocations_total") > emergency_before
    assert path.read_bytes() == block
    xid = stranger.send_call(NFS_PROGRAM, 3, WRITE, write_args(scratch_file, 0, other), ROOT)
    stranger.sock.settimeout(1.5)
    with pytest.raises(socket.timeout):
        stranger.sock.recv(1)
    emergency_before = metric(daemon, "netswap_emergency_allocations_total")
    for hold in holders:  # normal memory comes back
        hold.close()
    stranger.sock.settimeout(10)
    assert succeeded(stranger.reply(xid)).uint() == 0
    assert path.read_bytes() == other
    # Neither was the loop's, and the stranger's took no reserve.
    assert metric(daemon, "netswap_nfs_c_loop_scratch_calls_total", procedure="write") == served
    assert metric(daemon, "netswap_emergency_allocations_total") == emergency_before
    node.close()
    stranger.close()


def test_a_node_released_for_idleness_that_pages_under_pressure_is_attached_again(tmp_path):
    daemon = start_reserve_daemon(tmp_path, nfs_extra='swap_idle_timeout = "1s"',
                                  swap_extra='detach_grace = "0.2s"')
    try:
        swap_root = mount(daemon, "127.0.0.1", "/swap")  # attaches the node
        node = RpcClient(daemon.nfs_port, "127.0.0.1")
        swap_file = lookup(node, swap_root, "localhost")
        wait_until(lambda: metric(daemon, "netswap_node_detaches_total") >= 1,
                   timeout=15, interval=0.1, what=daemon.log)
        assert metric(daemon, "netswap_nfs_node_releases_total", reason="idle") == 1
        holders = exhaust_normal_budget(daemon)
        emergency_before = metric(daemon, "netswap_emergency_allocations_total")
        # Its swap-out arrives with normal memory gone: received into its reserve, which
        # is attached again for it, rather than waiting for memory the swap-out would free.
        block = os.urandom(32 * KiB)
        assert write_status(node, swap_file, 0, block) == 0
        assert metric(daemon, "netswap_node_attaches_total") == 2
        assert metric(daemon, "netswap_emergency_allocations_total") > emergency_before
        assert (daemon.state_dir / "nfs-swap" / "localhost").read_bytes()[:len(block)] == block
        for hold in holders:
            hold.close()
        node.close()
    finally:
        stop_clean(daemon)


def test_a_reader_waiting_for_pool_memory_does_not_hold_up_the_stop(tmp_path):
    daemon = start_reserve_daemon(tmp_path)
    holders: list = []
    try:
        scratch_root = mount(daemon, "127.0.0.3", "/scratch")
        stranger = RpcClient(daemon.nfs_port, "127.0.0.3")  # no node: waits for memory
        scratch_file = create_file(stranger, scratch_root, "waits")
        holders = exhaust_normal_budget(daemon)  # kept open: their memory stays taken
        stranger.send_call(NFS_PROGRAM, 3, WRITE, write_args(scratch_file, 0, bytes(32 * KiB)),
                           ROOT)
        wait_until(lambda: metric(daemon, "netswap_held_back_total", consumer="non_swap") >= 1,
                   timeout=15, interval=0.1, what=daemon.log)
    finally:
        code = daemon.stop()  # SIGTERM with that reader still waiting for pool memory
        for hold in holders:
            hold.close()
    log = daemon.log()
    assert "did not finish" not in log, log  # its thread ended: a clean stop
    assert code == 0, log


def test_the_reserve_tree_has_node_slots_for_nfs_swap_alone(tmp_path):
    """NBD swap off, NFS swap on: nodes still get reserve slots, and the tree says whose."""
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[swap]\nenabled = false\n'
                      'max_nodes = 2\n')
    result = subprocess.run([sys.executable, "-m", "netswap", "reserve", "--config",
                             str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "swap/<node> ×2" in result.stdout and "over NBD or NFS" in result.stdout, result.stdout
