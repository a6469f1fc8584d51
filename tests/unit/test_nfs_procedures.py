"""NFSv3 procedures without a daemon or a socket: arguments decoded by the codec (or built
by hand), the procedure run against a scratch export in a temp dir, its encoded result read
back with the XDR unpacker."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import pytest

from netswap.nfs import codec
from netswap.nfs.exports import (
    NFS3_OK, NFS3ERR_ACCES, NFS3ERR_BADHANDLE, NFS3ERR_EXIST, NFS3ERR_IO, NFS3ERR_ISDIR,
    NFS3ERR_JUKEBOX, NFS3ERR_NOENT, NFS3ERR_STALE, SCRATCH_EXPORT, NfsError, NfsExports,
)
from netswap.nfs.nfs3 import Nfs3Program
from netswap.reserve.pool import Pool
from netswap.rpc import xdr
from support.wait import wait_until

PEER = "192.0.2.7"
MAX_IO = 65536


class _Buffer:
    def __init__(self, size: int) -> None:
        self.view = memoryview(bytearray(size))


class _Pool:
    """The pool's alloc, as READ uses it: a buffer with a view."""

    def alloc(self, size, timeout=None, emergency=False, group=None):
        return _Buffer(size)


class _Counters:
    def __init__(self) -> None:
        self.counted = {}

    def inc(self, name, label="", amount=1):
        self.counted[name, label] = self.counted.get((name, label), 0) + amount


@pytest.fixture
def served(tmp_path):
    """(program, exports, root handle) of a scratch export at tmp_path/scratch."""
    nfs = SimpleNamespace(swap_export="", scratch_export="/scratch",
                          scratch_directory=tmp_path / "scratch",
                          node_port_allowed=lambda port: True)
    swap = SimpleNamespace(node_of=lambda address: None)
    exports = NfsExports(SimpleNamespace(nfs=nfs, swap=swap), tmp_path)
    program = Nfs3Program(exports, _Pool(), _Counters(), MAX_IO)
    yield program, exports, exports.root_handle("/scratch")
    exports.close()


def run(program, proc, args):
    release = []
    parts = program.execute(proc, args, PEER, release)
    return xdr.Unpacker(b"".join(bytes(part) for part in parts))


def create(program, root, name: bytes, how=codec.UNCHECKED) -> bytes:
    reply = run(program, codec.CREATE, codec.CreateArgs(root, name, how, codec.Sattr3(), None))
    assert reply.uint() == NFS3_OK
    assert reply.bool()
    return bytes(reply.opaque(64))


def test_create_makes_a_plain_file_and_hands_back_its_handle(served, tmp_path):
    program, exports, root = served
    handle = create(program, root, b"notes")
    path = tmp_path / "scratch" / "notes"
    assert path.is_file() and (path.stat().st_mode & 0o777) == 0o644
    assert exports.resolve(handle, PEER).path == path


def test_guarded_create_of_an_existing_file_is_exist(served):
    program, _, root = served
    create(program, root, b"once")
    with pytest.raises(NfsError) as failed:
        create(program, root, b"once", how=codec.GUARDED)
    assert failed.value.status == NFS3ERR_EXIST


def test_write_then_read_gives_the_bytes_back(served):
    program, _, root = served
    handle = create(program, root, b"data")
    payload = b"swap page " * 100
    write = codec.decode_arguments(
        codec.WRITE, _write_args(handle, 4096, payload, codec.FILE_SYNC), MAX_IO)
    reply = run(program, codec.WRITE, write)
    assert reply.uint() == NFS3_OK
    assert (reply.bool(), reply.bool()) == (False, True)  # no pre-op, post-op attributes
    attributes = reply.fixed_opaque(84)
    assert int.from_bytes(attributes[20:28], "big") == 4096 + len(payload)  # size
    assert (reply.uint(), reply.uint()) == (len(payload), codec.FILE_SYNC)
    assert bytes(reply.fixed_opaque(8)) == program.verifier

    reply = run(program, codec.READ, codec.ReadArgs(handle, 4096, 100_000))
    assert (reply.uint(), reply.bool()) == (NFS3_OK, True)
    reply.fixed_opaque(84)
    count, eof = reply.uint(), reply.bool()
    assert (count, eof) == (len(payload), True)
    assert bytes(reply.opaque(MAX_IO)) == payload


def test_read_of_a_hole_before_the_end_is_zeros_and_not_eof(served):
    program, _, root = served
    handle = create(program, root, b"sparse")
    run(program, codec.WRITE, codec.WriteArgs(handle, 8192, 1, codec.UNSTABLE,
                                             memoryview(b"x")))
    reply = run(program, codec.READ, codec.ReadArgs(handle, 0, 10))
    assert (reply.uint(), reply.bool()) == (NFS3_OK, True)
    reply.fixed_opaque(84)
    assert (reply.uint(), reply.bool()) == (10, False)
    assert bytes(reply.opaque(MAX_IO)) == bytes(10)


