"""The daemon's footprint is a function of its configuration, not of its load: run netswapd
inside a memory cgroup barely above that footprint, flood it, and it is not OOM-killed,
swap traffic keeps completing, and its RSS stays at pool + a fixed overhead."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from support.daemon import start_daemon
from support.libnbd import import_libnbd
from support.reserve import (
    BIG_DISK, SMALL_NBD, SMALL_POOL, SMALL_SWAP, final_counters, flood, swap_node_io,
)
from support.swapnode import memory_cgroup

nbd = import_libnbd()
MiB = 1 << 20

# Python, its threads and libraries: what the daemon needs beside the pool. Measured at about
# 30 MiB here; the limit leaves room for the page cache of the file exports, which the
# kernel reclaims (writes it back) rather than OOM-killing for it.
OVERHEAD = 48 * MiB


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_daemon_in_a_tight_memory_cgroup_survives_a_flood(tmp_path):
    with memory_cgroup(limit=1 << 40) as group:  # the real limit is set once the pool is known
        daemon = start_daemon(
            tmp_path,
            exports=BIG_DISK,
            pool_options=SMALL_POOL.format(policy="wait"),
            swap_options=SMALL_SWAP.format(extra=""),
            nbd_options=SMALL_NBD,
            cgroup=group,
        )
        try:
            pid = daemon.process.pid
            pool_bytes = int(re.search(r"netswap: pool: (\d+) bytes", daemon.log()).group(1))
            limit = pool_bytes + OVERHEAD
            (group / "memory.limit_in_bytes").write_text(str(limit))

            stop = threading.Event()
            results = []
            flooders = [threading.Thread(target=flood, args=(daemon.uri("disk"), i * 32 * MiB, stop, results))
                        for i in range(4)]
            for t in flooders:
                t.start()
            completed = 0
            deadline = time.monotonic() + 8
            peak_rss = 0
            while time.monotonic() < deadline:
                completed += swap_node_io(daemon.uri("swap/tight-node"), rounds=50)
                peak_rss = max(peak_rss, status_kib(pid, "VmRSS") * 1024)
            stop.set()
            for t in flooders:
                t.join(60)
            assert daemon.process.poll() is None, "netswapd died under the flood"
            oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
            assert int(oom.get("oom_kill", 0)) == 0, oom
            failcnt = int((group / "memory.failcnt").read_text())
        finally:
            code = daemon.stop()
    assert code == 0, daemon.log()
    assert completed > 0
    assert peak_rss <= pool_bytes + OVERHEAD, (peak_rss, pool_bytes)
    counters = final_counters(daemon)
    print(f"\ncgroup limit {limit >> 20} MiB (pool {pool_bytes >> 20} MiB + {OVERHEAD >> 20} MiB): "
          f"peak RSS {peak_rss / MiB:.1f} MiB, {completed * 2} swap requests, "
          f"limit hits (failcnt) {failcnt}, emergency allocations {counters['pool']['emergency_allocs']}")
