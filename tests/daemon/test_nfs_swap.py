"""End to end over NFS: a real kernel swaps to its swap file on netswapd's /swap.

This kernel has no NFS client. The node side is qemu-nbd opening nfs://127.0.0.1/swap/localhost
with QEMU's NFS driver (libnfs: MNT, LOOKUP, several READ/WRITE calls in flight; it asks the
portmapper for the ports, as a kernel mount without port= does), exposed to the kernel by
nbdfuse + a loop device + mkswap + swapon (swapnode.py). Port 111 belongs to the host, so the
daemon and qemu-nbd run in a network namespace of the test's own, where netswapd answers the
portmapper itself (nfs.portmapper = "serve"). A workload in a child memory cgroup limited to a
quarter of its data must swap out through that chain and read every page back.
"""

from __future__ import annotations

import contextlib

from support.daemon import start_daemon, stop_clean
from support.metrics import metric_matching
from support.netns import scrape
from support.swapnode import (
    loop_device, memory_cgroup, nbdfuse_file, qemu_nbd_nfs, swap_on, swap_used_kib, workload_in,
)

MiB = 1 << 20
DATA = 256 * MiB
LIMIT = DATA // 4
SWAP_SIZE = 384 * MiB


def test_kernel_swaps_to_an_nfs_swap_file_found_through_the_portmapper(netns, tmp_path):
    daemon = start_daemon(tmp_path, prefix=netns.exec(), nfs_options=f"""
        enabled = true
        listen = ["127.0.0.1:2049"]
        mount_listen = ["127.0.0.1:20048"]
        swap_size = "{SWAP_SIZE // MiB}MiB"
        portmapper = "serve"
        node_ports = "privileged"  # the default: QEMU's libnfs as root binds below 1024
        swap_idle_timeout = "never"
        """)
    daemon.metrics = lambda: scrape(netns, daemon.metrics_port)
    try:
        with contextlib.ExitStack() as stack:
            uri = stack.enter_context(qemu_nbd_nfs("nfs://127.0.0.1/swap/localhost",
                                                   tmp_path / "qemu-nbd.sock", netns.exec()))
            swap_file = stack.enter_context(nbdfuse_file(uri, tmp_path / "mnt"))
            device = stack.enter_context(loop_device(swap_file))
            stack.enter_context(swap_on(device))
            group = stack.enter_context(memory_cgroup(LIMIT))
            with workload_in(group, DATA) as workload:
                assert workload.stdout.readline().strip() == "written"
                used_kib = swap_used_kib(device)
                # The group holds at most LIMIT in RAM: most of DATA went out over NFS.
                assert used_kib * 1024 >= DATA - LIMIT - 32 * MiB, used_kib
                writes = metric_matching(daemon, "netswap_nfs_calls_total", procedure="write")
                assert writes * 1 * MiB >= DATA - LIMIT - 32 * MiB, writes  # max_io: 1 MiB
                workload.stdin.write("\n")
                workload.stdin.flush()
                assert workload.stdout.readline().strip() == "bad pages: 0"
                assert workload.wait(300) == 0
            assert metric_matching(daemon, "netswap_nfs_calls_total", procedure="read") > 0
            # The node's reserve was attached for its swap I/O: the seed's swapon.
            assert metric_matching(daemon, "netswap_node_attaches_total") == 1
            assert metric_matching(daemon, "netswap_portmap_calls_total", procedure="getport") >= 2
        # What mkswap wrote went through netswapd into the node's file on the server.
        served = daemon.state_dir / "nfs-swap" / "localhost"
        with open(served, "rb") as f:
            f.seek(4096 - 10)
            assert f.read(10) == b"SWAPSPACE2"
        assert metric_matching(daemon, "netswap_nfs_errors_total") == 0
    finally:
        stop_clean(daemon)
