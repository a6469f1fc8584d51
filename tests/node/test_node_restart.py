"""netswapd restarted (SIGTERM, started again 3 s later) while real nodes swap to it.

The NFS node must not notice beyond a pause: its mount is hard, its file handles survive the
restart, so every page comes back (asserted). The NBD node runs Debian's nbd-client as the
README says, which is known to lose its device when the server goes away; what it does is
recorded in the test output, not asserted (netswap-node is the answer to that).
"""

from __future__ import annotations

import re
import time

from node.lab import FOUR_TIMES_MEMORY_MIB, readme_commands, workload
from node.vm import NodeTimeout

DATA_MIB = FOUR_TIMES_MEMORY_MIB
HANG_GUARD = 900  # seconds: not a timing check
NBD_AFTERMATH = 15  # how long the NBD node gets to finish once the NFS node is done


def test_a_restart_mid_swap_costs_the_nfs_node_nothing_and_the_nbd_node_is_recorded(lab):
    lab = lab(["nbd1", "nfs1"])
    lab.start_daemon()
    detach = {"nbd1": "swapoff /dev/nbd0 && nbd-client -d /dev/nbd0",
              "nfs1": "swapoff /mnt/swap/nfs1 && umount /mnt/swap"}
    nodes = {}
    for name, protocol in (("nbd1", "nbd"), ("nfs1", "nfs")):
        nodes[name] = lab.boot(name, f"""
set -e
{readme_commands(protocol, lab.server)}
set +e
{workload(DATA_MIB)}
status=$?
{detach[name]} && echo "swap detached"
exit $status
""")
    for node in nodes.values():
        node.wait_for(r"^progress 50$", HANG_GUARD)
    restarted = time.monotonic()
    lab.restart_daemon(pause=3.0)
    print(f"\nnetswapd back {time.monotonic() - restarted:.1f} s after the SIGTERM")

    nfs = nodes["nfs1"].wait(HANG_GUARD)
    print(nfs)
    assert nfs.status == 0, nfs
    assert "bad pages: 0" in nfs.console
    assert "swap detached" in nfs.console

    try:
        nbd = nodes["nbd1"].wait(NBD_AFTERMATH)
    except NodeTimeout:
        nodes["nbd1"].kill()
        nbd = nodes["nbd1"].result()
    print(nbd)
    seen = [line for line in nbd.console.splitlines()
            if re.search(r"Dead connection|fallback|I/O error|bad pages|Killed|killed|"
                         r"Bus error|Read-error|Write-error", line)]
    print(f"NBD node with nbd-client after the restart: exit status {nbd.status}, "
          f"{len(seen)} telling console lines; the first ones:")
    print("\n".join(seen[:12]))
