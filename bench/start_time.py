#!/usr/bin/env python3
"""How long netswapd takes to start, by pool size: from the start of the process to

- listening: "listening on" in its log (tests/support/daemon.py's start_daemon, as the tests see it);
- swap attach: a swap node's NBD handshake to swap/bench completes (libnbd), started as soon
  as the daemon listens: what a node reconnecting after a restart waits for, its reserve
  backed (faulted in and locked) included;
- faulted in: the whole pool is faulted in and locked ("faulted in" in the log).

Each pool size is started --runs times (3 by default); the table shows the medians, and the
spread (min-max) of the listening time. Run as root to get the pool locked as in production
(pool.lock = "best-effort"; unlocked otherwise). Needs the same python3 that can import netswap
and libnbd's Python binding (Debian's python3-libnbd), like the tests.

    python3 bench/start_time.py
    python3 bench/start_time.py --sizes 256MiB,1GiB,4GiB,16GiB --runs 5
    python3 bench/start_time.py --pause 30    # cold memory on a VM (see below)

On a virtual machine the first touch of guest memory the host has not backed yet (or took
back: free page reporting, ballooning) costs far more than zeroing a page; the faulted-in
column then depends on what ran before. The listening column does not depend on it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from support.daemon import start_daemon  # noqa: E402
from support.libnbd import import_libnbd  # noqa: E402

DEFAULT_SIZES = ("256MiB", "1GiB", "4GiB")
NODE = "bench"


def wait_for_log(daemon, pattern: str, timeout: float) -> float:
    """The monotonic time at which `pattern` (a regex) was first seen in the daemon's log."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, daemon.log()):
        if daemon.process.poll() is not None:
            raise RuntimeError(f"netswapd exited with {daemon.process.returncode}:\n{daemon.log()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {pattern!r} in the log after {timeout} s:\n{daemon.log()}")
        time.sleep(0.005)
    return time.monotonic()


def one_start(pool: str, nbd) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="netswap-start-"))
    try:
        started = time.monotonic()
        daemon = start_daemon(tmp, pool=pool)
        listening = time.monotonic()
        try:
            client = nbd.NBD()
            client.connect_uri(daemon.uri(f"swap/{NODE}"))
            attached = time.monotonic()
            # A netswapd that faults the pool in before it listens (before the background
            # prefault) does not log it: faulted in when listening.
            faulted = (wait_for_log(daemon, r"pool: \d+ bytes faulted in", timeout=600)
                       if "in the background" in daemon.log() else listening)
            client.shutdown()
        finally:
            code = daemon.stop()
        if code != 0:
            raise RuntimeError(f"netswapd exited with {code}:\n{daemon.log()[-3000:]}")
        return {"listening": listening - started, "attach": attached - started,
                "faulted": faulted - started}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES),
                        help="pool sizes, comma-separated (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="starts per size (default: 3)")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds to wait before each start (default: 0); on a VM with free "
                             "page reporting, 30 lets the host take the last run's memory back, "
                             "so that every start faults in cold memory")
    args = parser.parse_args()
    nbd = import_libnbd()
    sizes = [size.strip() for size in args.sizes.split(",") if size.strip()]

    results: dict[str, list[dict[str, float]]] = {size: [] for size in sizes}
    # Sizes interleaved over the runs, so that drift (other load, the host's memory) hits
    # every size alike.
    for run in range(args.runs):
        for size in sizes:
            time.sleep(args.pause)
            result = one_start(size, nbd)
            results[size].append(result)
            print(f"run {run + 1}/{args.runs} pool {size}: listening {result['listening']:.2f} s, "
                  f"swap attach {result['attach']:.2f} s, faulted in {result['faulted']:.2f} s",
                  file=sys.stderr, flush=True)

    print(f"\nnetswapd start, median of {args.runs} runs (seconds from process start)\n")
    print("| pool | listening | listening min-max | swap attach | pool faulted in |")
    print("|---|---:|---:|---:|---:|")
    for size in sizes:
        runs = results[size]
        listening = [r["listening"] for r in runs]
        print(f"| {size} | {statistics.median(listening):.2f} | "
              f"{min(listening):.2f}-{max(listening):.2f} | "
              f"{statistics.median(r['attach'] for r in runs):.2f} | "
              f"{statistics.median(r['faulted'] for r in runs):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
