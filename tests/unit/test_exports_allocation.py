"""What backends say about their storage and how they zero it quickly: `allocation` (NBD's
base:allocation) and `write_zeroes(fast=True)` (FAST_ZERO), on real files and real memory."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest

from netswap.exports import backends as backends_mod
from netswap.exports import Backend, FileBackend, MemoryBackend

MiB = 1 << 20
KiB = 1 << 10
PAGE = mmap.PAGESIZE
HOLE, DATA = False, True


def pattern(length: int) -> memoryview:
    return memoryview(bytearray(b"\xa5" * length))


def read(backend, offset: int, length: int) -> bytes:
    buf = memoryview(bytearray(length))
    backend.read_into(offset, buf)
    return bytes(buf)


def covered(runs) -> int:
    return sum(length for length, _ in runs)


@pytest.fixture
def file_backend(tmp_path):
    backend = FileBackend(tmp_path / "disk.img", 16 * MiB, read_only=False, create=True)
    yield backend
    backend.close()


@pytest.fixture
def memory_backend():
    backend = MemoryBackend(16 * MiB)
    yield backend
    backend.close()


# -- allocation: files ---------------------------------------------------------------------


def test_a_new_sparse_file_is_one_hole(file_backend):
    assert file_backend.allocation(0, 16 * MiB, 1024) == [(16 * MiB, HOLE)]


def test_file_data_and_holes_as_written(file_backend):
    file_backend.write_from(4 * MiB, pattern(MiB), fua=False)
    file_backend.write_from(10 * MiB, pattern(4 * KiB), fua=False)
    assert file_backend.allocation(0, 16 * MiB, 1024) == [
        (4 * MiB, HOLE), (MiB, DATA), (5 * MiB, HOLE), (4 * KiB, DATA),
        (6 * MiB - 4 * KiB, HOLE)]
    # A range that starts and ends inside runs is cut to the range.
    assert file_backend.allocation(4 * MiB - 100, 200, 1024) == [(100, HOLE), (100, DATA)]
    assert file_backend.allocation(4 * MiB + 1, 100, 1024) == [(100, DATA)]
    # At most `limit` runs: the first ones, whole.
    assert file_backend.allocation(0, 16 * MiB, 2) == [(4 * MiB, HOLE), (MiB, DATA)]
    assert file_backend.allocation(0, 16 * MiB, 1) == [(4 * MiB, HOLE)]


def test_trimmed_and_may_trim_zeroed_ranges_become_holes(file_backend):
    file_backend.write_from(0, pattern(8 * MiB), fua=False)
    file_backend.trim(MiB, MiB, fua=False)
    file_backend.write_zeroes(4 * MiB, MiB, may_trim=True, fua=False)
    assert file_backend.allocation(0, 8 * MiB, 1024) == [
        (MiB, DATA), (MiB, HOLE), (2 * MiB, DATA), (MiB, HOLE), (3 * MiB, DATA)]


def test_past_the_end_of_a_file_truncated_under_us_is_a_hole(file_backend):
    file_backend.write_from(0, pattern(MiB), fua=False)
    os.truncate(file_backend.path, 2 * MiB)
    assert file_backend.allocation(0, 16 * MiB, 1024) == [(MiB, DATA), (15 * MiB, HOLE)]
    assert file_backend.allocation(8 * MiB, MiB, 1024) == [(MiB, HOLE)]


def test_a_file_that_cannot_seek_by_data_is_all_data_and_is_asked_once(file_backend,
                                                                      monkeypatch):
    calls = []
    real_lseek = os.lseek

    def lseek(fd, position, how):
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            calls.append(how)
            raise OSError(errno.EINVAL, "no SEEK_DATA here")
        return real_lseek(fd, position, how)

    monkeypatch.setattr(backends_mod.os, "lseek", lseek)
    assert file_backend.allocation(MiB, 3 * MiB, 1024) == [(3 * MiB, DATA)]
    assert file_backend.allocation(0, MiB, 1024) == [(MiB, DATA)]
    assert calls == [os.SEEK_DATA]


def test_other_seek_errors_are_raised(file_backend, monkeypatch):
    def lseek(fd, position, how):
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(backends_mod.os, "lseek", lseek)
    with pytest.raises(OSError) as err:
        file_backend.allocation(0, MiB, 1024)
    assert err.value.errno == errno.EIO


def test_allocation_checks_its_range(file_backend, memory_backend):
    for backend in (file_backend, memory_backend):
        with pytest.raises(OSError) as err:
            backend.allocation(16 * MiB - 4096, 8192, 1024)
        assert err.value.errno == errno.EINVAL
        assert backend.allocation(0, 0, 1024) == []


def test_a_backend_that_knows_nothing_says_all_data():
    class Opaque(Backend):
        size, read_only = 8192, False
        read_into = write_from = flush = trim = write_zeroes = cache = None
        allocated_bytes = close = None

    assert Opaque().allocation(4096, 4096, 1024) == [(4096, DATA)]


# -- allocation: memory --------------------------------------------------------------------


def test_memory_never_written_is_one_hole_even_after_reads(memory_backend):
    assert memory_backend.allocation(0, 16 * MiB, 1024) == [(16 * MiB, HOLE)]
    read(memory_backend, 0, 16 * MiB)  # maps the shared zero page: still nothing held
    assert memory_backend.allocation(0, 16 * MiB, 1024) == [(16 * MiB, HOLE)]


def test_memory_written_pages_are_data(memory_backend):
    memory_backend.write_from(2 * MiB, pattern(MiB), fua=False)
    memory_backend.write_from(8 * MiB + 10, pattern(1), fua=False)  # one byte: its page
    assert memory_backend.allocation(0, 16 * MiB, 1024) == [
        (2 * MiB, HOLE), (MiB, DATA), (5 * MiB, HOLE), (PAGE, DATA), (8 * MiB - PAGE, HOLE)]
    assert memory_backend.allocation(2 * MiB - 10, 20, 1024) == [(10, HOLE), (10, DATA)]
    assert memory_backend.allocation(8 * MiB + 100, 100, 1024) == [(100, DATA)]
    assert memory_backend.allocation(0, 16 * MiB, 3) == [
        (2 * MiB, HOLE), (MiB, DATA), (5 * MiB, HOLE)]


def test_memory_released_pages_are_holes_again(memory_backend):
    memory_backend.write_from(0, pattern(4 * MiB), fua=False)
    memory_backend.trim(MiB, MiB, fua=False)
    memory_backend.write_zeroes(3 * MiB, MiB, may_trim=True, fua=False)
    memory_backend.write_zeroes(0, PAGE, may_trim=False, fua=False)  # NO_HOLE keeps it
    assert memory_backend.allocation(0, 4 * MiB, 1024) == [
        (MiB, DATA), (MiB, HOLE), (MiB, DATA), (MiB, HOLE)]


def test_memory_scan_is_bounded_per_call(memory_backend, monkeypatch):
    monkeypatch.setattr(backends_mod, "_ALLOCATION_SCAN_PAGES", 16)
    monkeypatch.setattr(backends_mod, "_PAGEMAP_WINDOW_PAGES", 5)  # runs across windows
    memory_backend.write_from(3 * PAGE, pattern(6 * PAGE), fua=False)
    runs = memory_backend.allocation(100, 16 * MiB - 100, 1024)
    assert runs == [(3 * PAGE - 100, HOLE), (6 * PAGE, DATA), (7 * PAGE, HOLE)]
    assert covered(runs) == 16 * PAGE - 100


# -- write_zeroes(fast=True) ---------------------------------------------------------------


def test_file_fast_zero_punches_or_zeroes_a_range(file_backend):
    file_backend.write_from(0, pattern(4 * MiB), fua=False)
    file_backend.write_zeroes(0, MiB, may_trim=True, fua=False, fast=True)
    file_backend.write_zeroes(2 * MiB, MiB, may_trim=False, fua=True, fast=True)
    got = read(file_backend, 0, 4 * MiB)
    assert got[: MiB] == bytes(MiB) and got[2 * MiB : 3 * MiB] == bytes(MiB)
    assert got[MiB : 2 * MiB] == bytes(pattern(MiB)) == got[3 * MiB :]
    # may_trim made a hole; NO_HOLE kept its range allocated (ZERO_RANGE), which a file
    # system may still report as a hole (ext4 does: an unwritten extent), so it is not asked.
    assert file_backend.allocation(0, MiB, 1024) == [(MiB, HOLE)]
    assert file_backend.allocation(MiB, MiB, 1024) == [(MiB, DATA)]
    assert file_backend.allocation(3 * MiB, MiB, 1024) == [(MiB, DATA)]
    assert os.stat(file_backend.path).st_blocks * 512 >= 3 * MiB


def test_file_fast_zero_without_zero_range_punches_and_allocates(file_backend):
    file_backend._can_zero_range = False  # tmpfs-like
    file_backend.write_from(0, pattern(2 * MiB), fua=False)
    file_backend.write_zeroes(0, MiB, may_trim=False, fua=False, fast=True)
    assert read(file_backend, 0, MiB) == bytes(MiB)
    assert os.stat(file_backend.path).st_blocks * 512 >= 2 * MiB  # NO_HOLE: still allocated


@pytest.mark.parametrize("may_trim", [True, False])
def test_file_fast_zero_that_would_write_fails_at_once_and_changes_nothing(file_backend,
                                                                          may_trim,
                                                                          monkeypatch):
    file_backend._can_zero_range = file_backend._can_punch_hole = False
    file_backend.write_from(0, pattern(MiB), fua=False)
    writes = []
    monkeypatch.setattr(file_backend, "_write_zero_buffer",
                        lambda *args: writes.append(args))
    with pytest.raises(OSError) as err:
        file_backend.write_zeroes(0, MiB, may_trim=may_trim, fua=False, fast=True)
    assert err.value.errno == errno.EOPNOTSUPP
    assert writes == [] and read(file_backend, 0, MiB) == bytes(pattern(MiB))
    # Without the flag the same request is done, by writing.
    file_backend.write_zeroes(0, MiB, may_trim=may_trim, fua=False)
    assert writes == [(0, MiB)]


def test_file_without_fallocate_mode_0_writes_the_zeros_and_never_says_enotsup(
        file_backend, monkeypatch):
    file_backend._can_zero_range = False
    real = backends_mod.fallocate

    def fallocate(fd, mode, offset, length):
        if mode == 0:
            raise OSError(errno.EOPNOTSUPP, "no plain fallocate here")
        return real(fd, mode, offset, length)

    monkeypatch.setattr(backends_mod, "fallocate", fallocate)
    file_backend.write_from(0, pattern(MiB), fua=False)
    file_backend.write_zeroes(0, MiB, may_trim=False, fua=False)
    assert read(file_backend, 0, MiB) == bytes(MiB)
    assert file_backend.allocation(0, MiB, 1024) == [(MiB, DATA)]  # NO_HOLE: allocated
    # Learnt: a fast NO_HOLE request now knows at once that it would write.
    with pytest.raises(OSError) as err:
        file_backend.write_zeroes(0, MiB, may_trim=False, fua=False, fast=True)
    assert err.value.errno == errno.EOPNOTSUPP


def test_block_device_fast_zero_only_by_punching(file_backend):
    # On a block device ZERO_RANGE may be the kernel writing zeros; punching never is.
    file_backend._block_device = True
    file_backend.write_from(0, pattern(2 * MiB), fua=False)
    with pytest.raises(OSError) as err:
        file_backend.write_zeroes(0, MiB, may_trim=False, fua=False, fast=True)
    assert err.value.errno == errno.EOPNOTSUPP
    assert read(file_backend, 0, MiB) == bytes(pattern(MiB))
    file_backend.write_zeroes(0, MiB, may_trim=True, fua=False, fast=True)
    assert read(file_backend, 0, MiB) == bytes(MiB)


def test_memory_fast_zero_releases_pages(memory_backend):
    memory_backend.write_from(0, pattern(2 * MiB), fua=False)
    memory_backend.write_zeroes(100, MiB, may_trim=True, fua=False, fast=True)
    got = read(memory_backend, 0, 2 * MiB)
    assert got[:100] == bytes(pattern(100))
    assert got[100 : MiB + 100] == bytes(MiB)
    assert got[MiB + 100 :] == bytes(pattern(MiB - 100))
    assert memory_backend.allocation(0, 2 * MiB, 1024) == [
        (PAGE, DATA), (MiB - PAGE, HOLE), (MiB, DATA)]


def test_memory_fast_zero_that_must_keep_pages_fails_and_changes_nothing(memory_backend):
    memory_backend.write_from(0, pattern(MiB), fua=False)
    with pytest.raises(OSError) as err:
        memory_backend.write_zeroes(0, MiB, may_trim=False, fua=False, fast=True)
    assert err.value.errno == errno.EOPNOTSUPP
    assert read(memory_backend, 0, MiB) == bytes(pattern(MiB))


def test_memory_fast_zero_on_a_locked_map_fails_and_changes_nothing():
    # Under the daemon's mlockall the kernel refuses MADV_DONTNEED: zeroing is then a write.
    libc = ctypes.CDLL(None, use_errno=True)
    backend = MemoryBackend(MiB)
    address = ctypes.c_void_p(backend._address)
    try:
        assert libc.mlock(address, ctypes.c_size_t(MiB)) == 0
        backend.write_from(0, pattern(MiB), fua=False)
        for _ in range(2):  # the second time without asking the kernel again
            with pytest.raises(OSError) as err:
                backend.write_zeroes(100, 512 * KiB, may_trim=True, fua=False, fast=True)
            assert err.value.errno == errno.EOPNOTSUPP
            assert read(backend, 0, MiB) == bytes(pattern(MiB))
        # Within a page or two it is done by hand, which is cheap enough to count as fast.
        backend.write_zeroes(100, 200, may_trim=True, fua=False, fast=True)
        assert read(backend, 100, 200) == bytes(200)
        # And without the flag the range is zeroed by writing.
        backend.write_zeroes(PAGE, 512 * KiB, may_trim=True, fua=False)
        assert read(backend, PAGE, 512 * KiB) == bytes(512 * KiB)
        libc.munlock(address, ctypes.c_size_t(MiB))
    finally:
        backend.close()
