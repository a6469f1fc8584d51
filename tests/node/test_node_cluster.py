"""Three real nodes at once on one netswapd, each at its own address, with the README's
node-side commands: two swap over NBD (nbd-client), one over NFS. They attach concurrently;
the daemon's status shows all three; two swap three times their memory and every page comes
back, most of it having gone to netswapd as the node's own swap; each node's swap image on the
server holds its pages and no other node's; a user process on the NFS node (unprivileged
port) cannot reach the swap file; and a quiet node's swap-ins are timed alone and while the
two others storm (printed: the fairness a node sees).

These are the tests where the kernel that swaps is a node's kernel and the server sees the
node's own address and privileged source ports."""

from __future__ import annotations

import re

from support.metrics import metric
from node.lab import THREE_TIMES_MEMORY_MIB, readme_commands, workload
from node.pages import node_key, stamps_in

MiB = 1 << 20
STORM_MIB = THREE_TIMES_MEMORY_MIB
QUIET_MIB = THREE_TIMES_MEMORY_MIB // 2
HANG_GUARD = 900  # seconds, for three TCG nodes on two cores: not a timing check
MORE_THAN_A_NODE_HOLDS_MIB = 160  # what may have stayed in a node's memory


def pages_swapped_out(console: str) -> int:
    return int(re.search(r"^pswpout (\d+)", console, re.MULTILINE).group(1))


def workload_times(console: str) -> tuple[float, float]:
    written = float(re.search(r"^written \d+ MiB in ([\d.]+) s", console, re.MULTILINE).group(1))
    checked = float(re.search(r"^checked in ([\d.]+) s", console, re.MULTILINE).group(1))
    return written, checked


def test_three_nodes_swap_with_the_readme_commands_keep_their_own_pages_and_a_quiet_one_is_served(lab):
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
    url = f"nfs://{lab.server}/swap/nfs1?version=3&nfsport=2049&mountport=20048"
    listing = f"nfs://{lab.server}/swap?version=3&nfsport=2049&mountport=20048"
    # A user process on the node binds an unprivileged port: not the node, so not its swap file.
    unprivileged = {"nfs1": f"""
setpriv --reuid=65534 --regid=65534 --clear-groups nfs-ls '{listing}'
echo "unprivileged nfs-ls: $?"
setpriv --reuid=65534 --regid=65534 --clear-groups nfs-cat '{url}' | head -c 4096 | wc -c
echo "unprivileged nfs-cat done"
"""}
    nodes = {}
    for name in lab.names:
        nodes[name] = lab.boot(name, f"""
set -e
{attach[name]}
set +e
{unprivileged.get(name, "")}
hold attached
{quiet if name == "nbd2" else storm}
status=$?
grep '^pswp' /proc/vmstat
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
    # The storms went out to swap, to netswapd, as the node's own swap.
    for name in ("nbd1", "nfs1"):
        swapped = pages_swapped_out(results[name].console) * 4096
        assert swapped >= (STORM_MIB - MORE_THAN_A_NODE_HOLDS_MIB) * MiB, results[name]
        written_s, checked_s = workload_times(results[name].console)
        print(f"{name}: {STORM_MIB} MiB written in {written_s:.1f} s, checked in {checked_s:.1f} s")
    written = metric(daemon, "netswap_request_bytes_total", export="swap/nbd1", op="write")
    assert written >= (STORM_MIB - MORE_THAN_A_NODE_HOLDS_MIB) * MiB, written
    assert metric(daemon, "netswap_nfs_bytes_total", procedure="write") >= (
        STORM_MIB - MORE_THAN_A_NODE_HOLDS_MIB) * MiB
    nfs = results["nfs1"].console
    # The README's `ls /mnt/swap` showed the node its own file before swapon named it.
    assert re.search(r"^nfs1\s*$", nfs, re.MULTILINE), nfs
    assert re.search(r"^unprivileged nfs-ls: [1-9]", nfs, re.MULTILINE), nfs
    assert re.search(r"^0\s*\nunprivileged nfs-cat done", nfs, re.MULTILINE), nfs
    assert metric(daemon, "netswap_access_denied_total", export_reason="nfs:not_a_node") >= 2
    quiet_console = results["nbd2"].console
    alone = re.search(r"^swap-in alone: (.*)$", quiet_console, re.MULTILINE).group(1)
    stormed = re.search(r"^swap-in storm: (.*)$", quiet_console, re.MULTILINE).group(1)
    print(f"\nquiet node's swap-ins (one 4 KiB page at a time, TCG node):\n"
          f"  alone:                {alone}\n  while two nodes storm: {stormed}")
