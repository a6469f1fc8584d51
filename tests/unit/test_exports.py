"""Exports layer: storage backends and the export registry.

Everything runs against real files in tmp_path with real fallocate(2) on whatever file system
holds it (these tests need hole punching and zero-range, which ext4, xfs and btrfs have; the
fallback paths are exercised by switching off the learnt capabilities, not by skipping).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from netswap.exports import backends as backends_mod
from netswap.exports import (
    Export,
    ExportError,
    ExportRegistry,
    ExportSpec,
    FileBackend,
    MemoryBackend,
    SizeMismatchError,
    SwapTemplate,
)
from netswap.swap import store as store_mod
from support.threads import run_in_threads


MiB = 1 << 20
PAGE = mmap.PAGESIZE


def pattern(length: int, seed: int = 1) -> memoryview:
    """Deterministic non-zero bytes, as a writable view (like a pool buffer)."""
    block = bytes((seed * 31 + i * 7) % 251 + 1 for i in range(251))
    data = (block * (length // len(block) + 1))[:length]
    return memoryview(bytearray(data))


def read(backend, offset: int, length: int) -> bytes:
    buf = memoryview(bytearray(length))
    backend.read_into(offset, buf)
    return bytes(buf)


def blocks_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def file_backend(tmp_path):
    backend = FileBackend(tmp_path / "disk.img", 64 * MiB, read_only=False, create=True)
    yield backend
    backend.close()


@pytest.fixture(params=["file", "memory"])
def any_backend(request, tmp_path):
    if request.param == "file":
        backend = FileBackend(tmp_path / "disk.img", 64 * MiB, read_only=False, create=True)
    else:
        backend = MemoryBackend(64 * MiB)
    yield backend
    backend.close()


# -- behaviour common to every backend ------------------------------------------------------


def test_round_trip_through_memoryviews(any_backend):
    data = pattern(3 * 4096 + 123)
    any_backend.write_from(5 * MiB + 17, data, fua=False)
    assert read(any_backend, 5 * MiB + 17, len(data)) == bytes(data)
    # A view into the middle of a larger buffer, as a pool slot would be.
    pool = memoryview(bytearray(1 * MiB))
    slot = pool[4096 : 4096 + 8192]
    any_backend.read_into(5 * MiB + 17, slot)
    assert bytes(slot) == bytes(data[:8192])
    assert bytes(pool[:4096]) == bytes(4096)


def test_never_written_range_reads_zeros(any_backend):
    any_backend.write_from(0, pattern(4096), fua=False)
    assert read(any_backend, 32 * MiB, 2 * MiB + 5) == bytes(2 * MiB + 5)


def test_last_byte_and_out_of_range(any_backend):
    size = any_backend.size
    any_backend.write_from(size - 1, memoryview(bytearray(b"\x7f")), fua=False)
    assert read(any_backend, size - 1, 1) == b"\x7f"
    for call in (
        lambda: any_backend.read_into(size - 1, memoryview(bytearray(2))),
        lambda: any_backend.write_from(size, memoryview(bytearray(1)), fua=False),
        lambda: any_backend.trim(size - 4096, 8192, fua=False),
        lambda: any_backend.write_zeroes(-1, 10, may_trim=True, fua=False),
        lambda: any_backend.cache(0, size + 1),
    ):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EINVAL


def test_zero_length_requests_are_harmless(any_backend):
    """Accepted at either end of the export (no error), and no byte changes: a zero-length
    trim or write_zeroes at 0 or at the end must not round up to a block."""
    size = any_backend.size
    any_backend.write_from(0, pattern(MiB, seed=2), fua=False)
    any_backend.write_from(size - MiB, pattern(MiB, seed=3), fua=False)
    empty = memoryview(bytearray(0))
    any_backend.read_into(0, empty)
    any_backend.write_from(any_backend.size, empty, fua=True)
    any_backend.trim(0, 0, fua=True)
    any_backend.write_zeroes(any_backend.size, 0, may_trim=False, fua=True)
    any_backend.cache(0, 0)
    assert read(any_backend, 0, MiB) == bytes(pattern(MiB, seed=2))
    assert read(any_backend, size - MiB, MiB) == bytes(pattern(MiB, seed=3))


@pytest.mark.parametrize("may_trim", [True, False])
def test_write_zeroes_reads_back_zeros(any_backend, may_trim):
    any_backend.write_from(MiB - 100, pattern(3 * MiB), fua=False)
    # Unaligned on both ends: the neighbouring bytes must survive.
    any_backend.write_zeroes(MiB + 1, 2 * MiB - 2, may_trim=may_trim, fua=True)
    got = read(any_backend, MiB - 100, 3 * MiB)
    expected = bytearray(pattern(3 * MiB))
    expected[101 : 101 + 2 * MiB - 2] = bytes(2 * MiB - 2)
    assert got == bytes(expected)


def test_trim_reads_back_zeros_and_keeps_neighbours(any_backend):
    any_backend.write_from(0, pattern(4 * MiB), fua=False)
    any_backend.trim(3, 4 * MiB - 6, fua=True)
    got = read(any_backend, 0, 4 * MiB)
    assert got[:3] == bytes(pattern(4 * MiB)[:3])
    assert got[-3:] == bytes(pattern(4 * MiB)[-3:])
    assert got[3:-3] == bytes(4 * MiB - 6)


def test_flush_fua_and_cache_succeed(any_backend):
    any_backend.write_from(0, pattern(8192), fua=True)
    any_backend.write_zeroes(8192, 8192, may_trim=False, fua=True)
    any_backend.trim(16384, 8192, fua=True)
    any_backend.flush()
    any_backend.cache(0, any_backend.size)
    assert read(any_backend, 0, 8192) == bytes(pattern(8192))


def test_concurrent_writers_and_readers(any_backend):
    """16 threads, each owning a stripe of 64 KiB blocks, writing then verifying in parallel."""
    threads, blocks_per_thread, block = 16, 32, 64 * 1024

    def worker(t: int) -> None:
        buf = memoryview(bytearray(block))
        for i in range(blocks_per_thread):
            offset = (i * threads + t) * block  # interleaved stripes
            data = pattern(block, seed=t * 1000 + i)
            any_backend.write_from(offset, data, fua=(i % 8 == 0))
            any_backend.read_into(offset, buf)
            assert buf == data

    run_in_threads(threads, worker)
    for t in range(threads):
        for i in range(blocks_per_thread):
            offset = (i * threads + t) * block
            assert read(any_backend, offset, block) == bytes(pattern(block, seed=t * 1000 + i))


def test_close_is_idempotent_and_later_calls_fail_cleanly(tmp_path):
    backend = FileBackend(tmp_path / "x.img", MiB, read_only=False, create=True)
    backend.close()
    backend.close()
    with pytest.raises(OSError) as info:
        backend.read_into(0, memoryview(bytearray(1)))
    assert info.value.errno == errno.EBADF
    memory = MemoryBackend(MiB)
    memory.close()
    memory.close()


# -- FileBackend ----------------------------------------------------------------------------


def test_create_makes_sparse_0600_file_regardless_of_umask(tmp_path):
    path = tmp_path / "new.img"
    old = os.umask(0)
    try:
        backend = FileBackend(path, 1 << 30, read_only=False, create=True)
    finally:
        os.umask(old)
    with backend:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == 1 << 30
        assert st.st_blocks == 0
        assert backend.size == 1 << 30
        assert backend.allocated_bytes() == 0


def test_reopen_keeps_data_and_size_none_takes_file_size(tmp_path):
    path = tmp_path / "keep.img"
    with FileBackend(path, 8 * MiB, read_only=False, create=True) as backend:
        backend.write_from(MiB, pattern(4096), fua=True)
    with FileBackend(path, 8 * MiB, read_only=False, create=True) as backend:
        assert read(backend, MiB, 4096) == bytes(pattern(4096))
    with FileBackend(path, None, read_only=True) as backend:
        assert backend.size == 8 * MiB


def test_size_mismatch_is_an_error_and_leaves_the_file_alone(tmp_path):
    path = tmp_path / "old.img"
    with FileBackend(path, 8 * MiB, read_only=False, create=True) as backend:
        backend.write_from(0, pattern(4096), fua=True)
    for wrong in (4 * MiB, 16 * MiB):
        with pytest.raises(SizeMismatchError, match="8388608"):
            FileBackend(path, wrong, read_only=False, create=True)
    assert os.stat(path).st_size == 8 * MiB
    with FileBackend(path, 8 * MiB, read_only=True) as backend:
        assert read(backend, 0, 4096) == bytes(pattern(4096))


def test_missing_file_without_create_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        FileBackend(tmp_path / "absent.img", MiB, read_only=False)
    with pytest.raises(FileNotFoundError):
        FileBackend(tmp_path / "absent.img", MiB, read_only=True, create=True)


def test_symlink_refused_when_not_following(tmp_path):
    target = tmp_path / "elsewhere.img"
    with FileBackend(target, MiB, read_only=False, create=True):
        pass
    link = tmp_path / "link.img"
    link.symlink_to(target)
    with pytest.raises(OSError) as info:
        FileBackend(link, MiB, read_only=False, create=True, follow_symlinks=False)
    assert info.value.errno == errno.ELOOP


def test_read_only_refuses_writes_with_eperm(tmp_path):
    path = tmp_path / "ro.img"
    with FileBackend(path, MiB, read_only=False, create=True) as backend:
        backend.write_from(0, pattern(4096), fua=True)
    for backend in (FileBackend(path, MiB, read_only=True), MemoryBackend(MiB, read_only=True)):
        with backend:
            for call in (
                lambda: backend.write_from(0, pattern(512), fua=False),
                lambda: backend.trim(0, 4096, fua=False),
                lambda: backend.write_zeroes(0, 4096, may_trim=True, fua=False),
            ):
                with pytest.raises(OSError) as info:
                    call()
                assert info.value.errno == errno.EPERM
            backend.flush()
            backend.cache(0, 4096)
    with FileBackend(path, MiB, read_only=True) as backend:
        assert read(backend, 0, 4096) == bytes(pattern(4096))


def test_trim_punches_a_hole(file_backend):
    file_backend.write_from(0, pattern(8 * MiB), fua=True)
    before = blocks_bytes(file_backend.path)
    assert before >= 8 * MiB
    file_backend.trim(MiB, 4 * MiB, fua=True)
    after = blocks_bytes(file_backend.path)
    assert before - after >= 4 * MiB - 8192  # block-aligned interior at least
    assert file_backend.allocated_bytes() == after
    assert read(file_backend, MiB, 4 * MiB) == bytes(4 * MiB)


def test_write_zeroes_may_trim_releases_space(file_backend):
    file_backend.write_from(0, pattern(8 * MiB), fua=True)
    before = blocks_bytes(file_backend.path)
    file_backend.write_zeroes(0, 8 * MiB, may_trim=True, fua=True)
    assert blocks_bytes(file_backend.path) <= before - 8 * MiB
    assert read(file_backend, 0, 8 * MiB) == bytes(8 * MiB)


def test_write_zeroes_no_hole_keeps_space_allocated(file_backend):
    # NO_HOLE: the range must stay allocated so a later write cannot hit ENOSPC.
    file_backend.write_from(0, pattern(8 * MiB), fua=True)
    before = blocks_bytes(file_backend.path)
    file_backend.write_zeroes(0, 8 * MiB, may_trim=False, fua=True)
    assert blocks_bytes(file_backend.path) >= before
    assert read(file_backend, 0, 8 * MiB) == bytes(8 * MiB)
    # ...and it allocates a range that was a hole.
    file_backend.write_zeroes(32 * MiB, 4 * MiB, may_trim=False, fua=False)
    assert blocks_bytes(file_backend.path) >= before + 4 * MiB


@pytest.mark.parametrize(
    "disable, allocates",
    [
        (("_can_zero_range",), True),  # tmpfs-like: punch + fallocate(0)
        (("_can_zero_range", "_can_punch_hole"), True),  # no fallocate modes: write zeros
    ],
)
def test_write_zeroes_fallbacks(file_backend, disable, allocates):
    for flag in disable:
        setattr(file_backend, flag, False)
    file_backend.write_from(0, pattern(4 * MiB), fua=False)
    file_backend.write_zeroes(100, 3 * MiB, may_trim=False, fua=True)
    got = read(file_backend, 0, 4 * MiB)
    assert got[:100] == bytes(pattern(100))
    assert got[100 : 100 + 3 * MiB] == bytes(3 * MiB)
    assert got[100 + 3 * MiB :] == bytes(pattern(4 * MiB)[100 + 3 * MiB :])
    assert blocks_bytes(file_backend.path) >= 4 * MiB
    # Trim with punching disabled is a silent no-op (it is advisory).
    file_backend.trim(0, MiB, fua=True)


def test_eopnotsupp_is_learnt_once(file_backend, monkeypatch):
    calls: list[int] = []

    def no_fallocate_modes(fd, mode, offset, length):
        calls.append(mode)
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(backends_mod, "fallocate", no_fallocate_modes)
    file_backend.write_from(0, pattern(MiB), fua=False)
    file_backend.trim(0, 4096, fua=False)  # learns: no punch
    file_backend.write_zeroes(0, MiB, may_trim=True, fua=False)  # learns: no zero-range
    assert len(calls) == 2
    file_backend.trim(0, 4096, fua=False)
    file_backend.write_zeroes(0, MiB, may_trim=False, fua=False)
    assert len(calls) == 2  # no further fallocate attempts
    assert read(file_backend, 0, MiB) == bytes(MiB)


def test_trim_reports_eio_but_ignores_other_failures(file_backend, monkeypatch):
    def failing(err):
        def fallocate(fd, mode, offset, length):
            raise OSError(err, os.strerror(err))

        return fallocate

    monkeypatch.setattr(backends_mod, "fallocate", failing(errno.EINVAL))
    file_backend.trim(0, 4096, fua=False)
    monkeypatch.setattr(backends_mod, "fallocate", failing(errno.EIO))
    with pytest.raises(OSError) as info:
        file_backend.trim(0, 4096, fua=False)
    assert info.value.errno == errno.EIO
    with pytest.raises(OSError):
        file_backend.write_zeroes(0, 4096, may_trim=True, fua=False)


def test_short_reads_and_writes_are_completed(file_backend, monkeypatch):
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def short_preadv(fd, buffers, offset, *flags):
        (view,) = buffers
        return real_preadv(fd, [view[:1000]], offset, *flags)

    def short_pwritev(fd, buffers, offset, *flags):
        (view,) = buffers
        return real_pwritev(fd, [view[:1000]], offset, *flags)

    monkeypatch.setattr(os, "preadv", short_preadv)
    monkeypatch.setattr(os, "pwritev", short_pwritev)
    data = pattern(10_000)
    file_backend.write_from(12345, data, fua=True)
    assert read(file_backend, 12345, len(data)) == bytes(data)


def test_fua_without_rwf_dsync_falls_back_to_fdatasync(file_backend, monkeypatch):
    real_pwritev = os.pwritev
    synced: list[int] = []

    def no_flags_pwritev(fd, buffers, offset, flags=0):
        if flags:
            raise OSError(errno.EOPNOTSUPP, "no RWF_DSYNC")
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", no_flags_pwritev)
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    file_backend.write_from(0, pattern(4096), fua=True)
    file_backend.write_from(4096, pattern(4096), fua=True)
    assert len(synced) == 2
    assert file_backend._can_rwf_dsync is False
    assert read(file_backend, 0, 4096) == bytes(pattern(4096))


def test_truncated_behind_our_back_reads_zeros(file_backend):
    file_backend.write_from(0, pattern(8192), fua=False)
    os.truncate(file_backend.path, 4096)
    got = read(file_backend, 0, 16384)
    assert got[:4096] == bytes(pattern(4096))
    assert got[4096:] == bytes(12288)


# -- MemoryBackend --------------------------------------------------------------------------


def vma_rss_bytes(address: int) -> int:
    """Rss of the /proc/self/smaps mapping that contains ``address``."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found in smaps")


