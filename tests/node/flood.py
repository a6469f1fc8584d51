"""A non-swap flood for the squeeze: FUA writes of swap-sized blocks to an NBD export, many in
flight on several connections, until SIGTERM; then "flood: A acknowledged, R refused".

FUA writes because they take netswapd's Python path, where one connection holds up to
nbd.max_inflight pool buffers: that is what really exhausts the normal budget (the C loop
serves plain writes one at a time per connection). Run as a process of its own, outside
netswapd's memory cgroup, with libnbd from Debian's python3-libnbd.

    python3 flood.py URI [--connections N] [--depth D] [--block BYTES]
"""

import argparse
import os
import signal
import sys
import threading

sys.path.append("/usr/lib/python3/dist-packages")
import nbd  # noqa: E402  (Debian's binding, found through the line above)

stop = threading.Event()


def writer(uri: str, region: int, depth: int, block: int, counts: list[int]) -> None:
    handle = nbd.NBD()
    handle.connect_uri(uri)
    pending: set[int] = set()
    data = os.urandom(16) * (block // 16)
    cursor = 0
    while not stop.is_set() or pending:
        while not stop.is_set() and len(pending) < depth:
            offset = region + (cursor % 256) * block
            cursor += 1
            pending.add(handle.aio_pwrite(data, offset, flags=nbd.CMD_FLAG_FUA))
        handle.poll(1000)
        for cookie in list(pending):
            try:
                done = handle.aio_command_completed(cookie)
            except nbd.Error:
                counts[1] += 1  # refused (ENOMEM where the policy says so)
                done = True
            else:
                counts[0] += done
            if done:
                pending.discard(cookie)
    handle.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--block", type=int, default=64 * 1024)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    counts = [[0, 0] for _ in range(args.connections)]
    threads = [threading.Thread(target=writer, args=(args.uri, index * 256 * args.block,
                                                     args.depth, args.block, counts[index]))
               for index in range(args.connections)]
    for thread in threads:
        thread.start()
    print("flood: started", flush=True)
    for thread in threads:
        thread.join()
    print(f"flood: {sum(c[0] for c in counts)} acknowledged, {sum(c[1] for c in counts)} refused",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
