"""netswap-node on real nodes: netswapd restarted and killed mid-swap, the agent itself killed
and restarted, one connection cut on the server side, a full server skipped, a server away
past the dead-connection timeout, and an export wiped behind the node's back.

Each node runs the agent in the background with its output straight on the console (no pipe),
and the page workload (pages.py) beside it; `hold` points let the test act at known moments.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

from netswap.node.placement import rank
from support.libnbd import import_libnbd

from node.lab import PAGES, THREE_TIMES_MEMORY_MIB, agent_command
from node.vm import MiB

HANG_GUARD = 900  # seconds: not a timing check
DATA_MIB = THREE_TIMES_MEMORY_MIB
# The agent locks about 32 MiB of its own (python, pyroute2): a node of the usual 144 MiB has
# too little left for swapoff to read everything back at detach. 16 MiB more keeps DATA_MIB
# about three times what the node's processes have.
NODE_MEMORY = 160 * MiB


def agent(name: str, *arguments: str, state_dir: str = "/run/netswap-node") -> str:
    return agent_command(name, *arguments, state_dir=state_dir)


def background_workload(*probes: str) -> str:
    return " ".join([f"python3 {PAGES} {DATA_MIB}", *(f"--probe {p}" for p in probes), "& W=$!"])


REPORT = """
wait $W; status=$?
echo "workload exit $status"
netswap-node status
"""


def stalls(console: str) -> str:
    found = re.findall(r"^longest page (write|read): ([\d.]+) s", console, re.MULTILINE)
    return ", ".join(f"{kind} {seconds} s" for kind, seconds in found) or "none printed"


def kill_one_connection(lab, node_address: str) -> str:
    """ss -K of one of the node's NBD connections, on the server's side; its client port."""
    listing = subprocess.run(
        lab.lan.exec("ss", "-tnH", "state", "established",
                     f"( sport = :10809 and dst {node_address} )"),
        capture_output=True, text=True, check=True).stdout
    ports = sorted({line.split()[-1].rsplit(":", 1)[1] for line in listing.splitlines()})
    assert len(ports) == 2, listing  # the agent's two connections
    subprocess.run(lab.lan.exec("ss", "-K", "-tn", "state", "established",
                                f"( sport = :10809 and dst {node_address} and "
                                f"dport = :{ports[0]} )"), capture_output=True, check=True)
    return ports[0]


def test_the_agent_keeps_the_node_swapping_through_restarts_kills_and_a_cut_connection(lab):
    lab = lab(["agent", "nfsagent"])
    lab.start_daemon()
    nodes = {
        "agent": lab.boot("agent", f"""
set -e
{agent("agent", "--server", lab.server, "--connections", "2", "--dead-conn-timeout", "2m")}
set +e
{background_workload("agent-kill", "cut")}
await_release agent-kill
kill -KILL $A; echo "agent killed"
{agent("agent", "--server", lab.server, "--connections", "2", "--dead-conn-timeout", "2m")}
{REPORT}
netswap-node detach && echo "swap detached"
wait $A; echo "agent exit $?"
exit $status
""", memory=NODE_MEMORY),
        "nfsagent": lab.boot("nfsagent", f"""
