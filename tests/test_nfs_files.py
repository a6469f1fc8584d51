"""NFS file handles and per-node swap files (issue 7): real files under tmp_path, no server."""

from __future__ import annotations

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

SAMPLE = FileHandle(export_id=7, fileid=0x0123456789ABCDEF, generation=0xDEADBEEF)


# -- handle key --------------------------------------------------------------------------------


def test_key_created_0600_and_stable_across_reloads(tmp_path):
    old_umask = os.umask(0)  # a permissive umask must not leak into the key's mode
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
