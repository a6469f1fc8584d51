#!/usr/bin/env python3
"""End-to-end swap storm: a real kernel swapping through netswapd, and through nbdkit.

For each server, in alternating order over the repeats: the server serves a sparse swap
image on 127.0.0.1 (netswapd as a node's per-node export "swap/bench", nbdkit with
its file plugin); the node side is nbdfuse + a loop device + mkswap + swapon (this kernel has
no nbd driver); a workload in a child memory cgroup limited to a quarter of its data writes
--data of distinct pages, so three quarters of it must go out through the server, then reads
every page back and checks it, so it must come back in. The times of both phases are
printed per server with the ratio netswapd / nbdkit (lower is better for netswapd).

Needs root (swapon, losetup, FUSE, cgroups), nbdfuse, nbdkit, fuse3, and the cgroup v1
memory controller. Everything set up is undone, also on failure or Ctrl-C.

    python3 bench/swap_storm.py                       # 1 GiB of data, 3 repeats
    python3 bench/swap_storm.py --data 512MiB --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))  # the node side is shared with the tests (support/swapnode.py)
sys.path.insert(0, str(HERE))

from fio_matrix import Server, parse_size  # noqa: E402
from support.swapnode import (loop_device, memory_cgroup, nbdfuse_file, swap_on,  # noqa: E402
                              swap_used_kib, workload_in)

SERVERS = ("netswapd", "nbdkit")
NODE = "bench"


class SwapServer(Server):
    """fio_matrix's server, but netswapd serves the image as a node's per-node swap export,
    the way nodes use it (tagged socket, reserve attached), not as a static export."""

    @property
    def uri(self) -> str:
        if self.name == "netswapd":
            return f"nbd://127.0.0.1:{self.port}/swap/{NODE}"
        return super().uri

    def command(self) -> list[str]:
        if self.name != "netswapd":
            return super().command()
        # netswapd makes the node's image itself (sparse, state/swap/bench.img, beside the
        # file nbdkit gets), as it does for every node on first attach.
        return self.netswapd_command(f"""\
            [pool]
            lock = "best-effort"

            [swap]
            size = {self.size}
            """)


def storm(server: Server, data: int, workdir: Path) -> dict:
    """Swap `data` bytes out and back in through `server`; the phases' seconds."""
    with contextlib.ExitStack() as stack:
        swapfile = stack.enter_context(nbdfuse_file(server.uri, workdir / "mnt"))
        device = stack.enter_context(loop_device(swapfile))
        stack.enter_context(swap_on(device))
        group = stack.enter_context(memory_cgroup(data // 4))
        started = time.monotonic()
        with workload_in(group, data) as workload:
            if workload.stdout.readline().strip() != "written":
                raise RuntimeError("the workload did not finish writing")
            written = time.monotonic()
            swapped = swap_used_kib(device) * 1024
            workload.stdin.write("\n")
            workload.stdin.flush()
            verdict = workload.stdout.readline().strip()
            checked = time.monotonic()
            if verdict != "bad pages: 0" or workload.wait(60) != 0:
                raise RuntimeError(f"data came back wrong through {server.name}: {verdict}")
    return {"out": written - started, "in": checked - written, "total": checked - started,
            "swapped": swapped}


def print_repeat(repeat: int, name: str, result: dict) -> None:
    print(f"repeat {repeat + 1} {name:9s} swap-out {result['out']:6.2f} s  "
          f"swap-in {result['in']:6.2f} s  total {result['total']:6.2f} s  "
          f"({result['swapped'] / 2**20:.0f} MiB on the swap device)", flush=True)


def print_table(results: dict[str, list[dict]], servers: list[str], peer: str) -> None:
    """Medians per server as a Markdown table, with each total's ratio to `peer`'s."""
    print(f"| server | swap-out | swap-in | total | total / {peer} |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(r["total"] for r in results[peer]) if results.get(peer) else None
    for name in servers:
        out = statistics.median(r["out"] for r in results[name])
        back = statistics.median(r["in"] for r in results[name])
        total = statistics.median(r["total"] for r in results[name])
        ratio = f"{total / base:.2f}" if base else "n/a"
        print(f"| {name} | {out:.2f} | {back:.2f} | {total:.2f} | {ratio} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="1GiB", help="workload size (default 1GiB); its cgroup "
                   "limit is a quarter of it")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--workers", type=int, default=8, help="netswapd daemon.workers")
    p.add_argument("--dir", default="/var/tmp", help="where the swap image goes")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root: swapon, losetup, FUSE mounts and cgroups")
    data = parse_size(args.data)
    servers = args.servers.split(",")
    results: dict[str, list[dict]] = {name: [] for name in servers}
    with tempfile.TemporaryDirectory(prefix="swap_storm.", dir=args.dir) as tmp:
        for repeat in range(args.repeats):
            order = servers if repeat % 2 == 0 else list(reversed(servers))
            for name in order:
                workdir = Path(tmp) / f"{name}-{repeat}"
                workdir.mkdir()
                image = workdir / "swap.img"
                image.touch()
                size = data + (data // 4)  # room for what the cgroup pushes out, and more
                os.truncate(image, size)
                server = SwapServer(name=name, image=image, size=size, workdir=workdir,
                                    workers=args.workers, netswapd_log_level="warning")
                server.start()
                try:
                    result = storm(server, data, workdir)
                finally:
                    server.stop()
                results[name].append(result)
                print_repeat(repeat, name, result)

    print(f"\nSwap storm: {data / 2**20:.0f} MiB of pages through a cgroup limited to "
          f"{data / 4 / 2**20:.0f} MiB; medians of {args.repeats} (seconds, lower is better)\n")
    print_table(results, servers, "nbdkit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
