"""The node's workload: fill SIZE bytes of anonymous memory, each 4 KiB page stamped with
this node's name and the page's index, then read every page back and count the ones that
are not what was written. Run on a node (host python over 9p) with more data than memory,
so most pages go out to swap and come back in.

    python3 pages.py SIZE_MIB [--rounds N]

Prints "progress <percent>" while writing, "written", then "bad pages: N" after each round
of checks (zeros and another node's pages are bad pages too), and exits 1 if any was bad.
Unbuffered prints straight to the console: no pipe to a process that could be swapped out.
"""

import argparse
import mmap
import socket
import struct
import sys
import time
import zlib

PAGE = 4096


def stamp(node_key: int, index: int) -> bytes:
    # 16 bytes repeated: the node (a CRC of its name) and the page index. A page of zeros,
    # another node's page or another index's page all differ from it.
    return struct.pack("<QQ", node_key, index) * (PAGE // 16)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("size_mib", type=int)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    pages = args.size_mib * 256
    node_key = zlib.crc32(socket.gethostname().encode()) | 1 << 40
    area = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    started = time.monotonic()
    step = max(1, pages // 10)
    for index in range(pages):
        area[index * PAGE:(index + 1) * PAGE] = stamp(node_key, index)
        if index % step == step - 1:
            print(f"progress {100 * (index + 1) // pages}", flush=True)
    print(f"written {args.size_mib} MiB in {time.monotonic() - started:.1f} s", flush=True)
    total_bad = 0
    for round_ in range(args.rounds):
        started = time.monotonic()
        bad = sum(area[i * PAGE:(i + 1) * PAGE] != stamp(node_key, i) for i in range(pages))
        total_bad += bad
        print(f"checked in {time.monotonic() - started:.1f} s", flush=True)
        print(f"bad pages: {bad}", flush=True)
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
