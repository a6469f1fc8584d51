"""Tests for the request-memory pool (cext/pool.c via netswap.reserve)."""

import json
import pickle
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import run_in_threads
from netswap.reserve import Buffer, LockError, Pool, PoolError

BLOCK = 4096
MiB = 1 << 20


def block_bytes(size):
    """What the buddy allocator charges for `size` bytes: a power-of-two number of blocks."""
    blocks = -(-size // BLOCK)
    return BLOCK << (blocks - 1).bit_length()


def pattern(tag, size):
    """`size` bytes that differ for different tags, to catch overlapping buffers."""
    return (tag.to_bytes(8, "little") * (size // 8 + 1))[:size]


@pytest.fixture
def pool():
    with Pool(4 * MiB, lock="off") as p:
        yield p


def test_alloc_gives_writable_view_of_asked_size(pool):
    buf = pool.alloc(5000)
    assert isinstance(buf, Buffer)
    assert buf.size == 5000 and len(buf.view) == 5000
    assert buf.offset % BLOCK == 0 and not buf.emergency
    buf.view[:] = b"\xab" * 5000
    assert pool._arena[buf.offset : buf.offset + 5000] == b"\xab" * 5000
    buf.release()
    assert pool.stats()["in_use_bytes"] == 0


@pytest.mark.parametrize(
    ("size", "charged"),
    [(1, 4096), (4096, 4096), (4097, 8192), (8192, 8192), (12289, 16384), (MiB, MiB)],
)
def test_sizes_round_up_to_power_of_two_blocks(pool, size, charged):
    with pool.alloc(size) as buf:
        assert len(buf.view) == size
        assert pool.stats()["in_use_bytes"] == charged


def test_pool_size_rounds_up_to_block_and_reports_geometry():
    with Pool(5000, lock="off") as p:
        assert p.size == 8192 and p.block_size == BLOCK and p.max_alloc == 8192
    # 12 blocks = 8 + 4: the largest block is the largest aligned power-of-two chunk.
    with Pool(12 * BLOCK, lock="off") as p:
        assert p.max_alloc == 8 * BLOCK
        assert p.stats()["free_bytes"] == 12 * BLOCK


def test_free_bytes_are_exact(pool):
    rng = random.Random(1)
    held = []
    for _ in range(200):
        if held and rng.random() < 0.4:
            held.pop(rng.randrange(len(held))).release()
        else:
            buf = pool.alloc(rng.randint(1, 64 * 1024))
            if buf is not None:
                held.append(buf)
        s = pool.stats()
        charged = sum(block_bytes(b.size) for b in held)
        assert s["in_use_bytes"] == charged
        assert s["free_bytes"] == pool.size - charged
    for buf in held:
        buf.release()
    assert pool.stats()["free_bytes"] == pool.size


def test_exhaustion_returns_none_and_counts_failure(pool):
    held = [pool.alloc(BLOCK) for _ in range(pool.size // BLOCK)]
    assert all(held)
    assert pool.stats()["free_bytes"] == 0
    assert pool.alloc(1) is None
    assert pool.stats()["failures"] == 1
    held.pop().release()
    held.append(pool.alloc(1))
    assert held[-1] is not None
    for buf in held:
        buf.release()


def test_large_and_small_mixed_never_overlap():
    rng = random.Random(2)
    with Pool(16 * MiB + 12 * BLOCK, lock="off") as p:
        held = {}
        for _ in range(3000):
            if held and rng.random() < 0.45:
                held.pop(rng.choice(list(held))).release()
                continue
            size = rng.choice([rng.randint(1, 8192), rng.randint(8193, 256 * 1024), 4 * MiB])
            buf = p.alloc(size)
            if buf is None:
                continue
            new = range(buf.offset, buf.offset + block_bytes(size))
            for other in held.values():
                old = range(other.offset, other.offset + block_bytes(other.size))
                assert new.stop <= old.start or old.stop <= new.start, (buf, other)
            assert new.stop <= p.size
            held[buf.offset] = buf
        for buf in held.values():
            buf.release()
        assert p.stats()["in_use_bytes"] == 0


def test_buddies_coalesce_after_everything_is_freed():
    with Pool(MiB, lock="off") as p:
        small = [p.alloc(BLOCK) for _ in range(MiB // BLOCK)]
        assert all(small)
        # Every other block freed: 8 KiB free in total per pair, yet no pair is whole.
        for buf in small[::2]:
            buf.release()
        assert p.alloc(2 * BLOCK) is None
        for buf in small[1::2]:
            buf.release()
        with p.alloc(p.max_alloc) as whole:
            assert whole.offset == 0


def test_non_power_of_two_arena_is_fully_usable_and_coalesces():
    with Pool(12 * BLOCK, lock="off") as p:
        for _ in range(2):
            big, rest = p.alloc(8 * BLOCK), p.alloc(4 * BLOCK)
            assert big is not None and rest is not None
            assert p.alloc(1) is None
            big.release()
            rest.release()
        singles = [p.alloc(1) for _ in range(12)]
        assert all(singles)
        for buf in reversed(singles):
            buf.release()
        p.alloc(8 * BLOCK).release()


class PoolModel(RuleBasedStateMachine):
    """Random alloc/release sequences against a model of what must hold."""

    def __init__(self):
        super().__init__()
        self.pool = Pool(64 * BLOCK + 24 * BLOCK, lock="off")
        self.held = []

    @rule(size=st.integers(1, 40 * BLOCK))
    def alloc(self, size):
        buf = self.pool.alloc(size)
        if buf is None:
            # An empty pool fits anything up to max_alloc, so a failure means
            # something is held (fragmentation is allowed beyond that).
            assert self.held
            return
        buf.view[:] = pattern(buf.offset, size)
        self.held.append(buf)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        buf = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        assert buf.view == pattern(buf.offset, buf.size)
        buf.release()

    @invariant()
    def accounting_is_exact_and_blocks_disjoint(self):
        s = self.pool.stats()
        charged = sum(block_bytes(b.size) for b in self.held)
        assert s["in_use_bytes"] == charged
        assert s["free_bytes"] == self.pool.size - charged
        spans = sorted((b.offset, b.offset + block_bytes(b.size)) for b in self.held)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start

    def teardown(self):
        for buf in self.held:
            buf.release()
        self.pool.alloc(self.pool.max_alloc).release()
        self.pool.close()


TestPoolModel = PoolModel.TestCase
TestPoolModel.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


def test_many_threads_never_share_or_corrupt_memory():
    threads, rounds = 8, 3000
    # Small enough that threads run it dry, so failures and timed waits happen too.
    with Pool(MiB, lock="off") as p:
        owners = {}  # block offset -> thread, for an overlap check at alloc time
        owners_lock = threading.Lock()

        def worker(tid):
            rng = random.Random(tid)
            held = []
            for i in range(rounds):
                if held and (len(held) >= 8 or rng.random() < 0.5):
                    buf, expected = held.pop(rng.randrange(len(held)))
                    assert buf.view == expected, f"thread {tid}: buffer at {buf.offset} corrupted"
                    with owners_lock:
                        del owners[buf.offset]
                    buf.release()
                    continue
                size = rng.choice([rng.randint(1, 8192), rng.randint(8193, 128 * 1024)])
                buf = p.alloc(size, timeout=rng.choice([0, 0.001]))
                if buf is None:
                    continue
                with owners_lock:
                    span = range(buf.offset, buf.offset + block_bytes(size))
                    for off, (other, other_size) in owners.items():
                        assert span.stop <= off or off + block_bytes(other_size) <= span.start, (
                            f"thread {tid} got {span} overlapping thread {other} at {off}"
                        )
                    owners[buf.offset] = (tid, size)
                expected = pattern(tid << 32 | i, size)
                buf.view[:] = expected
                held.append((buf, expected))
            for buf, expected in held:
                assert buf.view == expected
                with owners_lock:
                    del owners[buf.offset]
                buf.release()

        run_in_threads(threads, worker)
        s = p.stats()
        assert s["in_use_bytes"] == 0 and s["free_bytes"] == p.size
        assert s["allocs"] == s["frees"] > threads * rounds // 4
        assert s["waits"] > 0 and s["failures"] > 0
        p.alloc(p.max_alloc).release()


def fill(pool):
    held = [pool.alloc(pool.max_alloc) for _ in range(pool.size // pool.max_alloc)]
    assert all(held) and pool.stats()["free_bytes"] == 0
    return held


@pytest.mark.parametrize("timeout", [5.0, None])
def test_waiting_alloc_is_woken_by_a_release(pool, timeout):
    held = fill(pool)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.alloc(BLOCK, timeout=timeout)))
    start = time.monotonic()
    waiter.start()
    while pool.stats()["waits"] == 0:
        time.sleep(0.001)
    held.pop().release()
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    assert time.monotonic() - start < 4
    assert got[0] is not None and got[0].size == BLOCK
    s = pool.stats()
    assert s["waits"] == 1 and s["failures"] == 0
    got[0].release()
    for buf in held:
        buf.release()


def test_waiting_alloc_times_out(pool):
    held = fill(pool)
    start = time.monotonic()
    assert pool.alloc(BLOCK, timeout=0.2) is None
    assert time.monotonic() - start >= 0.2
    s = pool.stats()
    assert s["waits"] == 1 and s["failures"] == 1
    for buf in held:
        buf.release()


def test_release_twice_raises(pool):
    buf = pool.alloc(100)
    buf.release()
    with pytest.raises(PoolError, match="already released"):
        buf.release()
    assert pool.stats()["frees"] == 1


def test_context_manager_releases_and_view_dies_with_the_buffer(pool):
    with pool.alloc(100) as buf:
        view = buf.view
        view[0] = 1
    assert pool.stats()["in_use_bytes"] == 0
    with pytest.raises(ValueError):
        view[0] = 2


def test_release_refused_while_view_is_exported(pool):
    buf = pool.alloc(64)
    pinned = pickle.PickleBuffer(buf.view)  # holds an export, as a recv_into in progress does
    with pytest.raises(PoolError, match="exported"):
        buf.release()
    assert pool.stats()["in_use_bytes"] == BLOCK
    del pinned
    buf.release()


def test_invalid_arguments_raise_value_error(pool):
    for size in (0, -1, pool.max_alloc + 1):
        with pytest.raises(ValueError):
            pool.alloc(size)
    with pytest.raises(ValueError):
        pool.alloc(1, timeout=-1)
    with pytest.raises(ValueError):
        Pool(0, lock="off")
    with pytest.raises(ValueError):
        Pool(MiB, lock="sometimes")


def test_emergency_without_a_group_is_a_normal_allocation(pool):
    with pool.alloc(BLOCK, emergency=True) as buf:
        assert buf.emergency is False


def test_counters(pool):
    a, b = pool.alloc(BLOCK), pool.alloc(3 * BLOCK)
    a.release()
    b.release()
    pool.alloc(BLOCK).release()
    s = pool.stats()
    assert s == {
        "in_use_bytes": 0,
        "free_bytes": pool.size,
        "allocs": 3,
        "frees": 3,
        "failures": 0,
        "waits": 0,
        "high_water_bytes": 5 * BLOCK,
        "watermark": 0,
        "min_normal": 0,
        "emergency_allocs": 0,
        "emergency_in_use_bytes": 0,
    }


def test_close_refused_while_in_use_then_final():
    p = Pool(MiB, lock="off")
    buf = p.alloc(1)
    with pytest.raises(PoolError, match="still in use"):
        p.close()
    buf.release()
    p.close()
    p.close()
    with pytest.raises(PoolError, match="closed"):
        p.alloc(1)


def vm_locked_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    raise AssertionError("no VmLck in /proc/self/status")


def test_lock_off_is_unlocked():
    with Pool(MiB, lock="off") as p:
        assert p.locked is False and p.locked_bytes == 0


def test_lock_required_locks_the_arena_and_the_allocator_metadata():
    before = vm_locked_kib()
    with Pool(32 * MiB) as p:
        assert p.locked is True and p.locked_bytes == 32 * MiB
        # The allocator touches 12 bytes of metadata per block on every call:
        # they must be as resident as the arena.
        metadata_kib = 32 * MiB // BLOCK * 12 // 1024
        assert vm_locked_kib() - before >= 32 * 1024 + metadata_kib
    assert vm_locked_kib() - before < 32 * 1024


# Runs in a child without CAP_IPC_LOCK, where RLIMIT_MEMLOCK (8 MiB) applies.
LOCK_CHILD = textwrap.dedent(
    """
    import json, logging, resource, sys
    from netswap.reserve import LockError, Pool

    resource.setrlimit(resource.RLIMIT_MEMLOCK, (8 << 20, 8 << 20))
    logging.basicConfig(level=logging.WARNING)
    try:
        pool = Pool(64 << 20, lock=sys.argv[1])
    except LockError as exc:
        print(json.dumps({"error": str(exc)}))
    else:
        with pool, pool.alloc(pool.max_alloc) as buf:
            buf.view[-1] = 1
            print(json.dumps({"locked": pool.locked, "locked_bytes": pool.locked_bytes}))
    """
)


def run_without_ipc_lock(lock_mode):
    child = subprocess.run(
        ["setpriv", "--bounding-set=-ipc_lock", sys.executable, "-c", LOCK_CHILD, lock_mode],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout), child.stderr


def test_lock_required_fails_with_advice_without_cap_ipc_lock():
    result, _ = run_without_ipc_lock("required")
    message = result["error"]
    assert str(64 * MiB) in message
    assert "Cannot allocate memory" in message or "Operation not permitted" in message
    assert "RLIMIT_MEMLOCK" in message and "LimitMEMLOCK=infinity" in message
    assert "CAP_IPC_LOCK" in message


def test_lock_best_effort_runs_unlocked_and_warns_without_cap_ipc_lock():
    result, log = run_without_ipc_lock("best-effort")
    assert result == {"locked": False, "locked_bytes": 0}
    assert "WARNING:netswap.pool" in log and "RLIMIT_MEMLOCK" in log