def test_memory_trim_returns_pages_to_the_kernel():
    size = 256 * MiB
    with MemoryBackend(size) as backend:
        address = backend._address
        assert backend.allocated_bytes() == 0
        chunk = pattern(4 * MiB)
        for offset in range(0, size, len(chunk)):
            backend.write_from(offset, chunk, fua=False)
        full_rss = vma_rss_bytes(address)
        assert full_rss >= size
        assert backend.allocated_bytes() == size

        # Unaligned range: the interior pages go back, the edge pages stay (and are zeroed).
        backend.trim(100, size - 200, fua=False)
        assert full_rss - vma_rss_bytes(address) >= size - 2 * PAGE
        assert backend.allocated_bytes() == 2 * PAGE  # the edge pages
        got = read(backend, 0, size)
        assert got[:100] == bytes(chunk[:100])
        assert got[-100:] == bytes(chunk[-100:])
        assert got[100:-100].count(0) == size - 200

        # Reading never-written or released pages maps the shared zero page: costs nothing,
        # counts nothing (the read above covered the whole map).
        assert backend.allocated_bytes() == 2 * PAGE

        # write_zeroes(may_trim) releases too (here including the first edge page, now
        # entirely inside the range); NO_HOLE keeps the pages.
        backend.write_from(0, chunk, fua=False)
        backend.write_zeroes(0, len(chunk), may_trim=True, fua=False)
        assert backend.allocated_bytes() == PAGE  # the last edge page
        backend.write_zeroes(0, len(chunk), may_trim=False, fua=False)
        assert backend.allocated_bytes() == len(chunk) + PAGE
        assert read(backend, 0, len(chunk)) == bytes(len(chunk))