set -e
{agent("nfsagent", "--server", lab.server, "--protocol", "nfs")}
set +e
{background_workload()}
{REPORT}
netswap-node detach --name nfsagent && echo "swap detached"
wait $A; echo "agent exit $?"
exit $status
""", memory=NODE_MEMORY),
    }
    nodes["agent"].wait_for(r"^progress 30$", HANG_GUARD)
    lab.restart_daemon(signal.SIGTERM, pause=3.0)
    nodes["agent"].wait_for(r"^progress 70$", HANG_GUARD)
    lab.restart_daemon(signal.SIGKILL, pause=3.0)
    nodes["agent"].held("agent-kill", HANG_GUARD)
    nodes["agent"].release("agent-kill")
    # Adopted, and the probe that looked for dead slots is closed: the node has its two.
    nodes["agent"].wait_for(r"/dev/nbd\d+: adopted, 2 of 2 connection", HANG_GUARD)
    nodes["agent"].held("cut", HANG_GUARD)
    port = kill_one_connection(lab, lab.address("agent"))
    nodes["agent"].wait_for(r"new connection to .* brought in \(connection lost", HANG_GUARD)
    nodes["agent"].release("cut")

    results = {name: nodes[name].wait(HANG_GUARD) for name in ("agent", "nfsagent")}
    for result in results.values():
        print(result)
    for name, result in results.items():
        assert result.status == 0, result
        assert "bad pages: 0" in result.console, result
        assert "swap detached" in result.console, result
        assert re.search(r"^agent exit 0$", result.console, re.MULTILINE), result
    console = results["agent"].console
    reconnects = len(re.findall(r"new connection to .* brought in", console))
    assert reconnects >= 5, console  # 2 per netswapd restart, 1 for the cut connection
    assert "adopted /dev/nbd" in console
    assert re.search(r"connections: 2 of 2 alive", console), console
    print(f"\nserver restarted (SIGTERM, then SIGKILL, 3 s down each), agent killed and "
          f"restarted, connection :{port} cut:\n"
          f"  netswap-node (NBD): every page back, {reconnects} reconnects, longest page "
          f"{stalls(console)}\n"
          f"  netswap-node (NFS): every page back, longest page "
          f"{stalls(results['nfsagent'].console)}")


def test_a_full_server_is_skipped_a_long_absence_is_reported_and_a_wiped_export_refused(lab):
    nbd = import_libnbd()
    lab = lab(["refused", "away"], servers=2)
    full, wiping = 0, 1
    # Server 0 holds one node's reserve (and no headroom that would back a second), and a
    # holder takes it; its reserve is released a second after the holder goes
    # (detach_grace), so "away" can attach later.
    lab.start_daemon(server=full, swap_options='max_nodes = 1\ndetach_grace = "1s"',
                     pool_options='headroom = "1MiB"')
    lab.start_daemon(server=wiping, swap_options="wipe = true")
    holder = nbd.NBD()
    holder.connect_uri(lab.daemons[full].unix_uri("swap/holder"))
    first, second = lab.server_address(full), lab.server_address(wiping)
    # The node's placement (rendezvous hashing of its name) tries the full server first.
    assert rank("refused", [(second, 10809), (first, 10809)]) == [(first, 10809), (second, 10809)]
    # A failed swap device takes the node's own processes with it (init included: the kernel
    # panics), so the agents keep their state files on the job share, where the test reads
    # what they concluded.
    state_dir = "/run/job/agent-state"
    nodes = {"refused": lab.boot("refused", f"""
set -e
{agent("refused", "--server", first, "--server", second, state_dir=state_dir)}
set +e
{background_workload("wiped")}
wait $W; echo "workload exit $?"
""", memory=NODE_MEMORY)}
    nodes["refused"].wait_for(r"attached swap/refused of ", HANG_GUARD)
    holder.shutdown()
    nodes["away"] = lab.boot("away", f"""
set -e
{agent("away", "--server", first, "--dead-conn-timeout", "15s", "--io-timeout", "5s",
        state_dir=state_dir)}
set +e
{background_workload()}
wait $W; echo "workload exit $?"
""", memory=NODE_MEMORY)
    for node in nodes.values():
        node.wait_for(r"^progress 40$", HANG_GUARD)
    # The wiping server restarts: it wipes every node's image at start. "refused" has written
    # its pages and waits (it must still be running when its agent reconnects, however fast
    # the machine), then reads them.
    nodes["refused"].held("wiped", HANG_GUARD)
    lab.restart_daemon(signal.SIGTERM, pause=1.0, server=wiping)
    # The other stays away past the node's dead-connection timeout.
    lab.stop_daemon(signal.SIGTERM, server=full)
    # The agents write their conclusions to the job share as the kernel fails the device; a
    # node may not live long after (its init's pages were on that device).
    for name in ("refused", "away"):
        concluded_path = nodes[name].job / "agent-state" / f"{name}.json"
        deadline = time.monotonic() + HANG_GUARD
        while '"state": "failed"' not in (concluded_path.read_text()
                                          if concluded_path.exists() else ""):
            assert time.monotonic() < deadline, nodes[name].result()
            time.sleep(0.5)
        if name == "refused":
            nodes["refused"].release("wiped")
    lab.start_again(server=full)

    results = {name: node.wait(HANG_GUARD) for name, node in nodes.items()}
    for result in results.values():
        print(result)
    concluded = {name: json.loads((node.job / "agent-state" / f"{name}.json").read_text())
                 for name, node in nodes.items()}
    print(json.dumps(concluded, indent=2))
    refused = results["refused"].console
    assert re.search(rf"attach: {first}:10809 did not take swap/refused: ERR_POLICY", refused), refused
    assert re.search(rf"attached swap/refused of {second}:10809", refused), refused
    assert "no longer holds this node's swap area" in refused, refused
    assert concluded["refused"]["state"] == "failed"
    assert concluded["refused"]["exit_code"] == 5
    assert "no longer holds this node's swap area" in concluded["refused"]["last_error"]
    # Not one page of zeros reached the workload: the failed device took it down instead.
    assert not re.search(r"^bad pages: [1-9]", refused, re.MULTILINE), refused
    assert not re.search(r"^workload exit 0$", refused, re.MULTILINE), refused
    away = results["away"].console
    assert concluded["away"]["state"] == "failed"
    assert concluded["away"]["exit_code"] == 4
    assert "longer than the dead-connection timeout" in concluded["away"]["last_error"]
    assert not re.search(r"^bad pages: [1-9]", away, re.MULTILINE), away
