"""NFS file handles and per-node swap files (issue 7): real files under tmp_path, no server."""

from __future__ import annotations

import errno
import os
import stat
import threading

import pytest

from netswap.nfs import handles
from netswap.nfs.handles import (
    HANDLE_SIZE,
    KEY_FILE_NAME,
    BadHandle,
    FileHandle,
    HandleKey,
    HandleKeyError,
    decode,
    encode,
)
from netswap.nfs import swapfiles
from netswap.nfs.swapfiles import SwapFileError, SwapFiles
from netswap.swap.nodes import SWAP_PREFIX, swap_node_from_name, valid_node
from support.wait import wait_until

SAMPLE = FileHandle(export_id=7, fileid=0x0123456789ABCDEF, generation=0xDEADBEEF)


# -- handle key --------------------------------------------------------------------------------


def test_key_created_0600_and_stable_across_reloads(tmp_path):
    old_umask = os.umask(0o700)  # a umask that strips the owner's bits must not matter
    try:
        key = HandleKey.load_or_create(tmp_path)
    finally:
        os.umask(old_umask)
    path = tmp_path / KEY_FILE_NAME
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == handles.KEY_SIZE
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE_NAME]  # no temporary left
    secret = path.read_bytes()
    encoded = encode(key, SAMPLE)

    reloaded = HandleKey.load_or_create(tmp_path)
    assert path.read_bytes() == secret  # loaded, not regenerated
    assert decode(reloaded, encoded) == SAMPLE
    assert encode(reloaded, SAMPLE) == encoded


