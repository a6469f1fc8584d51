"""Hostile clients and node isolation on the NFS side (issue 7, "Bad RPCs", "Swap files and
isolation"), against a live netswapd with a raw RPC client of our own.

The daemon maps 127.0.0.1 to node "alpha" and 127.0.0.2 to node "beta"; a client binds its
socket's source address to pick who it is (loopback accepts any 127/8 source), and 127.0.0.3
is in no node's network. Each case checks the reply the spec requires (or a closed
connection), the counter it must move in /metrics, and afterwards that alpha still reads its
swap file on a connection opened before the case and that every pool byte is free again.
A client repeating bad calls gets every answer but cannot flood the log.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Callable, Optional

import pytest

from netswap.rpc import constants as RC
from netswap.rpc import message as rpc
from netswap.rpc.xdr import Unpacker
from support.daemon import stop_clean
from support.metrics import metric
from support.nfs import (
    ALPHA, ALPHA_PATTERN, BETA, CREATE, FILE_SYNC, GETATTR, LOOKUP, MNT, MNT3ERR_ACCES,
    MOUNT_PROG, MOUNT_VERS, Nfs, NFS3_OK, NFS3ERR_ACCES, NFS3ERR_BADHANDLE, NFS3ERR_FBIG,
    NFS3ERR_NOENT, NFS3ERR_NOSPC, NFS3ERR_NOTSUPP, NFS_PROG, NFS_VERS, NULL, READ, REMOVE,
    RENAME, RpcClient, SETATTR, STRANGER, SWAP_SIZE, UNSTABLE, WRITE, header, sattr3, skip_wcc,
    start_nfs_daemon, xdr,
)
from support.wait import wait_until

@dataclass
class World:
    daemon: object
    alpha: Nfs            # connections opened before any case, kept across cases
    alpha_swap: bytes     # alpha's swap-file handle
    scratch_file: bytes   # a scratch file's handle (alpha made it)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    daemon = start_nfs_daemon(tmp_path_factory.mktemp("nfs-hostile"))
    alpha = None
    try:
        alpha = Nfs(daemon, ALPHA)
        alpha_swap = alpha.swap_handle("alpha")
        assert alpha.write(alpha_swap, 0, ALPHA_PATTERN)[0] == NFS3_OK
        scratch = alpha.root("/scratch")
        u = alpha.proc(CREATE, xdr(("o", scratch), ("o", b"plain.bin"), ("u", 0)) + sattr3())
        assert u.uint() == NFS3_OK and u.bool()
        scratch_file = bytes(u.opaque(64))
        yield World(daemon, alpha, alpha_swap, scratch_file)
    finally:
        if alpha is not None:
            alpha.close()
        stop_clean(daemon)


@pytest.fixture
def isolated(world):
    """Afterwards: alpha still reads its swap file on its old connection, alpha's data is
    what alpha wrote, and every pool byte is free again."""
    free_before = metric(world.daemon, "netswap_pool_free_bytes")
    yield world
    status, data, _ = world.alpha.read(world.alpha_swap, 0, len(ALPHA_PATTERN))
    assert (status, data) == (NFS3_OK, ALPHA_PATTERN)
    # Buffers are released once their reply is sent, which may trail the client's receipt:
    # so may the previous case's last READ, held still when free_before was read. Nothing
    # is held after the case if at least as much is free as before it.
    wait_until(lambda: metric(world.daemon, "netswap_pool_free_bytes") >= free_before, timeout=10,
               what="pool bytes still held after the case")


def counted(world, name: str, **labels) -> float:
    return metric(world.daemon, name, **labels)


# --------------------------------------------------------------------------- bad RPCs


def with_auth(xid, flavor, verifier_flavor=RC.AUTH_NONE, prog=NFS_PROG, vers=NFS_VERS):
    """A NULL call whose credential is `flavor` with 8 zero bytes of body (for AUTH_SYS: cut
    short) and whose verifier is `verifier_flavor` (with 8 bytes unless AUTH_NONE)."""
    verifier = b"" if verifier_flavor == RC.AUTH_NONE else bytes(8)
    credential = b"" if flavor == RC.AUTH_NONE else bytes(8)
    return (struct.pack(">6I", xid, RC.CALL, 2, prog, vers, NULL)
            + xdr(("u", flavor), ("o", credential), ("u", verifier_flavor), ("o", verifier)))


def truncated_write(handle: bytes) -> bytes:
    args = xdr(("o", handle), ("h", 0), ("u", 4096), ("u", FILE_SYNC), ("u", 4096))
    return args + bytes(100)  # the data<> says 4096 bytes, 100 follow


def check_accepted(stat):
    def check(reply):
        assert reply.accepted and reply.stat == stat, reply
    return check


def check_prog_mismatch(reply):
    assert reply.accepted and reply.stat == RC.PROG_MISMATCH and reply.mismatch == (3, 3), reply


def check_rpc_mismatch(reply):
    assert not reply.accepted and reply.stat == RC.RPC_MISMATCH and reply.mismatch == (2, 2), reply


def check_auth_error(auth_stat):
    def check(reply):
        assert (not reply.accepted and reply.stat == RC.AUTH_ERROR
                and reply.auth_stat == auth_stat), reply
    return check


@dataclass
class BadCall:
    """`record(xid, world)` is sent to `service` ("nfs" or "mount"); `check` judges the reply
    (None: the server must close); the counter (name, labels) must go up by one."""

    record: Callable
    check: Optional[Callable]
    counter: tuple
    service: str = "nfs"


BAD_CALLS = {
    "wrong program": BadCall(lambda x, w: header(x, prog=100004),
                             check_accepted(RC.PROG_UNAVAIL),
                             ("netswap_rpc_protocol_errors_total", {"reason": "prog_unavail"})),
    "wrong version": BadCall(lambda x, w: header(x, vers=4), check_prog_mismatch,
                             ("netswap_rpc_protocol_errors_total", {"reason": "prog_mismatch"})),
    "unknown procedure": BadCall(lambda x, w: header(x, proc=22),
                                 check_accepted(RC.PROC_UNAVAIL),
                                 ("netswap_rpc_protocol_errors_total",
                                  {"reason": "proc_unavail"})),
    "rpcvers 3": BadCall(lambda x, w: struct.pack(">6I", x, RC.CALL, 3, NFS_PROG, NFS_VERS, 0)
                         + xdr(("u", 0), ("o", b""), ("u", 0), ("o", b"")),
                         check_rpc_mismatch,
                         ("netswap_rpc_protocol_errors_total", {"reason": "rpc_mismatch"})),
    "unknown auth flavor": BadCall(lambda x, w: with_auth(x, 390004),
                                   check_auth_error(RC.AUTH_BADCRED),
                                   ("netswap_rpc_protocol_errors_total",
                                    {"reason": "auth_badcred"})),
    "AUTH_SYS body cut short": BadCall(lambda x, w: with_auth(x, RC.AUTH_SYS),
                                       check_auth_error(RC.AUTH_BADCRED),
                                       ("netswap_rpc_protocol_errors_total",
                                        {"reason": "auth_badcred"})),
    "a verifier of another flavor": BadCall(lambda x, w: with_auth(x, RC.AUTH_NONE, RC.AUTH_SYS),
                                            check_auth_error(RC.AUTH_BADVERF),
                                            ("netswap_rpc_protocol_errors_total",
                                             {"reason": "auth_badverf"})),
    "MOUNT wrong version": BadCall(lambda x, w: header(x, MOUNT_PROG, 4), check_prog_mismatch,
                                   ("netswap_rpc_protocol_errors_total",
                                    {"reason": "prog_mismatch"}), "mount"),
    "MOUNT unknown procedure": BadCall(lambda x, w: header(x, MOUNT_PROG, MOUNT_VERS, 9),
                                       check_accepted(RC.PROC_UNAVAIL),
                                       ("netswap_rpc_protocol_errors_total",
                                        {"reason": "proc_unavail"}), "mount"),
    "MNT path cut short": BadCall(
        lambda x, w: header(x, MOUNT_PROG, MOUNT_VERS, MNT) + xdr(("u", 100)) + b"/swa",
        check_accepted(RC.GARBAGE_ARGS),
        ("netswap_rpc_protocol_errors_total", {"reason": "garbage_args"}), "mount"),
    "NFS program on the MOUNT port": BadCall(lambda x, w: header(x),
                                             check_accepted(RC.PROG_UNAVAIL),
                                             ("netswap_rpc_protocol_errors_total",
                                              {"reason": "prog_unavail"}), "mount"),
    "a reply sent to the server": BadCall(lambda x, w: rpc.accepted(x), None,
                                          ("netswap_rpc_protocol_errors_total",
                                           {"reason": "not_a_call"})),
    "GETATTR truncated handle": BadCall(
        lambda x, w: header(x, proc=GETATTR) + xdr(("u", 31)) + w.alpha_swap[:10],
        check_accepted(RC.GARBAGE_ARGS),
        ("netswap_rpc_protocol_errors_total", {"reason": "garbage_args"})),
    "LOOKUP without a name": BadCall(
        lambda x, w: header(x, proc=LOOKUP) + xdr(("o", w.alpha_swap)),
        check_accepted(RC.GARBAGE_ARGS),
        ("netswap_rpc_protocol_errors_total", {"reason": "garbage_args"})),
    "READ without a count": BadCall(
        lambda x, w: header(x, proc=READ) + xdr(("o", w.alpha_swap), ("h", 0)),
        check_accepted(RC.GARBAGE_ARGS),
        ("netswap_rpc_protocol_errors_total", {"reason": "garbage_args"})),
    "WRITE data cut short": BadCall(
        lambda x, w: header(x, proc=WRITE) + truncated_write(w.alpha_swap),
        check_accepted(RC.GARBAGE_ARGS),
        ("netswap_rpc_protocol_errors_total", {"reason": "garbage_args"})),
    "WRITE count is not the data length": BadCall(
        lambda x, w: header(x, proc=WRITE) + xdr(("o", w.alpha_swap), ("h", 0), ("u", 100),
                                                  ("u", FILE_SYNC), ("o", bytes(50))),
        check_accepted(RC.GARBAGE_ARGS),
        ("netswap_rpc_protocol_errors_total", {"reason": "garbage_args"})),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_a_bad_call_gets_the_reply_the_spec_requires(isolated, case):
    world, bad = isolated, BAD_CALLS[case]
    name, labels = bad.counter
    before = counted(world, name, **labels)
    port, prog, vers = ((world.daemon.nfs_port, NFS_PROG, NFS_VERS) if bad.service == "nfs"
                        else (world.daemon.mount_port, MOUNT_PROG, MOUNT_VERS))
    client = RpcClient(port, BETA)
    try:
        xid = client.next_xid()
        record = bad.record(xid, world)
        if bad.check is None:
            client.send_record(record)
            client.expect_close()
        else:
            bad.check(client.raw_call(record, xid))
            # The connection carries on: a NULL call on it is answered.
            assert client.call(prog, vers, NULL).stat == RC.SUCCESS
    finally:
        client.close()
    assert counted(world, name, **labels) == before + 1


def test_a_record_in_fragments_and_calls_in_flight_are_answered_by_xid(isolated):
    world = isolated
    client = RpcClient(world.daemon.nfs_port, BETA)
    try:
        xid = client.next_xid()
        record = header(xid)
        client.sock.sendall(rpc.fragment_header(8, last=False) + record[:8]
                            + rpc.fragment_header(8, last=False) + record[8:16]
                            + rpc.fragment_header(len(record) - 16) + record[16:])
        reply = rpc.parse_reply(client.receive_record())
        assert (reply.xid, reply.accepted, reply.stat) == (xid, True, RC.SUCCESS)
        xids = [client.next_xid() for _ in range(16)]
        client.sock.sendall(b"".join(
            rpc.fragment_header(len(call)) + call
            for call in (header(x, proc=GETATTR) + xdr(("o", world.scratch_file)) for x in xids)))
        replies = [rpc.parse_reply(client.receive_record()) for _ in xids]
        assert sorted(r.xid for r in replies) == sorted(xids)
        assert all(r.accepted and r.stat == RC.SUCCESS for r in replies)
    finally:
        client.close()


def test_a_client_gone_in_the_middle_of_a_record_holds_nothing(isolated):
    world = isolated  # `isolated` checks the pool bytes are back
    client = RpcClient(world.daemon.nfs_port, BETA)
    client.sock.sendall(rpc.fragment_header(1000) + header(client.next_xid()))
    client.close()


# --------------------------------------------------------------------------- forged handles


def flipped(handle: bytes) -> bytes:
    return handle[:5] + bytes([handle[5] ^ 0x01]) + handle[6:]  # a bit of the fileid


FORGED = {
    "random 31 bytes": (lambda w: os.urandom(31), NFS3ERR_BADHANDLE),
    "one bit flipped": (lambda w: flipped(w.alpha_swap), NFS3ERR_BADHANDLE),
    "empty": (lambda w: b"", NFS3ERR_BADHANDLE),
    "65 bytes": (lambda w: w.alpha_swap + bytes(34), RC.GARBAGE_ARGS),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_a_forged_handle_is_refused(isolated, case):
    world = isolated
    make, expected = FORGED[case]
    handle = make(world)
    if expected == RC.GARBAGE_ARGS:
        counter = ("netswap_rpc_protocol_errors_total", {"reason": "garbage_args"})
    else:
        counter = ("netswap_nfs_errors_total", {"status": str(expected)})
    before = counted(world, counter[0], **counter[1])
    beta = Nfs(world.daemon, BETA)
    try:
        reply = beta.nfs.call(NFS_PROG, NFS_VERS, GETATTR, xdr(("o", handle)))
        if expected == RC.GARBAGE_ARGS:
            assert reply.accepted and reply.stat == RC.GARBAGE_ARGS, reply
        else:
            assert reply.accepted and reply.stat == RC.SUCCESS, reply
            u = Unpacker(reply.results)
            assert u.uint() == expected
            u.done()  # GETATTR's failure body is the status alone
    finally:
        beta.close()
    assert counted(world, counter[0], **counter[1]) == before + 1


# --------------------------------------------------------------------------- isolation


def test_beta_cannot_use_alphas_swap_file_handle(isolated):
    world = isolated
    before = counted(world, "netswap_nfs_errors_total", status=str(NFS3ERR_ACCES))
    beta = Nfs(world.daemon, BETA)
    try:
        assert beta.getattr(world.alpha_swap) == (NFS3ERR_ACCES, None)
        assert beta.read(world.alpha_swap, 0, 4096)[0] == NFS3ERR_ACCES
        assert beta.write(world.alpha_swap, 0, b"\xee" * 4096) == (NFS3ERR_ACCES, None)
        assert beta.commit(world.alpha_swap) == (NFS3ERR_ACCES, None)
    finally:
        beta.close()
    assert counted(world, "netswap_nfs_errors_total", status=str(NFS3ERR_ACCES)) == before + 4
    # alpha's data unchanged: checked by `isolated`, and on disk here.
    on_disk = (world.daemon.state_dir / "nfs-swap" / "alpha").read_bytes()
    assert on_disk[:len(ALPHA_PATTERN)] == ALPHA_PATTERN


@pytest.mark.parametrize("proc, args", [
    pytest.param(4, lambda h: xdr(("o", h), ("u", 0x3F)), id="access"),
    # The size it has: OK for alpha, so only isolation can refuse it to beta.
    pytest.param(SETATTR, lambda h: xdr(("o", h)) + sattr3(size=SWAP_SIZE) + xdr(("b", False)),
                 id="setattr"),
    pytest.param(18, lambda h: xdr(("o", h)), id="fsstat"),
    pytest.param(LOOKUP, lambda h: xdr(("o", h), ("o", b"alpha")), id="lookup"),
])
def test_beta_gets_nothing_else_through_alphas_handle(isolated, proc, args):
    world = isolated
    beta = Nfs(world.daemon, BETA)
    try:
        assert beta.proc(proc, args(world.alpha_swap)).uint() == NFS3ERR_ACCES
    finally:
        beta.close()


def test_beta_sees_neither_alphas_name_nor_file_in_swap(isolated):
    world = isolated
    beta = Nfs(world.daemon, BETA)
    try:
        swap = beta.root("/swap")
        for name in ("alpha", "beta/../alpha", "../alpha", "alpha\0", "ALPHA", ".."):
            assert beta.lookup(swap, name) == (NFS3ERR_NOENT, None), name
        assert beta.lookup(swap, "beta")[0] == NFS3_OK  # beta's own, made on first use
        assert beta.readdir(swap) == (NFS3_OK, ["beta"])
    finally:
        beta.close()
    alpha_swap = world.alpha.root("/swap")
    assert world.alpha.readdir(alpha_swap) == (NFS3_OK, ["alpha"])


def test_a_client_in_no_nodes_network_may_mount_scratch_but_not_swap(isolated):
    world = isolated
    refusals = ("netswap_access_denied_total", {"export_reason": "nfs:not_a_node"})
    before = counted(world, refusals[0], **refusals[1])
    stranger = Nfs(world.daemon, STRANGER)
    try:
        assert stranger.mnt("/swap") == (MNT3ERR_ACCES, None)
        scratch = stranger.root("/scratch")
        assert stranger.readdir(scratch) == (NFS3_OK, ["plain.bin"])
        # A swap handle obtained elsewhere gets it nothing either.
        assert stranger.getattr(world.alpha_swap) == (NFS3ERR_ACCES, None)
    finally:
        stranger.close()
    assert counted(world, refusals[0], **refusals[1]) == before + 1


# --------------------------------------------------------------------------- out of range


def test_read_past_the_end_returns_nothing_and_eof(isolated):
    world = isolated
    for offset in (SWAP_SIZE, SWAP_SIZE + 4096, 2**64 - 1):
        assert world.alpha.read(world.alpha_swap, offset, 4096) == (NFS3_OK, b"", True)
    # The last bytes: a short read that ends at eof.
    assert world.alpha.read(world.alpha_swap, SWAP_SIZE - 10, 4096) == (NFS3_OK, bytes(10), True)


@pytest.mark.parametrize("offset", [SWAP_SIZE, SWAP_SIZE - 100, 2**64 - 4096])
def test_write_past_the_end_of_a_swap_file_is_nospc_and_it_does_not_grow(isolated, offset):
    world = isolated
    before = counted(world, "netswap_nfs_errors_total", status=str(NFS3ERR_NOSPC))
    assert world.alpha.write(world.alpha_swap, offset, b"\xaa" * 4096) == (NFS3ERR_NOSPC, None)
    assert world.alpha.getattr(world.alpha_swap) == (NFS3_OK, SWAP_SIZE)
    assert (world.daemon.state_dir / "nfs-swap" / "alpha").stat().st_size == SWAP_SIZE
    assert counted(world, "netswap_nfs_errors_total", status=str(NFS3ERR_NOSPC)) == before + 1


@pytest.mark.parametrize("attributes", [
    pytest.param(sattr3(size=SWAP_SIZE * 2), id="grow"),
    pytest.param(sattr3(size=0), id="truncate"),
    pytest.param(sattr3(mode=0o666), id="mode"),
    # The size it has is allowed alone (nfs-cp truncates to it); with a mode it was answered
    # OK while the mode was silently not applied.
    pytest.param(sattr3(mode=0o666, size=SWAP_SIZE), id="same size and a mode"),
])
def test_setattr_cannot_change_a_swap_files_size_or_mode(isolated, attributes):
    world = isolated
    swap_file = world.daemon.state_dir / "nfs-swap" / "alpha"
    before = swap_file.stat()
    u = world.alpha.proc(SETATTR, xdr(("o", world.alpha_swap)) + attributes + xdr(("b", False)))
    assert u.uint() == NFS3ERR_ACCES
    skip_wcc(u)
    u.done()
    after = swap_file.stat()
    assert (after.st_size, after.st_mode) == (before.st_size, before.st_mode)


@pytest.mark.parametrize("offset", [2**63 - 4096, 2**63, 2**64 - 4096])
def test_write_past_the_largest_file_size_is_fbig(isolated, offset):
    # Past 2**63 - 1 (FSINFO's maxfilesize) pwrite cannot take the offset: this was an
    # OverflowError, a traceback and no reply at all (a hard mount hangs on it).
    world = isolated
    before = counted(world, "netswap_nfs_errors_total", status=str(NFS3ERR_FBIG))
    assert world.alpha.write(world.scratch_file, offset, b"\xaa" * 4096) == (NFS3ERR_FBIG, None)
    assert world.alpha.getattr(world.scratch_file) == (NFS3_OK, 0)
    assert counted(world, "netswap_nfs_errors_total", status=str(NFS3ERR_FBIG)) == before + 1


@pytest.mark.parametrize("size", [2**63, 2**64 - 1])
def test_setattr_size_past_the_largest_file_size_is_fbig(isolated, size):
    world = isolated
    u = world.alpha.proc(SETATTR, xdr(("o", world.scratch_file)) + sattr3(size=size)
                         + xdr(("b", False)))
    assert u.uint() == NFS3ERR_FBIG
    skip_wcc(u)
    u.done()
    assert world.alpha.getattr(world.scratch_file) == (NFS3_OK, 0)


def test_create_in_swap_is_refused(isolated):
    world = isolated
    swap = world.alpha.root("/swap")
    u = world.alpha.proc(CREATE, xdr(("o", swap), ("o", b"extra"), ("u", 0)) + sattr3())
    assert u.uint() == NFS3ERR_ACCES
    skip_wcc(u)
    u.done()
    assert not (world.daemon.state_dir / "nfs-swap" / "extra").exists()


@pytest.mark.parametrize("proc, args, wcc_count", [
    pytest.param(REMOVE, lambda w: xdr(("o", w.alpha.root("/swap")), ("o", b"alpha")), 1,
                 id="remove"),
    pytest.param(RENAME, lambda w: xdr(("o", w.alpha.root("/swap")), ("o", b"alpha"),
                                       ("o", w.alpha.root("/swap")), ("o", b"gamma")), 2,
                 id="rename"),
])
def test_remove_and_rename_are_not_supported_with_a_well_formed_reply(isolated, proc, args,
                                                                      wcc_count):
    world = isolated
    u = world.alpha.proc(proc, args(world))
    assert u.uint() == NFS3ERR_NOTSUPP
    for _ in range(wcc_count):
        skip_wcc(u)
    u.done()
    assert (world.daemon.state_dir / "nfs-swap" / "alpha").exists()


def test_a_swap_file_write_is_committed_as_asked_and_file_sync_is_synced(tmp_path):
    daemon = start_nfs_daemon(tmp_path)
    try:
        client = Nfs(daemon, ALPHA)
        try:
            swap = client.swap_handle("alpha")
            committed = {}
            for stable in (UNSTABLE, FILE_SYNC):
                u = client.proc(WRITE, xdr(("o", swap), ("h", 0), ("u", 4096), ("u", stable),
                                           ("o", bytes(4096))))
                assert u.uint() == NFS3_OK
                skip_wcc(u)
                assert u.uint() == 4096
                committed[stable] = u.uint()
            assert committed == {UNSTABLE: UNSTABLE, FILE_SYNC: FILE_SYNC}
            assert client.commit(swap)[0] == NFS3_OK
        finally:
            client.close()
    finally:
        stop_clean(daemon)


def test_a_nodes_address_from_an_unprivileged_port_is_no_node(tmp_path):
    # node_ports = "privileged" (the default): any user on a node can bind a port above
    # 1023; only root (the kernel client, libnfs as root) one below.
    daemon = start_nfs_daemon(tmp_path, 'node_ports = "privileged"')
    try:
        trusted = Nfs(daemon, ALPHA, privileged=True)
        untrusted = Nfs(daemon, ALPHA)
        try:
            swap = trusted.swap_handle("alpha")
            assert trusted.read(swap, 0, 4096)[0] == NFS3_OK
            assert untrusted.mnt("/swap")[0] == MNT3ERR_ACCES  # no node: no swap export
            u = untrusted.proc(GETATTR, xdr(("o", swap)))  # alpha's own handle, but
            assert u.uint() == NFS3ERR_ACCES                # not from alpha's root
            assert untrusted.read(swap, 0, 4096)[0] == NFS3ERR_ACCES
            assert untrusted.write(swap, 0, bytes(4096))[0] == NFS3ERR_ACCES
            assert untrusted.root("/scratch")  # the other exports stay open to it
            assert metric(daemon, "netswap_access_denied_total",
                          export_reason="nfs:unprivileged_port") == 1  # its NFS connection
        finally:
            trusted.close()
            untrusted.close()
    finally:
        stop_clean(daemon)


# --------------------------------------------------------------------------- restarts


def test_commit_verifier_changes_on_restart_and_swap_handles_stay_valid(tmp_path):
    daemon = start_nfs_daemon(tmp_path)
    data = os.urandom(8192)
    try:
        client = Nfs(daemon, ALPHA)
        try:
            scratch = client.root("/scratch")
            u = client.proc(CREATE, xdr(("o", scratch), ("o", b"u.bin"), ("u", 0)) + sattr3())
            assert u.uint() == NFS3_OK and u.bool()
            scratch_file = bytes(u.opaque(64))
            status, write_verifier = client.write(scratch_file, 0, data, UNSTABLE)
            assert status == NFS3_OK
            status, commit_verifier = client.commit(scratch_file)
            assert (status, commit_verifier) == (NFS3_OK, write_verifier)
            swap = client.swap_handle("alpha")
            assert client.write(swap, 4096, data)[0] == NFS3_OK
        finally:
            client.close()
    finally:
        stop_clean(daemon)

    daemon = start_nfs_daemon(tmp_path)  # the same state directory, new ports
    try:
        client = Nfs(daemon, ALPHA)
        try:
            status, verifier = client.commit(scratch_file)
            assert status == NFS3_OK and verifier != write_verifier
            assert client.read(swap, 4096, len(data)) == (NFS3_OK, data, False)
            assert client.read(scratch_file, 0, len(data)) == (NFS3_OK, data, True)
        finally:
            client.close()
    finally:
        stop_clean(daemon)


def test_bad_calls_in_a_loop_do_not_flood_the_log(nfs_scratch):
    """A client repeating a malformed call gets every answer and counts every one, but the
    log at the default level (info) takes a bounded number of lines for it, as the NBD side
    does for refused requests."""
    daemon, client, scratch = nfs_scratch
    before = daemon.log().count("arguments malformed")
    for _ in range(200):
        reply = client.nfs.call(NFS_PROG, NFS_VERS, GETATTR, b"\0\0")  # truncated handle
        assert reply.accepted and reply.stat == RC.GARBAGE_ARGS
    for _ in range(200):
        # An unknown credential flavor: refused in the RPC header (AUTH_ERROR).
        xid = client.nfs.next_xid()
        record = xdr(("u", xid), ("u", 0), ("u", 2), ("u", NFS_PROG), ("u", NFS_VERS),
                      ("u", 0), ("u", 390003), ("o", b""), ("u", 0), ("o", b""))
        reply = client.nfs.raw_call(record, xid)
        assert not reply.accepted
    lines = daemon.log().splitlines()
    info_malformed = [line for line in lines
                      if " INFO " in line and "arguments malformed" in line]
    info_refused = [line for line in lines if " INFO " in line and "call refused" in line]
    assert daemon.log().count("arguments malformed") - before >= 1
    assert len(info_malformed) < 20, len(info_malformed)
    assert len(info_refused) < 20, len(info_refused)
