#!/usr/bin/env python3
"""Swap storm over NFSv3: a real kernel swapping to a file on netswapd's /swap, and on
nfs-ganesha, through the same NFS client.

This kernel has no NFS client, so the node side is: qemu-nbd opening the swap file with
QEMU's NFS driver (libnfs: asynchronous, several calls in flight, the client finds the ports
through rpcbind as a kernel mount without port= does), exposed to the kernel by nbdfuse +
a loop device + mkswap + swapon (tests/support/swapnode.py, as in swap_storm.py). A workload in a
child memory cgroup limited to a quarter of its data writes --data of distinct pages, so
three quarters must go out over NFS, then reads every page back and checks it. Both servers
serve a fully allocated file of the same size: netswapd its node file /swap/localhost (it
allocates it itself), ganesha (FSAL VFS) a file fallocate'd in its export.

Needs root, qemu-utils with qemu-block-extra (block-nfs), nbdfuse, fuse3, rpcbind, and for
the peer nfs-ganesha + nfs-ganesha-vfs. netswapd registers with rpcbind (nfs.portmapper =
"register"); ganesha registers itself. An rpcbind already running is used, otherwise one is
started for the run.

    python3 bench/nfs_swap_storm.py                     # 1 GiB, 3 repeats, both servers
    python3 bench/nfs_swap_storm.py --data 512MiB --repeats 1 --servers netswapd
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from fio_matrix import netswapd_command, parse_size  # noqa: E402
from nfs_bench import Rpcbind, Server  # noqa: E402
from swap_storm import print_repeat, print_table, storm  # noqa: E402
from support.swapnode import qemu_nbd_nfs  # noqa: E402

SERVERS = ("netswapd", "ganesha")
NODE = "localhost"  # what netswapd's default swap.nodes calls a loopback client
NFS_PROGRAM = "100003"


class SwapFileServer(Server):
    """nfs_bench's server, serving one node's swap file instead of a scratch directory."""

    size: int = 0

    def command(self) -> list[str]:
        if self.name != "netswapd":
            command = super().command()  # ganesha, exporting served_dir
            swap_file = self.served_dir / NODE
            with open(swap_file, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, self.size)  # as netswapd's: no holes
            return command
        self.export = "/swap"
        self.served_dir = self.workdir / "state" / "nfs-swap"
        return netswapd_command(self.workdir, self.netswapd_log_level, self.workers, f"""\
            [pool]
            lock = "best-effort"

            [nbd]
            listen = []
            unix_socket = ""

            [nfs]
            enabled = true
            listen = ["127.0.0.1:{self.nfs_port}"]
            mount_listen = ["127.0.0.1:{self.mount_port}"]
            swap_export = "/swap"
            swap_size = {self.size}
            scratch_export = ""
            portmapper = "register"

            [metrics]
            listen = []
            """)

    @property
    def url(self) -> str:
        return f"nfs://127.0.0.1{self.export}/{NODE}"


def wait_registered(port: int, timeout: float = 20.0) -> None:
    """Until rpcbind maps NFS v3 over TCP to `port` (the client asks it, not us)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = subprocess.run(["rpcinfo", "-p", "127.0.0.1"], capture_output=True,
                                 text=True).stdout
        for line in listing.splitlines():
            fields = line.split()
            if fields[:3] == [NFS_PROGRAM, "3", "tcp"] and fields[3] == str(port):
                return
        time.sleep(0.1)
    raise RuntimeError(f"rpcbind does not map NFS v3/tcp to port {port} after {timeout:.0f} s")


class _Node:
    """What swap_storm.storm needs of a server: a name and an NBD URI."""

    def __init__(self, name: str, uri: str) -> None:
        self.name, self.uri = name, uri


def run_one(name: str, data: int, workdir: Path, workers: int) -> dict:
    server = SwapFileServer(name, workdir, workers, "warning")
    server.size = data + data // 4  # room for what the cgroup pushes out, and more
    server.start()
    try:
        wait_registered(server.nfs_port)
        with qemu_nbd_nfs(server.url, workdir / "qemu-nbd.sock") as uri:
            return storm(_Node(name, uri), data, workdir)
    finally:
        code = server.stop()
        if code not in (None, 0, -15) or "Traceback" in server.log():
            print(f"  !! {name} exited with {code}; log tail:\n{server.log_tail(40)}",
                  file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="1GiB", help="workload size (default 1GiB); its cgroup "
                   "limit is a quarter of it")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--workers", type=int, default=8, help="netswapd daemon.workers")
    p.add_argument("--dir", default="/var/tmp",
                   help="where the swap files go (ganesha's FSAL VFS needs file handles)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root: swapon, losetup, FUSE mounts and cgroups")
    data = parse_size(args.data)
    servers = args.servers.split(",")
    results: dict[str, list[dict]] = {name: [] for name in servers}
    rpcbind = Rpcbind()
    print(rpcbind.ensure(), flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="nfs_swap_storm.", dir=args.dir) as tmp:
            for repeat in range(args.repeats):
                order = servers if repeat % 2 == 0 else list(reversed(servers))
                for name in order:
                    workdir = Path(tmp) / f"{name}-{repeat}"
                    workdir.mkdir()
                    result = run_one(name, data, workdir, args.workers)
                    results[name].append(result)
                    print_repeat(repeat, name, result)
    finally:
        rpcbind.stop()

    print(f"\nSwap storm over NFSv3 (qemu-nbd's libnfs client, nbdfuse + loop + swapon): "
          f"{data / 2**20:.0f} MiB of pages through a cgroup limited to "
          f"{data / 4 / 2**20:.0f} MiB; medians of {args.repeats} (seconds, lower is better)\n")
    print_table(results, servers, "ganesha")
    return 0


if __name__ == "__main__":
    sys.exit(main())