def test_two_fresh_keys_differ(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = HandleKey.load_or_create(tmp_path / "a")
    b = HandleKey.load_or_create(tmp_path / "b")
    secrets = [(tmp_path / d / KEY_FILE_NAME).read_bytes() for d in "ab"]
    assert secrets[0] != secrets[1]
    with pytest.raises(BadHandle):
        decode(b, encode(a, SAMPLE))


def test_concurrent_first_starts_agree_on_one_key(tmp_path):
    keys: list[HandleKey] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        keys.append(HandleKey.load_or_create(tmp_path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8
    encoded = {encode(k, SAMPLE) for k in keys}
    assert len(encoded) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE_NAME]


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_of_wrong_size_refused(tmp_path, size):
    path = tmp_path / KEY_FILE_NAME
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(HandleKeyError, match=f"{size} bytes, expected 32"):
        HandleKey.load_or_create(tmp_path)
    assert path.read_bytes() == b"k" * size  # never silently replaced


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_key_readable_by_others_refused(tmp_path, mode):
    HandleKey.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE_NAME
    before = path.read_bytes()
    path.chmod(mode)
    with pytest.raises(HandleKeyError, match=f"mode {mode:04o}"):
        HandleKey.load_or_create(tmp_path)
    assert path.read_bytes() == before


def test_key_owned_by_someone_else_refused(tmp_path):
    HandleKey.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE_NAME
    if os.geteuid() != 0:
        pytest.skip("needs root to chown the key to another user")
    os.chown(path, 65534, 65534)
    with pytest.raises(HandleKeyError, match="owned by uid 65534"):
        HandleKey.load_or_create(tmp_path)


def test_key_symlink_refused(tmp_path):
    real = tmp_path / "elsewhere"
    real.write_bytes(b"k" * 32)
    real.chmod(0o600)
    (tmp_path / KEY_FILE_NAME).symlink_to(real)
    with pytest.raises(OSError):
        HandleKey.load_or_create(tmp_path)


def test_key_repr_hides_secret(tmp_path):
    key = HandleKey.load_or_create(tmp_path)
    secret = (tmp_path / KEY_FILE_NAME).read_bytes()
    assert secret.hex() not in repr(key) and repr(secret) not in repr(key)


# -- handles -----------------------------------------------------------------------------------


@pytest.fixture
def key(tmp_path):
    return HandleKey.load_or_create(tmp_path)


def test_handle_round_trip_fixed_length(key):
    for handle in (
        SAMPLE,
        FileHandle(0, 0, 0),
        FileHandle(0xFFFF, (1 << 64) - 1, (1 << 32) - 1),
    ):
        data = encode(key, handle)
        assert len(data) == HANDLE_SIZE <= 64
        assert data[0] == handles.HANDLE_VERSION
        assert decode(key, data) == handle
        assert decode(key, memoryview(bytearray(data))) == handle


def test_every_flipped_bit_is_refused(key):
    data = encode(key, SAMPLE)
    for bit in range(len(data) * 8):
        forged = bytearray(data)
        forged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(BadHandle):
            decode(key, bytes(forged))


def test_handle_of_another_key_refused(key, tmp_path):
    (tmp_path / "other").mkdir()
    other = HandleKey.load_or_create(tmp_path / "other")
    with pytest.raises(BadHandle, match="MAC"):
        decode(key, encode(other, SAMPLE))


def test_truncated_and_extended_handles_refused(key):
    data = encode(key, SAMPLE)
    for n in range(len(data)):
        with pytest.raises(BadHandle):
            decode(key, data[:n])
    for tail in (b"\0", b"\0" * 33, data):
        with pytest.raises(BadHandle):
            decode(key, data + tail)


def test_other_version_refused_even_with_a_valid_mac(key):
    body = handles._BODY.pack(2, SAMPLE.export_id, SAMPLE.fileid, SAMPLE.generation)
    with pytest.raises(BadHandle, match="version 2"):
        decode(key, body + key.mac(body))


@pytest.mark.parametrize(
    "fields",
    [
        (-1, 1, 1),
        (1 << 16, 1, 1),
        (1, -1, 1),
        (1, 1 << 64, 1),
        (1, 1, -1),
        (1, 1, 1 << 32),
        (True, 1, 1),
        (1.0, 1, 1),
    ],
)
def test_handle_fields_out_of_range_refused(fields):
    with pytest.raises(ValueError):
        FileHandle(*fields)


def test_root_directory_handle(key, tmp_path):
    root = FileHandle.for_directory(3, tmp_path)
    assert root == FileHandle(3, os.stat(tmp_path).st_ino, 0)
    assert decode(key, encode(key, root)) == root


# -- swap files --------------------------------------------------------------------------------

SIZE = 4 << 20


def make_files(tmp_path, size=SIZE):
    return SwapFiles(tmp_path / "swap", size, tmp_path / "nfs-swap.json")


def test_swap_directory_created_0700(tmp_path):
    old_umask = os.umask(0)
    try:
        make_files(tmp_path).close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(tmp_path / "swap").st_mode) == 0o700


def test_swap_file_created_fully_allocated_0600_root_owned(tmp_path):
    old_umask = os.umask(0o700)  # a umask that would strip the owner's bits
    try:
        with make_files(tmp_path) as files:
            swap_file = files.open("node01")
    finally:
        os.umask(old_umask)
    path = tmp_path / "swap" / "node01"
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == SIZE
    assert st.st_blocks * 512 >= SIZE  # what swapon and fattr3.used need: no holes
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (0, 0)
    assert swap_file.node == "node01"
    assert swap_file.path == path
    assert swap_file.size == SIZE
    assert swap_file.fileid == st.st_ino
    assert 0 < swap_file.generation < 1 << 32
    # a 0700 directory holds only the node's file; no temporary left behind
    assert sorted(p.name for p in (tmp_path / "swap").iterdir()) == ["node01"]


def test_swap_file_fd_reads_and_writes_and_stat(tmp_path):
    with make_files(tmp_path) as files:
        swap_file = files.open("node01")
        assert os.pwrite(swap_file.fd, b"SWAPSPACE2", 4086) == 10
        assert os.pread(swap_file.fd, 10, 4086) == b"SWAPSPACE2"
        st = swap_file.stat()
        assert st.st_size == SIZE and st.st_blocks * 512 >= SIZE
        assert os.get_inheritable(swap_file.fd) is False
    assert (tmp_path / "swap" / "node01").read_bytes()[4086:4096] == b"SWAPSPACE2"


def test_open_twice_gives_the_same_file(tmp_path):
    with make_files(tmp_path) as files:
        assert files.open("node01") is files.open("node01")


def test_reopened_after_restart_with_same_fileid_generation_and_data(tmp_path):
    with make_files(tmp_path) as files:
        first = files.open("node01")
        fileid, generation = first.fileid, first.generation
        os.pwrite(first.fd, b"keep me", 0)
        key = HandleKey.load_or_create(tmp_path)
        handle = encode(key, FileHandle(1, first.fileid, first.generation))
    with make_files(tmp_path) as files:
        # after a restart the node presents its old handle before any LOOKUP
        decoded = decode(HandleKey.load_or_create(tmp_path), handle)
        again = files.by_fileid(decoded.fileid)
        assert again is not None
        assert (again.node, again.fileid, again.generation) == ("node01", fileid, generation)
        assert decoded.generation == again.generation
        assert os.pread(again.fd, 7, 0) == b"keep me"
        assert files.open("node01") is again


def test_generations_differ_between_nodes_and_incarnations(tmp_path):
    with make_files(tmp_path) as files:
        generations = {files.open(f"node{i}").generation for i in range(5)}
    assert len(generations) == 5
    (tmp_path / "swap" / "node0").unlink()
    with make_files(tmp_path) as files:
        recreated = files.open("node0")
    assert recreated.generation not in generations


def test_file_replaced_behind_our_back_gets_a_new_generation(tmp_path):
    with make_files(tmp_path) as files:
        old = files.open("node01")
        old_fileid, old_generation = old.fileid, old.generation
    path = tmp_path / "swap" / "node01"
    keep = tmp_path / "keep"  # hold the old inode so the new file cannot reuse its number
    os.rename(path, keep)
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, SIZE)
    os.chmod(path, 0o600)
    with make_files(tmp_path) as files:
        new = files.open("node01")
        assert new.fileid != old_fileid
        assert new.generation != old_generation
        assert files.by_fileid(old_fileid) is None


