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

from netswap.reserve import Buffer, Pool, PoolError, PoolGroup, ReserveError
from support.threads import run_in_threads
from support.wait import wait_until

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


def test_emergency_without_a_group_never_uses_the_reserve(pool):
    with pool.alloc(BLOCK, emergency=True) as buf:
        assert buf.emergency is False
    group = pool.group(64 * 1024)
    group.connect()
    held = fill_to_watermark(pool)
    failures = pool.stats()["failures"]
    assert pool.alloc(BLOCK, emergency=True) is None
    # A group is charged only by emergency allocations.
    assert pool.alloc(BLOCK, group=group) is None
    assert group.stats()["usage"] == 0 and pool.stats()["failures"] == failures + 2
    release_all(held)


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


# The reserve: groups, the watermark, emergency allocation and usage accounting.


def fill_to_watermark(pool):
    """Take every normal block: afterwards free_bytes == watermark exactly."""
    held = []
    while (buf := pool.alloc(BLOCK)) is not None:
        held.append(buf)
    assert pool.stats()["free_bytes"] == pool.watermark
    return held


def release_all(buffers):
    for buf in buffers:
        buf.release()
    buffers.clear()


def connected_group(pool, reservation):
    group = pool.group(reservation)
    group.connect()
    return group


def test_group_starts_disconnected_with_zero_counters(pool):
    group = pool.group(64 * 1024)
    assert isinstance(group, PoolGroup) and group.reservation == 64 * 1024
    assert group.connected is False and pool.watermark == 0
    assert group.stats() == {
        "reservation": 64 * 1024,
        "usage": 0,
        "high_water": 0,
        "emergency_allocs": 0,
        "charge_failures": 0,
        "charge_waits": 0,
        "connected": False,
    }


def test_connect_raises_and_disconnect_lowers_the_watermark(pool):
    a, b = pool.group(64 * 1024), pool.group(192 * 1024)
    a.connect()
    assert pool.watermark == 64 * 1024 and a.connected
    b.connect()
    a.connect()  # already connected: the reservation is counted once
    assert pool.watermark == 256 * 1024
    a.disconnect()
    assert pool.watermark == 192 * 1024 and not a.connected
    a.disconnect()
    assert pool.watermark == 192 * 1024
    b.disconnect()
    assert pool.watermark == 0


def test_normal_allocations_stop_at_the_watermark_and_disconnect_frees_it(pool):
    group = connected_group(pool, 256 * 1024)
    held = fill_to_watermark(pool)
    assert pool.stats()["free_bytes"] == 256 * 1024
    assert pool.alloc(BLOCK) is None
    group.disconnect()
    # The reservation's bytes are normal memory again.
    buf = pool.alloc(BLOCK)
    assert buf is not None and buf.emergency is False
    held.append(buf)
    release_all(held)


def test_connect_refused_when_the_pool_cannot_cover_it_says_why():
    with Pool(MiB, lock="off", min_normal=512 * 1024) as p:
        first = connected_group(p, 400 * 1024)
        second = p.group(200 * 1024)
        with pytest.raises(ReserveError) as refused:
            second.connect()
        message = str(refused.value)
        # reservation, current watermark, pool size and min_normal, so an operator can act on it
        for number in (200 * 1024, 400 * 1024, MiB, 512 * 1024):
            assert str(number) in message, message
        assert "min_normal" in message and "watermark" in message
        assert isinstance(refused.value, PoolError)
        assert p.watermark == 400 * 1024 and not second.connected
        # Exactly size - min_normal is allowed.
        first.disconnect()
        exact = connected_group(p, 512 * 1024)
        assert p.watermark == 512 * 1024
        exact.disconnect()
        with pytest.raises(ReserveError):
            connected_group(p, 512 * 1024 + 1)


def test_min_normal_must_fit_the_pool():
    with pytest.raises(ValueError):
        Pool(MiB, lock="off", min_normal=MiB + 1)
    with Pool(MiB, lock="off", min_normal=MiB) as p:
        assert p.stats()["min_normal"] == MiB
        with pytest.raises(ReserveError):
            connected_group(p, BLOCK)


def test_emergency_alloc_uses_the_reserve_when_normal_memory_is_gone(pool):
    group = connected_group(pool, 64 * 1024)
    held = fill_to_watermark(pool)
    assert pool.alloc(BLOCK) is None
    buf = pool.alloc(5000, emergency=True, group=group)
    assert buf is not None and buf.emergency is True
    buf.view[:] = pattern(7, 5000)
    s, g = pool.stats(), group.stats()
    assert g["usage"] == 8192 and g["high_water"] == 8192 and g["emergency_allocs"] == 1
    assert s["emergency_allocs"] == 1 and s["emergency_in_use_bytes"] == 8192
    assert s["free_bytes"] == 64 * 1024 - 8192
    buf.release()
    assert group.stats()["usage"] == 0 and pool.stats()["emergency_in_use_bytes"] == 0
    release_all(held)


