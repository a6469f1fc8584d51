"""A daemon with a pool small enough to exhaust, and the clients that exhaust it: a flood of
writes to a non-swap export and a swapping node."""

from __future__ import annotations

import json
import os
import time

from support.libnbd import import_libnbd

nbd = import_libnbd()

MiB = 1 << 20
KiB = 1 << 10

# A small pool that a few clients can exhaust: 4 MiB of normal budget, 1 MiB requests,
# 1 MiB of reserve per node (16 × 64 KiB) plus its windows.
SMALL_POOL = """
normal_budget = "4MiB"
headroom = "1MiB"
non_swap_exhausted = "{policy}"
"""
SMALL_SWAP = """
max_nodes = 2
reserve_inflight = 16
reserve_request = "64KiB"
max_connections = 1
detach_grace = "0.5s"
{extra}
"""
SMALL_NBD = 'max_request = "1MiB"'


def final_counters(daemon) -> dict:
    for line in daemon.log().splitlines():
        if "final counters: " in line:
            return json.loads(line.split("final counters: ", 1)[1])
    raise AssertionError(f"no final counters in the log:\n{daemon.log()[-3000:]}")


BIG_DISK = """
    [[exports]]
    name = "disk"
    backend = "file"
    path = "disk.img"
    size = "256MiB"
"""


def flood(uri, offset, stop, results, block=64 * KiB, depth=32, positions=256):
    """Write blocks as fast as the server takes them, never two at once to the same place;
    record the latest acknowledged contents of each place and the failures. Blocks as small
    as a swap node's leave no crumbs of normal memory for the node to live on. FUA writes:
    they take the Python path, where one connection holds up to max_inflight buffers (the C
    request loop serves plain writes one at a time per connection, so a flood of those
    cannot take the normal budget at all)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    acked, failed = {}, 0
    pending = {}  # cookie -> (position, data)
    cursor = 0

    def reap():
        nonlocal failed
        for cookie, (position, data) in list(pending.items()):
            try:
                done = h.aio_command_completed(cookie)
            except nbd.Error:
                failed += 1  # refused: the place keeps what was acknowledged before
                done = True
            else:
                if done:
                    acked[position] = data
            if done:
                del pending[cookie]

    while not stop.is_set():
        busy = {position for position, _ in pending.values()}
        while len(pending) < depth:
            position = offset + (cursor % positions) * block
            cursor += 1
            if position in busy:
                continue
            data = os.urandom(16) * (block // 16)
            pending[h.aio_pwrite(data, position, flags=nbd.CMD_FLAG_FUA)] = (position, data)
            busy.add(position)
        h.poll(1000)
        reap()
    while pending:
        h.poll(1000)
        reap()
    h.shutdown()
    results.append((acked, failed))


def swap_node_io(uri, rounds=400, block=64 * KiB, until=None, deadline=30.0):
    """A node swapping: write pages, read them back, every request must succeed. At least
    `rounds` rounds, and with `until`, more until until() is true (or `deadline` seconds):
    whether the flood has the normal budget at the instant a swap request arrives is a race,
    so a test waits for the event it is about instead of hoping a fixed count catches it."""
    h = nbd.NBD()
    h.connect_uri(uri)
    r = 0
    end = time.monotonic() + deadline
    while r < rounds or (until is not None and not until() and time.monotonic() < end):
        data = os.urandom(block)
        offset = (r % 64) * block
        h.pwrite(data, offset)
        assert h.pread(block, offset) == data
        r += 1
    h.shutdown()
    return r

