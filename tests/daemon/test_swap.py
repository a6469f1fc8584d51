"""End to end: a real kernel swaps through netswapd.

This kernel has no nbd driver, so the node side is nbdfuse (exposing the per-node export as
a file) + a loop device + mkswap + swapon. A workload in a child memory cgroup, limited to a
quarter of its data, is forced to swap through that device; it then checks every page it
wrote. Everything set up is undone in reverse order, also when the test fails.
"""

from __future__ import annotations

import contextlib

from support.swapnode import (
    loop_device, memory_cgroup, nbdfuse_file, swap_on, swap_used_kib, workload_in,
)

MiB = 1 << 20
DATA = 256 * MiB
LIMIT = DATA // 4


def test_kernel_swaps_through_netswapd(tmp_path):
    from support.daemon import start_daemon

    daemon = start_daemon(tmp_path, swap_size="512MiB")
    try:
        with contextlib.ExitStack() as stack:
            file = stack.enter_context(nbdfuse_file(daemon.uri("swap/testnode"), tmp_path / "mnt"))
            device = stack.enter_context(loop_device(file))
            stack.enter_context(swap_on(device))
            group = stack.enter_context(memory_cgroup(LIMIT))

            with workload_in(group, DATA) as workload:
                assert workload.stdout.readline().strip() == "written"
                used_kib = swap_used_kib(device)
                stats = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
                # The group holds at most LIMIT in RAM, so most of DATA is on the swap device.
                assert used_kib * 1024 >= DATA - LIMIT - 32 * MiB, (used_kib, stats)
                workload.stdin.write("\n")
                workload.stdin.flush()
                assert workload.stdout.readline().strip() == "bad pages: 0"
                assert workload.wait(300) == 0
        # The pages really went through netswapd to the node's swap file.
        image = daemon.state_dir / "swap" / "testnode.img"
        assert image.stat().st_blocks * 512 >= DATA - LIMIT - 32 * MiB
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()
    assert "Traceback" not in daemon.log()