def test_emergency_alloc_is_normal_while_normal_memory_lasts(pool):
    group = connected_group(pool, 64 * 1024)
    with pool.alloc(BLOCK, emergency=True, group=group) as buf:
        assert buf.emergency is False
        assert group.stats()["usage"] == 0 and group.stats()["emergency_allocs"] == 0
        assert pool.stats()["emergency_in_use_bytes"] == 0


def test_a_group_never_holds_more_than_its_reservation(pool):
    group = connected_group(pool, 16 * 1024)
    other = connected_group(pool, 64 * 1024)
    held = fill_to_watermark(pool)
    # 80 KiB free below the watermark, but this group reserved 16 KiB of it.
    mine = [pool.alloc(BLOCK, emergency=True, group=group) for _ in range(4)]
    assert all(b.emergency for b in mine)
    assert pool.alloc(BLOCK, emergency=True, group=group) is None
    # A block larger than what is left of the reservation is refused whole.
    mine.pop().release()
    assert pool.alloc(2 * BLOCK, emergency=True, group=group) is None
    assert group.stats()["usage"] == 12 * 1024
    # The other group's reserve is untouched.
    theirs = pool.alloc(64 * 1024, emergency=True, group=other)
    assert theirs is not None and theirs.emergency
    release_all(mine)
    theirs.release()
    release_all(held)


def test_charges_never_exceed_reservations_under_many_threads():
    reservations = (64 * 1024, 160 * 1024)
    threads, rounds = 8, 1500
    with Pool(MiB, lock="off") as p:
        groups = [connected_group(p, r) for r in reservations]
        normal = fill_to_watermark(p)
        max_usage = [0, 0]
        usage_lock = threading.Lock()

        def worker(tid):
            group = groups[tid % 2]
            rng = random.Random(tid)
            held = []
            for i in range(rounds):
                if held and (len(held) >= 6 or rng.random() < 0.4):
                    buf, expected = held.pop(rng.randrange(len(held)))
                    assert buf.view == expected
                    buf.release()
                    continue
                size = rng.choice([BLOCK, 2 * BLOCK, 16 * 1024])
                buf = p.alloc(size, emergency=True, group=group, timeout=rng.choice([0, 0.001]))
                if buf is None:
                    continue
                assert buf.emergency, "normal memory is all held: only the reserve can serve"
                usage = group.stats()["usage"]
                assert usage <= group.reservation, (tid, usage)
                with usage_lock:
                    max_usage[tid % 2] = max(max_usage[tid % 2], usage)
                expected = pattern(tid << 32 | i, size)
                buf.view[:] = expected
                held.append((buf, expected))
            for buf, expected in held:
                assert buf.view == expected
                buf.release()

        run_in_threads(threads, worker)
        for group, observed in zip(groups, max_usage):
            s = group.stats()
            assert observed <= group.reservation and s["high_water"] <= group.reservation
            # The limit was reached and enforced, not merely never approached.
            assert s["high_water"] > group.reservation - 16 * 1024
            assert s["charge_failures"] > 0 and s["charge_waits"] > 0
            # Usage back to zero at idle.
            assert s["usage"] == 0
        s = p.stats()
        assert s["emergency_in_use_bytes"] == 0
        assert s["emergency_allocs"] == sum(g.stats()["emergency_allocs"] for g in groups) > 0
        release_all(normal)
        assert p.stats()["in_use_bytes"] == 0


def test_watermark_holds_under_many_threads():
    threads, rounds = 8, 2000
    with Pool(MiB, lock="off") as p:
        connected_group(p, 256 * 1024)
        watermark = p.watermark
        holding = threading.Barrier(threads)
        lowest_free = [p.size]

        def worker(tid):
            rng = random.Random(tid)
            held = []
            for _ in range(rounds):
                if held and (len(held) >= 8 or rng.random() < 0.45):
                    held.pop(rng.randrange(len(held))).release()
                    continue
                size = rng.choice([rng.randint(1, 8192), rng.randint(8193, 128 * 1024)])
                buf = p.alloc(size, timeout=rng.choice([0, 0.001]))
                if buf is None:
                    continue
                free = p.stats()["free_bytes"]
                assert free >= watermark, f"thread {tid}: free {free} below watermark {watermark}"
                assert buf.emergency is False
                held.append(buf)
                lowest_free[0] = min(lowest_free[0], free)
            # Everyone holding what they got: the end state respects it too.
            holding.wait()
            assert p.stats()["free_bytes"] >= watermark
            holding.wait()
            for buf in held:
                buf.release()

        run_in_threads(threads, worker)
        s = p.stats()
        # The threads pressed against the watermark: blocks were refused for it.
        assert s["failures"] > 0 and s["waits"] > 0
        assert lowest_free[0] < watermark + 128 * 1024
        assert s["in_use_bytes"] == 0 and s["emergency_allocs"] == 0


