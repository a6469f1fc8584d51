"""The node's workload: fill SIZE bytes of anonymous memory, each 4 KiB page stamped with
this node's name and the page's index, then read every page back and count the ones that
are not what was written. Run on a node (host python over 9p) with more data than memory,
so most pages go out to swap and come back in.

    python3 pages.py SIZE_MIB [--rounds N] [--probe LABEL ...]

Prints "progress <percent>" while writing, "written", then "bad pages: N" after each round
of checks (zeros and another node's pages are bad pages too), and exits 1 if any was bad.
Unbuffered prints straight to the console: no pipe to a process that could be swapped out.

Each --probe, between writing and checking, holds (as the harness's `hold LABEL`) and then
times the swap-in of single pages written long ago, one at a time: "swap-in LABEL: ...".
"""

import argparse
import mmap
import os
import random
import socket
import struct
import sys
import time
import zlib

PAGE = 4096
PROBE_PAGES = 400
JOB = "/run/job"  # the harness's job share: release-<label> files appear there


def node_key(name: str) -> int:
    """What stamps a node's pages: a CRC of its name, never 0 (so never a page of zeros)."""
    return zlib.crc32(name.encode()) | 1 << 40


def stamp(key: int, index: int) -> bytes:
    # 16 bytes repeated: the node (a CRC of its name) and the page index. A page of zeros,
    # another node's page or another index's page all differ from it.
    return struct.pack("<QQ", key, index) * (PAGE // 16)


def hold(label: str) -> None:
    print(f"hold {label}", flush=True)
    while not os.path.exists(f"{JOB}/release-{label}"):
        time.sleep(0.2)


def latencies(area: mmap.mmap, sample: list[int]) -> str:
    """Time a one-byte read of each page in `sample`: a major fault where it is swapped out."""
    times = []
    for index in sample:
        started = time.perf_counter()
        area[index * PAGE]
        times.append(time.perf_counter() - started)
    times.sort()
    def ms(q: float) -> str:
        return f"{1000 * times[min(len(times) - 1, int(q * len(times)))]:.2f}"
    return f"n={len(times)} p50={ms(0.5)} ms p90={ms(0.9)} ms p99={ms(0.99)} ms max={ms(1)} ms"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("size_mib", type=int)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--probe", action="append", default=[])
    args = parser.parse_args()
    pages = args.size_mib * 256
    key = node_key(socket.gethostname())
    area = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    started = time.monotonic()
    step = max(1, pages // 10)
    stall = 0.0  # the longest one page took: what a server's absence cost the workload
    for index in range(pages):
        before = time.monotonic()
        area[index * PAGE:(index + 1) * PAGE] = stamp(key, index)
        stall = max(stall, time.monotonic() - before)
        if index % step == step - 1:
            print(f"progress {100 * (index + 1) // pages}", flush=True)
    print(f"written {args.size_mib} MiB in {time.monotonic() - started:.1f} s", flush=True)
    print(f"longest page write: {stall:.2f} s", flush=True)
    # The oldest half of the pages is the most likely to be out; each probe takes its own.
    candidates = random.Random(pages).sample(range(pages // 2), len(args.probe) * PROBE_PAGES)
    for number, label in enumerate(args.probe):
        hold(label)
        sample = candidates[number * PROBE_PAGES:(number + 1) * PROBE_PAGES]
        print(f"swap-in {label}: {latencies(area, sample)}", flush=True)
    total_bad = 0
    for round_ in range(args.rounds):
        started = time.monotonic()
        bad = 0
        stall = 0.0
        for index in range(pages):
            before = time.monotonic()
            bad += area[index * PAGE:(index + 1) * PAGE] != stamp(key, index)
            stall = max(stall, time.monotonic() - before)
        total_bad += bad
        print(f"checked in {time.monotonic() - started:.1f} s", flush=True)
        print(f"longest page read: {stall:.2f} s", flush=True)
        print(f"bad pages: {bad}", flush=True)
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())


def stamps_in(path) -> dict[int, int]:
    """How many pages of each node key a swap image holds (server side: a swapped-out page is
    stored as it was in the node's memory)."""
    found: dict[int, int] = {}
    with open(path, "rb") as image:
        while chunk := image.read(1 << 20):
            for offset in range(0, len(chunk), PAGE):
                head = chunk[offset:offset + 16]
                if head != bytes(16) and chunk[offset:offset + PAGE] == head * (PAGE // 16):
                    key = struct.unpack("<Q", head[:8])[0]
                    found[key] = found.get(key, 0) + 1
    return found
