#!/usr/bin/env python3
"""The squeeze with its baseline: what the flood costs a real node swapping through netswapd.

Runs tests/node/test_node_squeeze.py (netswapd in a memory cgroup of its own footprint + 10 %,
a real node kernel under qemu swapping three times its memory, a non-swap flood exhausting the
normal budget) with NETSWAP_SQUEEZE_BASELINE=1, so the node first runs the same workload
without the flood, in the same cgroup, and prints both times and their ratio. The suite runs
only the loaded half (its checks: every page back, no OOM kill, the reserve drawn on, the
flood held back); the ratio of two timings belongs here, repeated, not in a test.

    python3 bench/squeeze.py               # 3 repeats
    python3 bench/squeeze.py --repeats 1
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST = "tests/node/test_node_squeeze.py"
SUMMARY = re.compile(r"^squeeze: .*unloaded ([\d.]+) s, under the flood ([\d.]+) s.*$",
                     re.MULTILINE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    environment = dict(os.environ, NETSWAP_SQUEEZE_BASELINE="1")
    rows = []
    for repeat in range(1, args.repeats + 1):
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", TEST], cwd=REPO,
                             env=environment, capture_output=True, text=True)
        found = SUMMARY.search(run.stdout)
        if run.returncode != 0 or found is None:
            sys.stdout.write(run.stdout[-20000:] + run.stderr[-5000:])
            print(f"repeat {repeat}: the squeeze failed (exit {run.returncode})")
            return 1
        print(found.group(0))
        rows.append((float(found.group(1)), float(found.group(2))))
    unloaded = statistics.median(u for u, _ in rows)
    loaded = statistics.median(l for _, l in rows)
    ratio = statistics.median(l / u for u, l in rows)
    print("\n| repeats | unloaded s (median) | under the flood s (median) | ratio (median) |")
    print("|---:|---:|---:|---:|")
    print(f"| {len(rows)} | {unloaded:.1f} | {loaded:.1f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