def reserve_exhausted(pool, reservation):
    """A pool whose normal memory is all held and whose one group's reservation is full."""
    group = connected_group(pool, reservation)
    normal = fill_to_watermark(pool)
    reserve = [pool.alloc(BLOCK, emergency=True, group=group) for _ in range(reservation // BLOCK)]
    assert all(b.emergency for b in reserve)
    return group, normal, reserve


def test_charge_over_reservation_fails_at_once_with_timeout_zero(pool):
    group, normal, reserve = reserve_exhausted(pool, 32 * 1024)
    start = time.monotonic()
    assert pool.alloc(BLOCK, emergency=True, group=group, timeout=0) is None
    assert time.monotonic() - start < 0.5
    g, s = group.stats(), pool.stats()
    assert g["charge_failures"] == 1 and g["charge_waits"] == 0
    # The group's reservation was the limit, not the pool's.
    assert s["failures"] == 1  # the one alloc that ended fill_to_watermark
    release_all(reserve)
    release_all(normal)


def test_charge_waits_until_the_groups_usage_drops(pool):
    group, normal, reserve = reserve_exhausted(pool, 32 * 1024)
    got = []
    waiter = threading.Thread(
        target=lambda: got.append(pool.alloc(BLOCK, emergency=True, group=group, timeout=5.0))
    )
    start = time.monotonic()
    waiter.start()
    wait_until(lambda: group.stats()["charge_waits"] == 1)
    reserve.pop().release()
    waiter.join(timeout=5)
    assert not waiter.is_alive() and time.monotonic() - start < 4
    assert got[0] is not None and got[0].emergency
    g = group.stats()
    assert g["charge_waits"] == 1 and g["charge_failures"] == 0
    assert g["usage"] == 32 * 1024
    got[0].release()
    release_all(reserve)
    release_all(normal)


def test_bounded_charge_wait_expires_and_counts(pool):
    group, normal, reserve = reserve_exhausted(pool, 32 * 1024)
    start = time.monotonic()
    assert pool.alloc(BLOCK, emergency=True, group=group, timeout=0.2) is None
    assert time.monotonic() - start >= 0.2
    g = group.stats()
    assert g["charge_waits"] == 1 and g["charge_failures"] == 1
    assert g["usage"] == 32 * 1024
    release_all(reserve)
    release_all(normal)


def test_normal_alloc_waits_and_is_woken_when_free_rises_above_the_watermark(pool):
    connected_group(pool, 256 * 1024)
    held = fill_to_watermark(pool)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.alloc(BLOCK, timeout=5.0)))
    start = time.monotonic()
    waiter.start()
    wait_until(lambda: pool.stats()["waits"] == 1)
    assert not got
    held.pop().release()
    waiter.join(timeout=5)
    assert not waiter.is_alive() and time.monotonic() - start < 4
    assert got[0] is not None and got[0].emergency is False
    assert pool.stats()["free_bytes"] == pool.watermark
    got[0].release()
    release_all(held)


def test_normal_alloc_waiting_is_woken_by_a_disconnect(pool):
    group = connected_group(pool, 256 * 1024)
    held = fill_to_watermark(pool)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.alloc(BLOCK, timeout=5.0)))
    start = time.monotonic()
    waiter.start()
    wait_until(lambda: pool.stats()["waits"] == 1)
    group.disconnect()
    waiter.join(timeout=5)
    assert not waiter.is_alive() and time.monotonic() - start < 4
    assert got[0] is not None
    got[0].release()
    release_all(held)


def test_emergency_waiter_is_woken_when_its_group_connects(pool):
    keeper = connected_group(pool, 64 * 1024)
    group = pool.group(32 * 1024)
    normal = fill_to_watermark(pool)
    got = []
    waiter = threading.Thread(
        target=lambda: got.append(pool.alloc(BLOCK, emergency=True, group=group, timeout=5.0))
    )
    start = time.monotonic()
    waiter.start()
    # Not connected: the pool, not the group's reservation, stopped it.
    wait_until(lambda: pool.stats()["waits"] == 1)
    assert group.stats()["charge_waits"] == 0
    group.connect()
    waiter.join(timeout=5)
    # Woken by the connect, not by its timeout's last try.
    assert not waiter.is_alive() and time.monotonic() - start < 4
    assert got[0] is not None and got[0].emergency
    assert group.stats()["usage"] == BLOCK and keeper.stats()["usage"] == 0
    got[0].release()
    release_all(normal)