def test_wrong_size_existing_file_refused_untouched(tmp_path):
    make_files(tmp_path).close()
    path = tmp_path / "swap" / "node01"
    for size in (SIZE - 4096, SIZE + 4096, 0):
        path.write_bytes(b"x" * size)
        with make_files(tmp_path) as files:
            with pytest.raises(SwapFileError, match=f"{path}: is {size} bytes"):
                files.open("node01")
            with pytest.raises(SwapFileError):
                files.files_of("node01")
        assert path.stat().st_size == size  # never grown or shrunk


def test_symlink_planted_as_node_file_refused(tmp_path):
    target = tmp_path / "precious"
    target.write_bytes(b"p" * SIZE)
    make_files(tmp_path).close()
    (tmp_path / "swap" / "node01").symlink_to(target)
    with make_files(tmp_path) as files:
        with pytest.raises(SwapFileError, match="symbolic link"):
            files.open("node01")
    assert target.read_bytes() == b"p" * SIZE
    assert os.path.islink(tmp_path / "swap" / "node01")


def test_hard_link_and_fifo_planted_as_node_file_refused(tmp_path):
    target = tmp_path / "precious"
    target.write_bytes(b"p" * SIZE)
    make_files(tmp_path).close()
    os.link(target, tmp_path / "swap" / "node01")
    os.mkfifo(tmp_path / "swap" / "node02")
    with make_files(tmp_path) as files:
        with pytest.raises(SwapFileError, match="2 links"):
            files.open("node01")
        with pytest.raises(SwapFileError, match="not a regular file"):
            files.open("node02")  # and does not hang on the FIFO
    assert target.read_bytes() == b"p" * SIZE


