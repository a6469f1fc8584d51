"""The squeeze, the seed's promise and Gorman's acceptance test for swap over NBD: netswapd in a
memory cgroup limited to its own footprint + 10 %, a non-swap flood that really exhausts its
normal budget, and a real node swapping three times its memory through it all.

Every page must come back, netswapd must not be OOM-killed, the node's swap traffic must have
drawn on the emergency reserve while the flood's requests were held back (netswapd's /metrics).

With NETSWAP_SQUEEZE_BASELINE=1 (bench/squeeze.py sets it) the node first runs the same
workload without the flood, in the same cgroup, and the ratio of the two times is printed: a
ratio of timings on a shared machine, never asserted, and a TCG node's minute the suite's
20-minute budget does not pay for.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from node.lab import THREE_TIMES_MEMORY_MIB, readme_commands, workload
from support.swapnode import memory_cgroup

MiB = 1 << 20
DATA_MIB = THREE_TIMES_MEMORY_MIB
HANG_GUARD = 900  # seconds: not a timing check
FLOOD = Path(__file__).with_name("flood.py")
# A server sized for this one node (the pool holds the reserve of max_nodes nodes, and the
# reserve of nodes not attached is normal memory), with a normal budget the flood's four
# connections (32 FUA writes of 64 KiB in flight each) want twice over; "wait": what finds
# it gone is held back, never given the reserve.
SWAP = "max_nodes = 1"
POOL = """
normal_budget = "4MiB"
headroom = "1MiB"
non_swap_exhausted = "wait"
"""
NBD = 'max_request = "1MiB"'  # the budget must hold one request of the largest size
BASELINE = os.environ.get("NETSWAP_SQUEEZE_BASELINE") == "1"
LABELS = ("unloaded", "loaded") if BASELINE else ("loaded",)


def total(daemon, name: str) -> float:
    """The sum of a metric's samples over all their labels."""
    return sum(sample.value for family in text_string_to_metric_families(daemon.metrics())
               for sample in family.samples if sample.name == name)


def swap_seconds(console: str, label: str) -> float:
    """Seconds the workload run labelled `label` took to write and check its pages."""
    run = re.search(rf"^run {label}$(.*?)^run {label} status", console, re.MULTILINE | re.DOTALL)
    written = float(re.search(r"^written \d+ MiB in ([\d.]+) s", run.group(1), re.MULTILINE)[1])
    checked = float(re.search(r"^checked in ([\d.]+) s", run.group(1), re.MULTILINE)[1])
    return written + checked


def test_a_node_swaps_through_a_squeezed_flooded_netswapd(lab):
    with memory_cgroup(1 << 40) as group:  # the limit is set once the footprint is known
        lab = lab(["squeezed"])
        try:
            run(lab, group)
        finally:
            lab.close()  # netswapd out of the cgroup before it is removed


def run(lab, group: Path) -> None:
    daemon = lab.start_daemon(cgroup=group, pool_options=POOL, nbd_options=NBD, swap_options=SWAP)
    runs = "\n".join(f"""
hold {label}
echo "run {label}"
{workload(DATA_MIB)}
echo "run {label} status $?"
""" for label in LABELS)
    node = lab.boot("squeezed", f"""
set -e
{readme_commands("nbd", lab.server)}
set +e
{runs}
swapoff /dev/nbd0 && nbd-client -d /dev/nbd0 && echo "swap detached"
""")
    node.held(LABELS[0], HANG_GUARD)
    # The footprint: the pool (locked), Python and what the node's attach made, at rest.
    footprint = int((group / "memory.usage_in_bytes").read_text())
    limit = footprint + footprint // 10
    (group / "memory.limit_in_bytes").write_text(str(limit))
    if BASELINE:
        node.release("unloaded")
        node.held("loaded", HANG_GUARD)
    flood = subprocess.Popen([sys.executable, str(FLOOD), daemon.unix_uri("disk")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while total(daemon, "netswap_held_back_total") == 0:
            assert flood.poll() is None, flood.stdout.read()
            assert time.monotonic() < deadline, "the flood never exhausted the normal budget"
            time.sleep(0.2)
        emergency_before = total(daemon, "netswap_emergency_allocations_total")
        node.release("loaded")
        node.wait_for(r"^run loaded status \d+$", HANG_GUARD)
        emergency = total(daemon, "netswap_emergency_allocations_total") - emergency_before
        held_back = total(daemon, "netswap_held_back_total")
    finally:
        flood.terminate()
        flood_output = flood.communicate(timeout=120)[0]
    result = node.wait(HANG_GUARD)
    print(result)
    print(flood_output)

    assert daemon.process.poll() is None, "netswapd died in the squeeze"
    oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
    assert int(oom.get("oom_kill", 0)) == 0, oom
    console = result.console
    for label in LABELS:
        assert re.search(rf"^run {label} status 0$", console, re.MULTILINE), result
    assert console.count("bad pages: 0") == len(LABELS), result
    assert "swap detached" in console, result
    assert emergency > 0, "the node's swap never needed the reserve: the flood did not squeeze"
    assert held_back > 0
    assert re.search(r"^flood: [1-9]\d* acknowledged", flood_output, re.MULTILINE), flood_output
    failcnt = int((group / "memory.failcnt").read_text())
    loaded = swap_seconds(console, "loaded")
    timing = f"under the flood {loaded:.1f} s"
    if BASELINE:
        unloaded = swap_seconds(console, "unloaded")
        timing = f"unloaded {unloaded:.1f} s, {timing} ({loaded / unloaded:.2f}x)"
    print(f"\nsqueeze: cgroup limit {limit / MiB:.1f} MiB (footprint {footprint / MiB:.1f} MiB "
          f"+ 10 %), limit hits {failcnt}; {DATA_MIB} MiB swapped out and checked: "
          f"{timing}; emergency allocations {emergency:.0f}, "
          f"non-swap requests held back {held_back:.0f}")
