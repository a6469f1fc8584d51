"""The pool's prefault: the arena is faulted in (and locked) by background threads while the
daemon already listens. Whatever the timing, the pool never hands out memory that is not yet
faulted in, a group's connect returns only once its reservation is backed, and once the
daemon logs the prefault done, the whole arena is resident and locked. (No assertion here
depends on how fast anything is.)"""

from __future__ import annotations

import ctypes
import re

import pytest
from netswap._pool import ffi, lib
from netswap.reserve import Pool
from support.daemon import start_daemon
from support.metrics import metric
from support.wait import wait_until

BLOCK = 4096
MiB = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident(address: int, length: int) -> bool:
    """Are all pages of [address, address + length) in RAM? (mincore: looks, never faults.)"""
    pages = -(-length // BLOCK)
    vec = ctypes.create_string_buffer(pages)
    if _libc.mincore(address, length, vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return all(byte & 1 for byte in vec.raw)


def arena_address(pool: Pool) -> int:
    return int(ffi.cast("uintptr_t", lib.pool_base(pool.handle)))


def arena_mapping(pid: int, start: int | None, size: int) -> dict[str, int]:
    """The smaps fields (kB) of the arena's mapping in process `pid`: the one at `start`, or,
    without it, the one of exactly `size` bytes excluded from core dumps (MADV_DONTDUMP)."""
    with open(f"/proc/{pid}/smaps") as smaps:
        text = smaps.read()
    for entry in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        low, high = (int(x, 16) for x in entry.split(None, 1)[0].split("-"))
        flags = re.search(r"^VmFlags:(.*)$", entry, re.MULTILINE).group(1).split()
        if (low == start) if start is not None else (high - low == size and "dd" in flags):
            fields = {m.group(1): int(m.group(2))
                      for m in re.finditer(r"^(\w+):\s+(\d+) kB$", entry, re.MULTILINE)}
            fields["locked_vma"] = "lo" in flags
            return fields
    raise AssertionError(f"no arena mapping of {size} bytes in /proc/{pid}/smaps")


def test_blocks_handed_out_during_the_prefault_are_already_faulted_in():
    # One thread over 64 MiB: allocations start while most of the arena is still untouched.
    pool = Pool(64 * MiB, lock="best-effort", background=True, prefault_threads=1)
    base = arena_address(pool)
    held = []
    try:
        while len(held) * 256 * 1024 < pool.size:
            buf = pool.alloc(256 * 1024, timeout=None)
            # mincore before anything touches the buffer: the pool faulted it in, not us.
            assert resident(base + buf.offset, buf.size), (buf, pool.prefault_stats())
            held.append(buf)
        assert pool.stats()["free_bytes"] == 0
        pool.wait_prefaulted()
        assert pool.faulted_bytes == pool.size
    finally:
        for buf in held:
            buf.release()
        pool.close()


def test_connect_returns_only_once_the_reservation_is_backed():
    pool = Pool(64 * MiB, lock="best-effort", min_normal=8 * MiB, background=True,
                prefault_threads=1)
    try:
        groups = []
        for reservation in (4 * MiB, 16 * MiB, 20 * MiB):
            group = pool.group(reservation)
            group.connect()
            groups.append(group)
            # Backed: free memory faulted in covers every connected reservation (nothing is
            # allocated here), and it is resident.
            assert pool.faulted_bytes >= pool.watermark
            assert resident(arena_address(pool), pool.faulted_bytes)
        # Normal allocations (waiting for the prefault as need be) stop at the watermark;
        # below it, the reserve is there for a connected group, faulted in.
        held = []
        while pool.stats()["free_bytes"] > pool.watermark:
            held.append(pool.alloc(BLOCK, timeout=None))
        assert pool.alloc(BLOCK) is None
        reserve = pool.alloc(BLOCK, emergency=True, group=groups[0])  # at once: it is backed
        assert reserve is not None and reserve.emergency
        assert resident(arena_address(pool) + reserve.offset, reserve.size)
        reserve.release()
        for buf in held:
            buf.release()
        for group in groups:
            group.disconnect()
            group.destroy()
    finally:
        pool.wait_prefaulted()
        pool.close()


@pytest.mark.parametrize("size", [64 * MiB, 37 * MiB + 3 * BLOCK, 5 * BLOCK])
@pytest.mark.parametrize("background", [False, True])
def test_the_faulted_arena_is_carved_into_its_largest_blocks(size, background):
    # Chunks reach the allocator in any order (several threads): once all are in, the free
    # lists must hold the arena as its largest aligned power-of-two blocks, as if carved at
    # once, so that one allocation per bit of the block count takes all of it.
    with Pool(size, lock="off", background=background, prefault_threads=3) as pool:
        pool.wait_prefaulted()
        assert pool.prefault_stats()["running"] == 0 and pool.faulted_bytes == pool.size
        blocks = pool.size // BLOCK
        held = [pool.alloc(BLOCK << k) for k in reversed(range(blocks.bit_length()))
                if blocks >> k & 1]
        assert all(held) and pool.stats()["free_bytes"] == 0
        assert held[0].size == pool.max_alloc
        for buf in held:
            buf.release()


def test_connect_with_normal_memory_held_waits_for_the_reserve_to_be_backed():
    # Normal blocks take what is faulted in so far: a connect then waits until enough free
    # memory is faulted in to cover the new watermark (or min_normal + the watermark are).
    pool = Pool(64 * MiB, lock="off", min_normal=16 * MiB, background=True, prefault_threads=1)
    try:
        held = [pool.alloc(MiB, timeout=None) for _ in range(8)]
        group = pool.group(32 * MiB)
        group.connect()
        in_use = pool.stats()["in_use_bytes"]
        assert (pool.faulted_bytes - in_use >= pool.watermark
                or pool.faulted_bytes >= pool.min_normal + pool.watermark)
        assert pool.wait_faulted(48 * MiB) and pool.faulted_bytes >= 48 * MiB
        for buf in held:
            buf.release()
        group.disconnect()
        group.destroy()
    finally:
        pool.wait_prefaulted()
        pool.close()


def test_a_pool_closed_during_its_prefault_stops_it():
    pool = Pool(256 * MiB, lock="off", background=True, prefault_threads=1)
    pool.close()  # joins the prefault thread before unmapping the arena
    assert pool.prefault_stats()["running"] == 0


def test_in_process_arena_is_resident_and_locked_once_prefaulted():
    pool = Pool(32 * MiB, lock="required", background=True)
    try:
        pool.wait_prefaulted()
        assert pool.locked and pool.locked_bytes == pool.size
        mapping = arena_mapping("self", arena_address(pool), pool.size)
        assert mapping["locked_vma"]
        assert mapping["Size"] == mapping["Rss"] == mapping["Locked"] == pool.size // 1024
    finally:
        pool.close()


def vm_locked_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    raise AssertionError("no VmLck")


def test_daemon_pool_is_resident_and_locked_once_it_says_so(tmp_path):
    pool = 256 * MiB
    daemon = start_daemon(tmp_path, pool="256MiB")
    try:
        # It listens before the prefault is done; the log says when it is.
        def faulted_in():
            assert daemon.process.poll() is None, daemon.log()
            return re.search(r"pool: \d+ bytes faulted in.*", daemon.log())

        done = wait_until(faulted_in, timeout=120, what=daemon.log)
        assert "faulted in and locked" in done.group(0), daemon.log()
        pid = daemon.process.pid
        mapping = arena_mapping(pid, None, pool)
        assert mapping["locked_vma"]
        # Every page of the arena in RAM and locked: not just a locked mapping (VmLck counts
        # the whole mapping as soon as it is locked on fault, faulted in or not).
        assert mapping["Size"] == mapping["Rss"] == mapping["Locked"] == pool // 1024
        assert vm_locked_kib(pid) >= pool // 1024
        assert metric(daemon, "netswap_pool_faulted_bytes") == pool
        assert metric(daemon, "netswap_pool_locked_bytes") == pool
    finally:
        code = daemon.stop()
    log = daemon.log()
    assert code == 0 and "Traceback" not in log, log