def test_existing_sparse_file_gets_allocated(tmp_path):
    make_files(tmp_path).close()
    path = tmp_path / "swap" / "node01"
    with open(path, "wb") as f:
        f.write(b"header")
        f.truncate(SIZE)
    assert os.stat(path).st_blocks * 512 < SIZE
    with make_files(tmp_path) as files:
        swap_file = files.open("node01")
        assert swap_file.stat().st_blocks * 512 >= SIZE
        assert os.pread(swap_file.fd, 6, 0) == b"header"


@pytest.mark.parametrize(
    "node",
    [
        *("", "Node01", "-node", "node-", "a.b", "..", ".", "a/b", "x" * 64, "node\0", "node\n"),
        *(7, None),
    ],
)
def test_bad_node_names_refused(tmp_path, node):
    assert not valid_node(node)
    with make_files(tmp_path) as files:
        for call in (files.open, files.files_of, files.scrub):
            with pytest.raises(ValueError, match="invalid swap node name"):
                call(node)
    assert list((tmp_path / "swap").iterdir()) == []


def test_node_names_match_the_nbd_rule(tmp_path):
    for node in ("a", "node01", "rack-3-node-17", "x" * 63):
        assert valid_node(node)
        assert swap_node_from_name(SWAP_PREFIX + node) == node


def test_files_of_shows_only_the_nodes_own_file(tmp_path):
    with make_files(tmp_path) as files:
        a = files.open("node-a")
        b = files.open("node-b")
        assert files.files_of("node-a") == [a]
        assert files.files_of("node-b") == [b]
        # A node lists its file before it names it: the listing makes it, as LOOKUP would.
        [c] = files.files_of("node-c")
        assert c.node == "node-c" and c.size == files.open("node-c").size
        assert files.files_of("node-c") == [files.open("node-c")]
    assert sorted(p.name for p in (tmp_path / "swap").iterdir()) == ["node-a", "node-b", "node-c"]
    with make_files(tmp_path) as files:  # after a restart, from disk
        [a2] = files.files_of("node-a")
        assert (a2.node, a2.fileid) == ("node-a", a.fileid)


def test_by_fileid_names_the_owner(tmp_path):
    with make_files(tmp_path) as files:
        a = files.open("node-a")
        b = files.open("node-b")
        assert files.by_fileid(a.fileid).node == "node-a"
        assert files.by_fileid(b.fileid).node == "node-b"
        assert files.by_fileid(os.stat(tmp_path).st_ino) is None
    (tmp_path / "swap" / "node-b").unlink()
    with make_files(tmp_path) as files:
        assert files.by_fileid(b.fileid) is None  # gone: stale, and never re-created
    assert not (tmp_path / "swap" / "node-b").exists()


def test_scrub_zeroes_keeps_allocation_and_stales_old_handles(tmp_path):
    key = HandleKey.load_or_create(tmp_path)
    with make_files(tmp_path) as files:
        swap_file = files.open("node01")
        issued = encode(key, FileHandle(1, swap_file.fileid, swap_file.generation))
        old_handle = decode(key, issued)
        os.pwrite(swap_file.fd, b"\xa5" * 8192, 0)
        os.pwrite(swap_file.fd, b"\x5a" * 4096, SIZE - 4096)
        scrubbed = files.scrub("node01")
        assert scrubbed is swap_file
        assert scrubbed.fileid == old_handle.fileid
        assert scrubbed.generation != old_handle.generation
        st = scrubbed.stat()
        assert st.st_size == SIZE and st.st_blocks * 512 >= SIZE
        assert files.scrub("node02") is None
    assert (tmp_path / "swap" / "node01").read_bytes() == bytes(SIZE)
    with make_files(tmp_path) as files:  # the new generation survives a restart
        assert files.by_fileid(old_handle.fileid).generation == scrubbed.generation