def test_memory_mapping_is_private_and_kept_out_of_core_dumps():
    with MemoryBackend(4 * MiB) as backend:
        address = backend._address
        with open("/proc/self/smaps") as smaps:
            lines = smaps.read().splitlines()
        for i, line in enumerate(lines):
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                if start <= address < end:
                    perms = line.split()[1]
                    break
        else:
            raise AssertionError("mapping not found")
        assert perms.endswith("p")  # MAP_PRIVATE: MADV_DONTNEED really frees and zeros
        flags = next(row for row in lines[i:] if row.startswith("VmFlags:")).split()[1:]
        assert "dd" in flags  # MADV_DONTDUMP
        assert "dc" in flags  # MADV_DONTFORK


# -- registry -------------------------------------------------------------------------------


def swap_template(directory="swap", size=64 * MiB, backend="file") -> SwapTemplate:
    return SwapTemplate(size=size, backend=backend, directory=Path(directory),
                        description="per-node swap")


def all_paths(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.fixture
def state(tmp_path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


def test_per_node_swap_created_on_first_use(state):
    old = os.umask(0)
    try:
        registry = ExportRegistry([], swap_template(), state)
    finally:
        os.umask(old)
    with registry:
        swap_dir = state / "swap"
        assert stat.S_IMODE(os.stat(swap_dir).st_mode) == 0o700
        assert list(swap_dir.iterdir()) == []

        export = registry.lookup("swap/node-01")
        assert isinstance(export, Export)
        assert (export.name, export.node, export.is_swap) == ("swap/node-01", "node-01", True)
        assert (export.size, export.read_only) == (64 * MiB, False)
        assert export.description == "per-node swap"
        image = swap_dir / "node-01.img"
        st = os.stat(image)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == 64 * MiB and st.st_blocks == 0
        assert registry.lookup("swap/node-01") is export


def test_concurrent_first_lookups_create_one_export(state, monkeypatch):
    constructed: list[Path] = []
    real = store_mod.FileBackend

    def counting(path, *args, **kwargs):
        constructed.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(store_mod, "FileBackend", counting)  # swap images are made there
    with ExportRegistry([], swap_template(), state) as registry:
        results: list = []
        run_in_threads(16, lambda _: results.append(registry.lookup("swap/racer")))
        assert len(results) == 16
        assert all(r is results[0] for r in results)
        assert constructed == [state / "swap" / "racer.img"]
        assert sorted(p.name for p in (state / "swap").iterdir()) == ["racer.img"]


BAD_NAMES = [
    "swap/",
    "swap/A",
    "swap/Node1",
    "swap/../x",
    "swap/..",
    "swap/.",
    "swap/a/b",
    "swap/a/../../etc",
    "swap//a",
    "swap/a\0b",
    "swap/a\n",
    "swap/a ",
    "swap/-a",
    "swap/a-",
    "swap/a.b",
    "swap/a_b",
    "swap/\u00e9t\u00e9",
    "swap/" + "a" * 64,
    "swap",
    "swapx/a",
    "/swap/a",
    "SWAP/a",
    "",
    "no-such-export",
]


def test_bad_names_return_none_and_create_nothing(tmp_path, state):
    with ExportRegistry([], swap_template(), state) as registry:
        before = all_paths(tmp_path)
        for name in BAD_NAMES:
            assert registry.lookup(name) is None, name
        assert all_paths(tmp_path) == before
        # The longest and shortest valid names do work.
        assert registry.lookup("swap/" + "a" * 63) is not None
        assert registry.lookup("swap/7") is not None


def test_symlinked_image_is_refused(tmp_path, state):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    with ExportRegistry([], swap_template(), state) as registry:
        (state / "swap" / "evil.img").symlink_to(victim)
        with pytest.raises(ExportError):
            registry.lookup("swap/evil")
    assert victim.read_bytes() == b"precious"


def test_restart_reopens_swap_with_its_data(state):
    with ExportRegistry([], swap_template(), state) as registry:
        export = registry.lookup("swap/n1")
        export.backend.write_from(4096, pattern(4096), fua=True)
    with ExportRegistry([], swap_template(), state) as registry:
        assert registry.list() == [("swap/n1", "per-node swap")]
        export = registry.lookup("swap/n1")
        assert read(export.backend, 4096, 4096) == bytes(pattern(4096))


def test_restart_with_different_swap_size_is_an_error(state):
    with ExportRegistry([], swap_template(size=64 * MiB), state) as registry:
        registry.lookup("swap/n1")
    with ExportRegistry([], swap_template(size=128 * MiB), state) as registry:
        with pytest.raises(ExportError, match="n1"):
            registry.lookup("swap/n1")
        assert registry.lookup("swap/n2").size == 128 * MiB
    assert os.stat(state / "swap" / "n1.img").st_size == 64 * MiB


def test_static_exports_and_list(tmp_path, state):
    image = tmp_path / "images" / "base.img"
    image.parent.mkdir()
    with FileBackend(image, 4 * MiB, read_only=False, create=True) as backend:
        backend.write_from(0, pattern(512), fua=True)
    specs = [
        ExportSpec("scratch", "file", tmp_path / "scratch.img", 8 * MiB, False, "scratch disk"),
        ExportSpec("base", "file", image, None, True, "golden image"),
        ExportSpec("ram", "memory", None, 16 * MiB, False, "RAM disk"),
    ]
    with ExportRegistry(specs, swap_template(), state) as registry:
        scratch = registry.lookup("scratch")
        assert (scratch.size, scratch.read_only, scratch.is_swap, scratch.node) == (
            8 * MiB, False, False, None)
        assert stat.S_IMODE(os.stat(tmp_path / "scratch.img").st_mode) == 0o600
        base = registry.lookup("base")
        assert base.size == 4 * MiB and base.read_only
        assert read(base.backend, 0, 512) == bytes(pattern(512))
        assert isinstance(registry.lookup("ram").backend, MemoryBackend)
        assert registry.lookup("scratch") is scratch
        assert registry.lookup("Scratch") is None

        registry.lookup("swap/zeta")
        registry.lookup("swap/alpha")
        assert registry.list() == [
            ("scratch", "scratch disk"),
            ("base", "golden image"),
            ("ram", "RAM disk"),
            ("swap/alpha", "per-node swap"),
            ("swap/zeta", "per-node swap"),
        ]


def test_static_export_errors_fail_construction(tmp_path, state):
    missing_ro = ExportSpec("ro", "file", tmp_path / "absent.img", MiB, True, "")
    with pytest.raises(ExportError, match="ro"):
        ExportRegistry([missing_ro], None, state)
    twice = ExportSpec("a", "memory", None, MiB, False, "")
    with pytest.raises(ExportError, match="twice"):
        ExportRegistry([twice, twice], None, state)
    clash = ExportSpec("swap/x", "memory", None, MiB, False, "")
    with pytest.raises(ExportError, match="swap"):
        ExportRegistry([clash], swap_template(), state)
    with pytest.raises(ExportError, match="backend"):
        ExportRegistry([ExportSpec("n", "nfs", None, MiB, False, "")], None, state)


def test_swap_disabled(state):
    disabled = SimpleNamespace(enabled=False, size=MiB, backend="file",
                               directory=Path("swap"), description="")
    for swap in (None, disabled):
        with ExportRegistry([], swap, state) as registry:
            assert registry.lookup("swap/n1") is None
            assert registry.list() == []
    assert not (state / "swap").exists()


def test_duck_typed_config_objects_and_memory_swap(tmp_path, state):
    # Shaped like config.ExportConfig / config.SwapConfig.
    export_cfg = SimpleNamespace(name="d", backend="memory", path=None, size=MiB,
                                 read_only=False, description="duck")
    swap_cfg = SimpleNamespace(enabled=True, size=32 * MiB, backend="memory",
                               directory=Path("swap"), description="ram swap")
    before = all_paths(tmp_path)
    with ExportRegistry([export_cfg], swap_cfg, state) as registry:
        export = registry.lookup("swap/n1")
        assert isinstance(export.backend, MemoryBackend) and export.size == 32 * MiB
        assert registry.lookup("swap/n1") is export
        assert registry.list() == [("d", "duck"), ("swap/n1", "ram swap")]
    assert all_paths(tmp_path) == before  # RAM swap touches no disk


def test_absolute_swap_directory(tmp_path, state):
    elsewhere = tmp_path / "var" / "swap"
    with ExportRegistry([], swap_template(directory=elsewhere), state) as registry:
        registry.lookup("swap/n1")
    assert (elsewhere / "n1.img").exists()


def test_export_errors_are_oserrors_with_errno(tmp_path, state):
    # Callers treat OSError as "the environment failed": the daemon logs it and exits 1 at
    # start-up, a connection thread logs it and closes the connection.
    missing = ExportSpec("ro", "file", tmp_path / "absent.img", MiB, True, "")
    with pytest.raises(OSError) as info:
        ExportRegistry([missing], None, state)
    assert isinstance(info.value, ExportError)
    assert info.value.errno == errno.ENOENT
    assert "absent.img" in str(info.value) and "'ro'" in str(info.value)


def test_close_flushes_and_closes_every_export_even_if_one_fails(state, monkeypatch):
    registry = ExportRegistry([], swap_template(), state)
    exports = [registry.lookup(f"swap/n{i}") for i in range(3)]
    flushed, closed = [], []
    for export in exports:
        real_close = export.backend.close

        def flush(export=export):
            flushed.append(export.node)
            if export.node == "n0":
                raise OSError(errno.EIO, "disk gone")

        def close(export=export, real_close=real_close):
            closed.append(export.node)
            real_close()

        monkeypatch.setattr(export.backend, "flush", flush)
        monkeypatch.setattr(export.backend, "close", close)
    registry.close()
    assert sorted(flushed) == sorted(closed) == ["n0", "n1", "n2"]


def test_lookup_after_close_raises(state):
    registry = ExportRegistry([], swap_template(), state)
    export = registry.lookup("swap/n1")
    registry.close()
    registry.close()
    with pytest.raises(ExportError):
        registry.lookup("swap/n1")
    with pytest.raises(OSError):
        export.backend.flush()


def test_memory_trim_on_a_locked_map_still_reads_back_zeros():
    # Under the daemon's mlockall(MCL_FUTURE) the map is locked and MADV_DONTNEED fails with
    # EINVAL; trim and write_zeroes must then zero the range instead of failing.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    backend = MemoryBackend(1 << 20)
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(backend._map))
        assert libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(1 << 20)) == 0
        data = memoryview(bytearray(b"\xab" * (256 << 10)))
        backend.write_from(0, data, fua=False)
        backend.trim(4096, 128 << 10, fua=False)
        backend.write_zeroes(200 << 10, 8192, may_trim=True, fua=False)
        out = memoryview(bytearray(256 << 10))
        backend.read_into(0, out)
        assert bytes(out[4096 : 4096 + (128 << 10)]) == bytes(128 << 10)
        assert bytes(out[200 << 10 : (200 << 10) + 8192]) == bytes(8192)
        assert bytes(out[:4096]) == b"\xab" * 4096
        libc.munlock(ctypes.c_void_p(address), ctypes.c_size_t(1 << 20))
    finally:
        backend.close()