def test_a_disconnected_group_cannot_use_the_reserve(pool):
    connected_group(pool, 64 * 1024)
    idle = pool.group(64 * 1024)
    held = fill_to_watermark(pool)
    assert pool.alloc(BLOCK, emergency=True, group=idle) is None
    assert idle.stats()["usage"] == 0 and idle.stats()["charge_failures"] == 0
    assert pool.stats()["emergency_allocs"] == 0
    release_all(held)


def test_disconnect_keeps_charges_until_the_blocks_are_freed(pool):
    group, normal, reserve = reserve_exhausted(pool, 32 * 1024)
    group.disconnect()
    assert pool.watermark == 0 and group.stats()["usage"] == 32 * 1024
    # Disconnected: no new reserve blocks, even with the reservation's room freed.
    reserve.pop().release()
    assert group.stats()["usage"] == 28 * 1024
    release_all(reserve)
    assert group.stats()["usage"] == 0
    assert pool.stats()["emergency_in_use_bytes"] == 0
    release_all(normal)


def test_destroy_refused_while_connected_or_holding_reserve_memory(pool):
    group, normal, reserve = reserve_exhausted(pool, 16 * 1024)
    with pytest.raises(PoolError, match="connected"):
        group.destroy()
    group.disconnect()
    with pytest.raises(PoolError, match=f"usage {16 * 1024} bytes"):
        group.destroy()
    release_all(reserve)
    group.destroy()
    for action in (group.connect, group.disconnect, group.stats, group.destroy):
        with pytest.raises(PoolError, match="destroyed"):
            action()
    with pytest.raises(PoolError, match="destroyed"):
        pool.alloc(BLOCK, emergency=True, group=group)
    release_all(normal)


def test_destroy_refused_while_an_allocation_waits_on_the_group(pool):
    connected_group(pool, 64 * 1024)  # keeps the watermark up once `group` disconnects
    group = connected_group(pool, 16 * 1024)
    normal = fill_to_watermark(pool)
    reserve = [pool.alloc(BLOCK, emergency=True, group=group) for _ in range(4)]
    got = []
    # 32 KiB: more than the group may charge, and more than the pool has above
    # the watermark even once the group's reserve blocks are back.
    waiter = threading.Thread(
        target=lambda: got.append(
            pool.alloc(32 * 1024, emergency=True, group=group, timeout=5.0)
        )
    )
    waiter.start()
    wait_until(lambda: group.stats()["charge_waits"] == 1)
    group.disconnect()
    release_all(reserve)
    assert group.stats()["usage"] == 0
    # Disconnected and idle, but a waiter will look at the group again when it wakes.
    with pytest.raises(PoolError, match="awaited"):
        group.destroy()
    for _ in range(4):
        normal.pop().release()
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    assert got[0] is not None and not got[0].emergency
    got[0].release()
    group.destroy()
    release_all(normal)


def test_group_table_is_bounded_and_a_destroyed_id_stays_dead():
    with Pool(MiB, lock="off") as p:
        groups = [p.group(0) for _ in range(p.max_groups)]
        assert len({g.id for g in groups}) == p.max_groups
        with pytest.raises(ReserveError, match="no group slot"):
            p.group(0)
        stale = groups[5]
        stale.destroy()
        fresh = p.group(BLOCK)  # the only free slot: the one `stale` had
        with pytest.raises(ReserveError, match="no group slot"):
            p.group(0)
        # The old id must not name the group now in its slot.
        for action in (stale.connect, stale.disconnect, stale.stats, stale.destroy):
            with pytest.raises(PoolError, match="destroyed"):
                action()
        with pytest.raises(PoolError, match="destroyed"):
            p.alloc(BLOCK, emergency=True, group=stale)
        assert fresh.stats()["connected"] is False and p.watermark == 0
        fresh.connect()
        assert p.watermark == BLOCK


def test_group_belongs_to_its_pool(pool):
    with Pool(MiB, lock="off") as other:
        foreign = connected_group(other, BLOCK)
        with pytest.raises(ValueError, match="another pool"):
            pool.alloc(BLOCK, emergency=True, group=foreign)
        foreign.disconnect()