def test_scrub_without_zero_range_writes_zeros(tmp_path, monkeypatch):
    def no_zero_range(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(swapfiles, "fallocate", no_zero_range)
    with make_files(tmp_path) as files:
        swap_file = files.open("node01")
        os.pwrite(swap_file.fd, b"\xa5" * 4096, 1 << 20)
        files.scrub("node01")
    assert (tmp_path / "swap" / "node01").read_bytes() == bytes(SIZE)


class _Loops:
    """The C loops' scrub state, as a scrub sees it: one loop is in a write until let go."""

    def __init__(self) -> None:
        self.voided = 0
        self.writing = 1

    def void_handles(self) -> None:
        self.voided += 1

    def writers(self) -> int:
        return self.writing


@pytest.mark.parametrize("writer", ["python", "c_loop"])
def test_scrub_zeroes_only_after_the_writes_already_going_end(tmp_path, writer):
    """A write that passed its handle check before the scrub began (Python's begin_write, a
    C loop's look at the epoch) lands before the zeroing, never after it; writes through
    the old handle are refused from the scrub's start."""
    with make_files(tmp_path) as files:
        swap_file = files.open("node01")
        generation = swap_file.generation
        loops = files.loops = _Loops() if writer == "c_loop" else None
        if writer == "python":
            assert swap_file.begin_write(generation)
        else:
            loops.writing = 1
        scrubber = threading.Thread(target=files.scrub, args=("node01",), daemon=True)
        scrubber.start()

        def held_off() -> bool:
            if swap_file.begin_write(generation):  # not yet: the scrub has not begun
                swap_file.end_write()
                return False
            return True

        wait_until(held_off, what="new writes held off")
        if writer == "c_loop":
            wait_until(lambda: loops.voided >= 1, what="the C loops' handles voided")
        # The write in progress lands now, while the scrub waits for it...
        os.pwrite(swap_file.fd, b"\xa5" * 4096, 0)
        assert scrubber.is_alive()
        if writer == "python":
            swap_file.end_write()
        else:
            loops.writing = 0
        scrubber.join(30)
        assert not scrubber.is_alive()
        # ...and the zeroing after it. The old handle's writes stay refused.
        assert not swap_file.begin_write(generation)
        assert swap_file.begin_write(swap_file.generation)
        swap_file.end_write()
    assert (tmp_path / "swap" / "node01").read_bytes() == bytes(SIZE)


def test_no_space_leaves_no_partial_file(tmp_path):
    with make_files(tmp_path, size=1 << 62) as files:
        with pytest.raises(OSError) as raised:
            files.open("node01")
        assert raised.value.errno in (errno.ENOSPC, errno.EFBIG)
    assert list((tmp_path / "swap").iterdir()) == []


def test_corrupt_state_file_refused(tmp_path):
    with make_files(tmp_path) as files:
        files.open("node01")
    state_path = tmp_path / "nfs-swap.json"
    for bad in (
        b"{",
        b"[]",
        b'{"format": 1}',
        b'{"format": 1, "next_generation": 0, "nodes": {}}',
        b'{"format": 2, "next_generation": 5, "nodes": {}}',
        b'{"format": 1, "next_generation": 5, "nodes": {"../x": {"fileid": 1, "generation": 1}}}',
        b'{"format": 1, "next_generation": 5, "nodes": {"a": {"fileid": -1, "generation": 1}}}',
        b'{"format": 1, "next_generation": 5, "nodes": {"a": {"fileid": "1", "generation": 1}}}',
        b'{"format": 1, "next_generation": 5, "nodes": {"a": {"fileid": 1, "generation": 0}}}',
    ):
        state_path.write_bytes(bad)
        with pytest.raises(SwapFileError, match="state"):
            make_files(tmp_path)


def test_concurrent_first_opens_create_one_file(tmp_path):
    with make_files(tmp_path) as files:
        got: list = []
        barrier = threading.Barrier(6)

        def body():
            barrier.wait()
            got.append(files.open("node01"))

        threads = [threading.Thread(target=body) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 6 and all(g is got[0] for g in got)


def test_closed_swap_files_refuse_use(tmp_path):
    files = make_files(tmp_path)
    swap_file = files.open("node01")
    files.close()
    files.close()
    with pytest.raises(OSError):
        os.fstat(swap_file.fd)
    with pytest.raises(SwapFileError, match="closed"):
        files.open("node02")
