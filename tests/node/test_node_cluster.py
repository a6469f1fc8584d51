"""Three real nodes at once on one netswapd, each at its own address: two swap over NBD, one
over NFS. They attach concurrently; the daemon's status shows all three; each node's swap
image on the server holds its pages and no other node's; and a quiet node's swap-ins are
timed alone and while the two others storm (printed: the fairness a node sees)."""

from __future__ import annotations

import re

from node.lab import FOUR_TIMES_MEMORY_MIB, readme_commands, workload
from node.pages import node_key, stamps_in

MiB = 1 << 20
STORM_MIB = FOUR_TIMES_MEMORY_MIB
QUIET_MIB = FOUR_TIMES_MEMORY_MIB // 2
HANG_GUARD = 900  # seconds, for three TCG nodes on two cores: not a timing check


def test_three_nodes_attach_at_once_keep_their_own_pages_and_a_quiet_one_is_served(lab):
    lab = lab(["nbd1", "nbd2", "nfs1"])
    daemon = lab.start_daemon()
    attach = {"nbd1": readme_commands("nbd", lab.server),
              "nbd2": readme_commands("nbd", lab.server),
              "nfs1": readme_commands("nfs", lab.server)}
    detach = {"nbd1": "swapoff /dev/nbd0 && nbd-client -d /dev/nbd0",
              "nbd2": "swapoff /dev/nbd0 && nbd-client -d /dev/nbd0",
              "nfs1": "swapoff /mnt/swap/nfs1 && umount /mnt/swap"}
    # Written, the stamped pages go to their images; the check runs once the test has read them.
    storm = workload(STORM_MIB, probes=("images-read",))
    quiet = workload(QUIET_MIB, probes=("alone", "storm", "images-read"))
    nodes = {}
    for name in lab.names:
        nodes[name] = lab.boot(name, f"""
set -e
{attach[name]}
set +e
hold attached
{quiet if name == "nbd2" else storm}
status=$?
{detach[name]} && echo "swap detached"
exit $status
""")
    for node in nodes.values():
        node.held("attached", HANG_GUARD)

    status = lab.ctl("status")
    print(status)
    assert re.search(r"^attached swap nodes: 3$", status, re.MULTILINE), status
    for name in lab.names:
        assert re.search(rf"^  {name}: [1-9]\d* connection", status, re.MULTILINE), status
        # Each holds its reserve, whichever protocol it swaps over (the live reserve tree).
        assert re.search(rf"^    swap/{name} +\d+KiB", status, re.MULTILINE), status

    # The quiet node writes its pages and times swap-ins alone, then while the others storm.
    nodes["nbd2"].release("attached")
    nodes["nbd2"].held("alone", HANG_GUARD)
    nodes["nbd2"].release("alone")
    nodes["nbd2"].held("storm", HANG_GUARD)
    for name in ("nbd1", "nfs1"):
        nodes[name].release("attached")
    for name in ("nbd1", "nfs1"):
        nodes[name].wait_for(r"^progress 20$", HANG_GUARD)
    nodes["nbd2"].release("storm")

    images = {"nbd1": daemon.state_dir / "swap" / "nbd1.img",
              "nbd2": daemon.state_dir / "swap" / "nbd2.img",
              "nfs1": daemon.state_dir / "nfs-swap" / "nfs1"}
    for node in nodes.values():
        node.held("images-read", HANG_GUARD)
    # Every node is done writing and has most of its pages out: each image holds its own.
    for name, image in images.items():
        found = stamps_in(image)
        print(f"{name}: {image.name} holds {found.get(node_key(name), 0)} of its pages, "
              f"{sum(found.values()) - found.get(node_key(name), 0)} of others")
        assert set(found) == {node_key(name)}, (name, found)
        assert found[node_key(name)] * 4096 >= 50 * MiB, (name, found)
    for node in nodes.values():
        node.release("images-read")

    results = {name: node.wait(HANG_GUARD) for name, node in nodes.items()}
    for result in results.values():
        print(result)
    for name, result in results.items():
        assert result.status == 0, result
        assert "bad pages: 0" in result.console, result
        assert "swap detached" in result.console, result
    quiet_console = results["nbd2"].console
    alone = re.search(r"^swap-in alone: (.*)$", quiet_console, re.MULTILINE).group(1)
    stormed = re.search(r"^swap-in storm: (.*)$", quiet_console, re.MULTILINE).group(1)
    print(f"\nquiet node's swap-ins (one 4 KiB page at a time, TCG node):\n"
          f"  alone:                {alone}\n  while two nodes storm: {stormed}")