def test_lookup_of_a_missing_name_is_noent_with_the_directory_attributes(served):
    program, _, root = served
    reply = run(program, codec.LOOKUP, codec.LookupArgs(root, b"absent"))
    assert reply.uint() == NFS3ERR_NOENT
    assert reply.bool()  # the directory's post_op_attr


def test_readdir_lists_what_was_created(served):
    program, _, root = served
    for name in (b"a", b"b", b"c"):
        create(program, root, name)
    reply = run(program, codec.READDIR,
                codec.ReaddirArgs(root, 0, bytes(8), 4096, 4096, plus=False))
    assert reply.uint() == NFS3_OK
    if reply.bool():
        reply.fixed_opaque(84)
    reply.fixed_opaque(8)  # cookie verifier
    names = []
    while reply.bool():
        reply.uhyper()
        names.append(bytes(reply.string()))
        reply.uhyper()
    assert reply.bool()  # eof
    assert sorted(names) == [b"a", b"b", b"c"]


def test_a_directory_cannot_be_truncated(served):
    program, _, root = served
    with pytest.raises(NfsError) as failed:
        run(program, codec.SETATTR, codec.SetattrArgs(root, codec.Sattr3(size=0), None))
    assert failed.value.status == NFS3ERR_ISDIR


def test_a_forged_handle_is_badhandle(served):
    program, _, _ = served
    with pytest.raises(NfsError) as failed:
        run(program, codec.GETATTR, codec.HandleArgs(bytes(32)))
    assert failed.value.status == NFS3ERR_BADHANDLE


def test_getattr_reports_the_file(served, tmp_path):
    program, _, root = served
    handle = create(program, root, b"seen")
    reply = run(program, codec.GETATTR, codec.HandleArgs(handle))
    assert reply.uint() == NFS3_OK
    attributes = reply.fixed_opaque(84)
    assert int.from_bytes(attributes[0:4], "big") == codec.NF3REG
    fsid = int.from_bytes(attributes[44:52], "big")
    fileid = int.from_bytes(attributes[52:60], "big")
    assert (fsid, fileid) == (SCRATCH_EXPORT, os.stat(tmp_path / "scratch" / "seen").st_ino)


# The codec alone ----------------------------------------------------------------------

def _write_args(handle: bytes, offset: int, data: bytes, stable: int, count=None) -> bytes:
    packer = xdr.Packer()
    packer.opaque(handle)
    packer.uhyper(offset)
    packer.uint(len(data) if count is None else count)
    packer.uint(stable)
    packer.opaque(data)
    return packer.bytes()


def test_a_read_waiting_for_pool_memory_gives_up_when_told_to_stop(tmp_path):
    """A READ whose data buffer the pool cannot give waits, and stops waiting once its
    `stopped` says so (the connection closed, the daemon stops): JUKEBOX, not a worker
    parked until memory comes back, which at a stop it may never."""
    pool = Pool(256 * 1024, lock="off")
    held = pool.alloc(pool.size)  # someone else has all of it
    nfs = SimpleNamespace(swap_export="", scratch_export="/scratch",
                          scratch_directory=tmp_path / "scratch",
                          node_port_allowed=lambda port: True)
    exports = NfsExports(SimpleNamespace(nfs=nfs, swap=SimpleNamespace(node_of=lambda a: None)),
                         tmp_path)
    program = Nfs3Program(exports, pool, _Counters(), MAX_IO)
    handle = create(program, exports.root_handle("/scratch"), b"data")
    (tmp_path / "scratch" / "data").write_bytes(bytes(MAX_IO))
    stop = threading.Event()
    outcome = []

    def read() -> None:
        try:
            program.execute(codec.READ, codec.ReadArgs(handle, 0, MAX_IO), PEER, [],
                            stopped=stop.is_set)
            outcome.append(NFS3_OK)
        except NfsError as exc:
            outcome.append(exc.status)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: pool.stats()["waits"] >= 1, what="the READ waiting for memory")
        stop.set()
        reader.join(10)
        assert not reader.is_alive(), "the READ still waits after the stop"
        assert outcome == [NFS3ERR_JUKEBOX]
    finally:
        held.release()  # a READ still parked (the bug) gets its memory and ends
        reader.join(10)
        exports.close()


def test_codec_refuses_a_write_whose_count_is_not_its_data_length():
    with pytest.raises(xdr.XdrError):
        codec.decode_arguments(codec.WRITE, _write_args(b"h" * 16, 0, b"abcd", 2, count=5), MAX_IO)


def test_codec_refuses_trailing_bytes_and_truncation():
    packer = xdr.Packer()
    packer.opaque(b"h" * 16)
    whole = packer.bytes()
    assert codec.decode_arguments(codec.GETATTR, whole, MAX_IO).handle == b"h" * 16
    for data in (whole + bytes(4), whole[:-1]):
        with pytest.raises(xdr.XdrError):
            codec.decode_arguments(codec.GETATTR, data, MAX_IO)


