"""The reserve machinery end to end, against a real netswapd and real libnbd clients:
`netswapd reserve`, attach refusal, a node swapping while a non-swap export is flooded,
and the emergency drop rule."""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time

import pytest

from netswap.nbd import constants as C
from support.daemon import REPO, start_daemon
from support.libnbd import import_libnbd
from support.metrics import samples
from support.nbd_raw import connect_raw, read_option_reply, send_option
from support.reserve import (
    BIG_DISK, SMALL_NBD, SMALL_POOL, SMALL_SWAP, final_counters, flood, swap_node_io,
)

nbd = import_libnbd()

MiB = 1 << 20
KiB = 1 << 10

def small_daemon(tmp_path, policy="wait", swap_extra=""):
    return start_daemon(
        tmp_path,
        exports=BIG_DISK,
        pool_options=SMALL_POOL.format(policy=policy),
        swap_options=SMALL_SWAP.format(extra=swap_extra),
        nbd_options=SMALL_NBD,
    )


def test_reserve_command_prints_the_tree_and_the_pool(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[swap]\nmax_nodes = 4\n'
                      '[pool]\nnormal_budget = "64MiB"\nheadroom = "8MiB"\n')
    result = subprocess.run([sys.executable, "-m", "netswap", "reserve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for group in ("netswapd", "normal", "nbd", "unrouted", "swap/<node> ×4", "requests", "windows"):
        assert group in out, out
    # 64 MiB normal + 4 MiB unrouted + 4 × (4 MiB + 4 × 64 KiB) + 8 MiB headroom
    expected = (64 + 4 + 4 * 4 + 1 + 8) * MiB
    assert f"pool: {expected} bytes" in out, out
    assert "protection" in out


def test_explicit_pool_too_small_for_the_tree_is_a_config_error(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[pool]\nsize = "64MiB"\n')
    result = subprocess.run([sys.executable, "-m", "netswap", "reserve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "pool.size" in result.stderr and "auto" in result.stderr


def test_attach_past_max_nodes_is_refused_with_the_reason(tmp_path):
    # max_nodes sizes the pool, so a live daemon refuses a node past it before the pool
    # would (the pool's own refusal: tests/unit/test_reserve_tree.py).
    daemon = small_daemon(tmp_path)
    try:
        a, b = nbd.NBD(), nbd.NBD()
        a.connect_uri(daemon.uri("swap/node-a"))
        b.connect_uri(daemon.uri("swap/node-b"))
        c = nbd.NBD()
        with pytest.raises(nbd.Error) as err:
            c.connect_uri(daemon.uri("swap/node-c"))
        assert "policy" in str(err.value), err.value
        # The reply says why (libnbd keeps the text to its debug log, so read it raw).
        sock = connect_raw(daemon)
        name = b"swap/node-c"
        send_option(sock, C.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        _, reply_type, message = read_option_reply(sock)
        assert reply_type == C.REP_ERR_POLICY and b"node slots" in message, message
        sock.close()
        assert "refusing swap attach of node 'node-c'" in daemon.log()
        # A second connection of an attached node shares its reserve: not refused.
        a2 = nbd.NBD()
        a2.connect_uri(daemon.uri("swap/node-a"))
        a2.shutdown()
        # node-b detaches (disconnect + grace period): its reserve frees room for node-c.
        b.shutdown()
        deadline = time.monotonic() + 10
        while "node 'node-b' detached" not in daemon.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        c = nbd.NBD()
        c.connect_uri(daemon.uri("swap/node-c"))
        c.pwrite(b"x" * 4096, 0)
        c.shutdown()
        a.shutdown()
    finally:
        assert daemon.stop() == 0, daemon.log()
    events = final_counters(daemon)["events"]
    assert events["attach_refused{max_nodes}"] == 2  # libnbd's attempt and the raw one
    assert events["swap_attaches"] == 3


def emergency_allocations(daemon) -> float:
    return samples(daemon.metrics())[("netswap_emergency_allocations_total", ())]


@pytest.mark.parametrize("policy", ["wait", "enomem"])
def test_swap_node_keeps_going_while_a_non_swap_export_is_flooded(tmp_path, policy):
    daemon = small_daemon(tmp_path, policy)
    stop = threading.Event()
    results = []
    flooders = [threading.Thread(target=flood, args=(daemon.uri("disk"), i * 32 * MiB, stop, results))
                for i in range(4)]
    try:
        for t in flooders:
            t.start()
        time.sleep(1)  # let the flood fill the normal budget
        completed = swap_node_io(daemon.uri("swap/busy-node"),
                                 until=lambda: emergency_allocations(daemon) > 0)
        stop.set()
        for t in flooders:
            t.join(60)
        # Nothing acknowledged was lost on the non-swap export.
        h = nbd.NBD()
        h.connect_uri(daemon.uri("disk"))
        for acked, _ in results:
            for position, data in acked.items():
                assert h.pread(len(data), position) == data
        h.shutdown()
    finally:
        stop.set()
        code = daemon.stop()
    assert code == 0, daemon.log()
    counters = final_counters(daemon)
    pool, events = counters["pool"], counters["events"]
    assert completed >= 400
    # The swap node drew on its reserve because the flood had taken the normal budget...
    assert pool["emergency_allocs"] > 0, counters
    # ...and the non-swap clients were held back (wait) or refused (enomem), never given the reserve.
    if policy == "wait":
        assert events.get("pool_waits{non_swap}", 0) > 0, counters
        assert all(failed == 0 for _, failed in results)
    else:
        assert events.get("enomem{disk}", 0) > 0, counters
        assert sum(failed for _, failed in results) == events["enomem{disk}"]
    assert pool["in_use_bytes"] == 0 and pool["emergency_in_use_bytes"] == 0
    print(f"\nflood ({policy}): swap requests completed {completed * 2}, "
          f"emergency allocations {pool['emergency_allocs']}, "
          f"non-swap waits {events.get('pool_waits{non_swap}', 0)}, "
          f"non-swap ENOMEM {events.get('enomem{disk}', 0)}")


def test_reserve_memory_bound_for_a_non_swap_export_is_dropped_and_counted(tmp_path):
    # Loopback IPv4 peers are swap nodes by address, so their sockets are tagged at accept,
    # before their export is known. One of them then uses the non-swap export "disk" while
    # an untagged IPv6 client floods the normal budget away: what the tagged connection
    # receives into the reserve turns out to be for a non-swap consumer and must be dropped.
    daemon = small_daemon(tmp_path, "wait", swap_extra='node_networks = ["127.0.0.0/8"]')
    stop = threading.Event()
    results = []
    flooders = [threading.Thread(target=flood, args=(f"nbd://[::1]:{daemon.port}/disk", i * 32 * MiB,
                                                      stop, results))
                for i in range(4)]
    dropped_positions, acked_positions = [], []
    try:
        for t in flooders:
            t.start()
        time.sleep(1)
        h = nbd.NBD()
        h.connect_uri(daemon.uri("disk"))
        region = 128 * MiB
        # Until a few writes were dropped (the flood must win the race for the normal
        # budget at the right instants), at least 200, at most 30 s.
        i = 0
        end = time.monotonic() + 30
        while i < 200 or (len(dropped_positions) < 3 and time.monotonic() < end):
            i += 1
            position = region + (i % 16) * 64 * KiB
            try:
                h.pwrite(bytes([i % 251 + 1]) * (64 * KiB), position)
                acked_positions.append((position, i))
            except nbd.Error as exc:
                assert exc.errno == "ENOMEM", exc
                dropped_positions.append(position)
        stop.set()
        for t in flooders:
            t.join(60)
        # Every acknowledged write is there; a dropped one never overwrote a later state.
        latest = {}
        for position, i in acked_positions:
            latest[position] = i
        for position, i in latest.items():
            assert h.pread(64 * KiB, position) == bytes([i % 251 + 1]) * (64 * KiB)
        h.shutdown()
        exported = samples(daemon.metrics())
    finally:
        stop.set()
        code = daemon.stop()
    assert code == 0, daemon.log()
    events = final_counters(daemon)["events"]
    assert dropped_positions, "the flood never pushed the tagged connection into the reserve"
    assert events["emergency_dropped{disk}"] == len(dropped_positions)
    assert exported[("netswap_emergency_dropped_total", (("consumer", "disk"),))] == len(dropped_positions)
    assert events["connections_tagged"] >= 1
    writes = len(dropped_positions) + len(acked_positions)
    print(f"\ndrop rule: {len(dropped_positions)} of {writes} writes dropped, {len(acked_positions)} acked")


def test_memory_pressure_throttles_non_swap_exports_and_not_swap(tmp_path):
    # Thresholds no machine can satisfy: emergency mode from the first reading.
    daemon = start_daemon(tmp_path, pressure_options="""
        interval = "100ms"
        available_enter = "1TiB"
        available_exit = "2TiB"
    """)
    try:
        deadline = time.monotonic() + 10
        while "emergency" not in daemon.log().lower() and time.monotonic() < deadline:
            time.sleep(0.05)
        swap = nbd.NBD()
        swap.connect_uri(daemon.uri("swap/calm-node"))
        disk = nbd.NBD()
        disk.connect_uri(daemon.uri("disk"))
        for i in range(20):
            swap.pwrite(b"s" * 4096, i * 4096)
            disk.pwrite(b"d" * 4096, i * 4096)
        assert disk.pread(4096, 0) == b"d" * 4096 and swap.pread(4096, 0) == b"s" * 4096
        swap.shutdown()
        disk.shutdown()
    finally:
        assert daemon.stop() == 0, daemon.log()
    events = final_counters(daemon)["events"]
    assert events["pressure_throttled{disk}"] >= 20  # every non-swap request went through the gate
    assert not any(key.startswith("pressure_throttled{swap/") for key in events)
