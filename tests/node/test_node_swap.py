"""A real node swaps to netswapd: Debian's kernel under qemu, its own nbd driver and NFS client,
the README's node-side commands, a workload of about four times the node's memory, every page
checked (pages.py). These are the only tests where the kernel that swaps is a node's kernel and
the server sees the node's own address and privileged source ports.

The NBD node and the NFS node boot together on one netswapd (one run of two TCG nodes on two
cores instead of two runs of one); each test checks its own node's outcome."""

from __future__ import annotations

import re

import pytest

from support.metrics import metric
from node.lab import FOUR_TIMES_MEMORY_MIB, Lab, readme_commands, workload

MiB = 1 << 20
DATA_MIB = FOUR_TIMES_MEMORY_MIB
MORE_THAN_A_NODE_HOLDS_MIB = 160  # what may have stayed in the node's memory
BOOT_AND_RUN = 900  # seconds: a hang guard for a TCG node, not a timing check


def pages_swapped_out(console: str) -> int:
    return int(re.search(r"^pswpout (\d+)", console, re.MULTILINE).group(1))


def workload_times(console: str) -> tuple[float, float]:
    written = float(re.search(r"^written \d+ MiB in ([\d.]+) s", console, re.MULTILINE).group(1))
    checked = float(re.search(r"^checked in ([\d.]+) s", console, re.MULTILINE).group(1))
    return written, checked


@pytest.fixture(scope="module")
def swapping(node_image, tmp_path_factory):
    """netswapd with two nodes swapping to it: nbd1 over NBD, nfs1 over NFS (README commands)."""
    lab = Lab(tmp_path_factory.mktemp("swapping"), node_image, ["nbd1", "nfs1"])
    try:
        lab.start_daemon()
        url = f"nfs://{lab.server}/swap/nfs1?version=3&nfsport=2049&mountport=20048"
        listing = f"nfs://{lab.server}/swap?version=3&nfsport=2049&mountport=20048"
        lab.boot("nbd1", f"""
set -e
{readme_commands("nbd", lab.server)}
set +e
{workload(DATA_MIB)}
status=$?
grep '^pswp' /proc/vmstat
swapoff /dev/nbd0 && nbd-client -d /dev/nbd0 && echo "swap detached"
exit $status
""")
        lab.boot("nfs1", f"""
set -e
{readme_commands("nfs", lab.server)}
set +e
# A user process on the node binds an unprivileged port: not the node, so not its swap file.
setpriv --reuid=65534 --regid=65534 --clear-groups nfs-ls '{listing}'
echo "unprivileged nfs-ls: $?"
setpriv --reuid=65534 --regid=65534 --clear-groups nfs-cat '{url}' | head -c 4096 | wc -c
echo "unprivileged nfs-cat done"
{workload(DATA_MIB)}
status=$?
grep '^pswp' /proc/vmstat
swapoff /mnt/swap/nfs1 && umount /mnt/swap && echo "swap detached"
exit $status
""")
        yield lab
    finally:
        lab.close()


def test_nbd_node_swaps_four_times_its_memory_with_nbd_client(swapping):
    result = swapping.nodes["nbd1"].wait(BOOT_AND_RUN)
    print(result)
    assert result.status == 0, result
    assert "bad pages: 0" in result.console
    assert "swap detached" in result.console
    # Most of the data went out to swap, and it went to netswapd as the node's swap export.
    assert pages_swapped_out(result.console) * 4096 >= (DATA_MIB - MORE_THAN_A_NODE_HOLDS_MIB) * MiB
    written = metric(swapping.daemon, "netswap_request_bytes_total", export="swap/nbd1", op="write")
    assert written >= (DATA_MIB - MORE_THAN_A_NODE_HOLDS_MIB) * MiB, written
    written_s, checked_s = workload_times(result.console)
    print(f"\nNBD node: {DATA_MIB} MiB written in {written_s:.1f} s, checked in {checked_s:.1f} s")


def test_nfs_node_swaps_to_the_file_it_lists_and_only_root_may_reach_it(swapping):
    result = swapping.nodes["nfs1"].wait(BOOT_AND_RUN)
    print(result)
    assert result.status == 0, result
    console = result.console
    # The README's `ls /mnt/swap` showed the node its own file before swapon named it.
    assert re.search(r"^nfs1\s*$", console, re.MULTILINE), console
    assert re.search(r"^unprivileged nfs-ls: [1-9]", console, re.MULTILINE), console
    assert re.search(r"^0\s*\nunprivileged nfs-cat done", console, re.MULTILINE), console
    daemon = swapping.daemon
    assert metric(daemon, "netswap_access_denied_total", export_reason="nfs:not_a_node") >= 2
    assert "bad pages: 0" in console
    assert "swap detached" in console
    assert pages_swapped_out(console) * 4096 >= (DATA_MIB - MORE_THAN_A_NODE_HOLDS_MIB) * MiB
    written = metric(daemon, "netswap_nfs_bytes_total", procedure="write")
    assert written >= (DATA_MIB - MORE_THAN_A_NODE_HOLDS_MIB) * MiB, written
    written_s, checked_s = workload_times(console)
    print(f"\nNFS node: {DATA_MIB} MiB written in {written_s:.1f} s, checked in {checked_s:.1f} s")