def test_codec_refuses_set_user_id_in_a_sattr3():
    packer = xdr.Packer()
    packer.opaque(b"h" * 16)
    packer.bool(True)
    packer.uint(0o4755)
    for _ in range(3):
        packer.bool(False)
    packer.uint(codec.DONT_CHANGE)
    packer.uint(codec.DONT_CHANGE)
    packer.bool(False)  # no guard
    with pytest.raises(NfsError) as failed:
        codec.decode_arguments(codec.SETATTR, packer.bytes(), MAX_IO)
    assert failed.value.status == NFS3ERR_ACCES


def test_failure_bodies_have_the_shape_of_their_result_type():
    assert codec.failure(codec.WRITE, NFS3ERR_ISDIR) == bytes.fromhex("00000015") + bytes(8)
    assert codec.not_served(14) == bytes.fromhex("00002714") + bytes(16)  # RENAME: 2 wcc_data


# A swap file: READ, WRITE and COMMIT through the swap store's Backend -------------------

SWAP_SIZE = 1 << 20


@pytest.fixture
def swap_served(tmp_path):
    """(program, swap file path, the node's swap file handle) of a swap export whose one
    node is PEER."""
    nfs = SimpleNamespace(swap_export="/swap", swap_directory=tmp_path / "swap",
                          swap_size=SWAP_SIZE, scratch_export="",
                          node_port_allowed=lambda port: True)
    swap = SimpleNamespace(node_of=lambda address: "alpha")
    exports = NfsExports(SimpleNamespace(nfs=nfs, swap=swap), tmp_path)
    program = Nfs3Program(exports, _Pool(), _Counters(), MAX_IO)
    reply = run(program, codec.LOOKUP, codec.LookupArgs(exports.root_handle("/swap"), b"alpha"))
    assert reply.uint() == NFS3_OK
    yield program, tmp_path / "swap" / "alpha", bytes(reply.opaque(64))
    exports.close()


def test_a_swap_file_reads_back_what_was_written(swap_served):
    program, _, handle = swap_served
    page = bytes(range(256)) * 16
    run(program, codec.WRITE, codec.WriteArgs(handle, 8192, len(page), codec.FILE_SYNC,
                                             memoryview(page)))
    reply = run(program, codec.READ, codec.ReadArgs(handle, 8192, len(page)))
    assert (reply.uint(), reply.bool()) == (NFS3_OK, True)
    reply.fixed_opaque(84)
    assert (reply.uint(), reply.bool()) == (len(page), False)
    assert bytes(reply.opaque(MAX_IO)) == page


def test_a_write_resolved_before_a_wipe_is_not_made_after_it(swap_served, monkeypatch):
    """An operator's wipe (a scrub) that runs between a WRITE's resolve of its handle and its
    write (the call may even wait for the wipe, attaching its node): the write is not made,
    the call gets NFS3ERR_STALE, and the file stays zeroed."""
    program, path, handle = swap_served
    exports = program.exports
    resolve = exports.resolve

    def resolve_then_wiped(data, peer):
        node = resolve(data, peer)
        exports.swap.scrub("alpha")
        return node

    monkeypatch.setattr(exports, "resolve", resolve_then_wiped)
    page = b"w" * 4096
    with pytest.raises(NfsError) as failed:
        run(program, codec.WRITE, codec.WriteArgs(handle, 0, len(page), codec.FILE_SYNC,
                                                 memoryview(page)))
    assert failed.value.status == NFS3ERR_STALE
    assert path.read_bytes() == bytes(SWAP_SIZE)


def test_a_replaced_swap_file_fails_writes_for_good_and_keeps_reads(swap_served):
    program, path, handle = swap_served
    page = b"p" * 4096
    write = codec.WriteArgs(handle, 0, len(page), codec.FILE_SYNC, memoryview(page))
    run(program, codec.WRITE, write)
    # Replaced under the daemon: what is written now would not be what the next start
    # serves, so the Backend's identity check latches the failure.
    path.rename(path.with_name("moved"))
    path.write_bytes(bytes(SWAP_SIZE))
    for _ in range(2):  # and stays failed
        with pytest.raises(NfsError) as failed:
            run(program, codec.WRITE, write)
        assert failed.value.status == NFS3ERR_IO
    with pytest.raises(NfsError) as failed:
        run(program, codec.COMMIT, codec.CommitArgs(handle, 0, 0))
    assert failed.value.status == NFS3ERR_IO
    reply = run(program, codec.READ, codec.ReadArgs(handle, 0, len(page)))
    assert (reply.uint(), reply.bool()) == (NFS3_OK, True)
    reply.fixed_opaque(84)
    assert (reply.uint(), reply.bool()) == (len(page), False)
    assert bytes(reply.opaque(MAX_IO)) == page  # still reachable through our descriptor
