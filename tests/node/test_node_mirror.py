"""Mirrored swap across servers, on real nodes: three netswapd, four nodes in mirror mode
(netswap-node --mirror: md RAID1 over two NBD devices from two servers).

The nodes attach in two rounds, so that placement is what the hash says whatever the order
within a round: each node on the first two servers of its rendezvous ranking that take it, a
full server (room for two nodes, both taken in the first round) skipped for the next. (No
four names make every order give the same placement: three nodes must rank the full server
in their first two for one to be refused, and then which one it is decides whether a server
holds all four.) The second round starts as soon as the first has its mirrors, not when its
scripts are done. Then every node swaps while one server is SIGKILLed and left dead: every
node keeps every page (md goes on with the other member). The server is started again: each
of its members is re-added, md resyncs, and md's own state is read back clean.
"""

from __future__ import annotations

import re
import signal
import time

from netswap.node.placement import rank

from node.lab import PAGES, agent_command
from node.vm import MiB

HANG_GUARD = 900  # seconds: not a timing check
NODE_MEMORY = 160 * MiB  # as test_node_agent's: the agent locks ~32 MiB of its own
PORT = 10809
FULL, KILLED = 0, 2  # server indexes: one takes two nodes only, one dies mid-swap
# Chosen (and checked below) so that the hash puts two nodes on the full server first and
# a third (delta) is refused there. They attach in two rounds: echo and alpha fill the full
# server, bravo (not ranking it in its first two) beside them; then delta, refused there.
NAMES = ["echo", "alpha", "bravo", "delta"]
ROUNDS = (("echo", "alpha", "bravo"), ("delta",))
MIRRORED = r"mirror /dev/md\d+: RAID1 over"  # an agent's line once its mirror is built
BIG = "alpha"  # on the killed server: swaps four times its memory while it dies
ADOPTER = "echo"  # its agent is killed after the attach and started again
# Four times what the big node's processes have: its kernel says 107 MiB (MemTotal) and the
# agent locks about 32 MiB of it. The other three swap a little each, on every server.
FOUR_TIMES_MEMORY_MIB = 300
DATA_MIB = {name: FOUR_TIMES_MEMORY_MIB if name == BIG else 64
            for name in NAMES}


def expected_placement(servers: list[str]) -> tuple[dict, list]:
    """Each node's two servers as the agents must pick them, in attach order: by rank, the
    full server taking its first two nodes only. Also the nodes it refuses."""
    placed, refused, full_holds = {}, [], 0
    for name in NAMES:
        chosen = []
        for host, _ in rank(name, [(server, PORT) for server in servers]):
            if host == servers[FULL]:
                if full_holds == 2:
                    refused.append(name)
                    continue
                full_holds += 1
            chosen.append(host)
            if len(chosen) == 2:
                break
        placed[name] = chosen
    return placed, refused


def script(name: str, servers: list[str]) -> str:
    flags = " ".join(f"--server {server}" for server in servers)
    # One node's agent is killed once attached; the next adopts the mirror and both members.
    readopt = f"""
kill -KILL $A; wait $A || true; echo "agent killed"
{agent_command(name, flags, "--mirror")}""" if name == ADOPTER else ""
    return f"""
set -e
await_release attach-{name}
{agent_command(name, flags, "--mirror")}
{readopt}
set +e
hold attached
python3 {PAGES} {DATA_MIB[name]}
status=$?
echo "workload exit $status"
hold resync
MD=$(sed -n 's/.*"md": "\\(.*\\)".*/\\1/p' /run/netswap-node/{name}.json)
until netswap-node status --json | grep -q '"health": "clean'; do sleep 1; done
echo "md sync_action $(cat /sys/block/${{MD#/dev/}}/md/sync_action)"
echo "md degraded $(cat /sys/block/${{MD#/dev/}}/md/degraded)"
mdadm --detail $MD
netswap-node status; echo "status exit $?"
netswap-node detach && echo "swap detached"
wait $A; echo "agent exit $?"
exit $status
"""


def test_mirrored_nodes_keep_every_page_when_a_server_dies_and_resync_when_it_returns(lab):
    began = time.monotonic()

    def phase(what: str) -> None:  # where the test's minutes go, printed as it goes
        print(f"[{time.monotonic() - began:6.1f} s] {what}", flush=True)

    lab = lab(NAMES, servers=3)
    servers = [lab.server_address(index) for index in range(3)]
    placed, refused = expected_placement(servers)
    print("placement (rendezvous hashing, in attach order):")
    for name in NAMES:
        print(f"  {name}: ranks {[h for h, _ in rank(name, [(s, PORT) for s in servers])]}, "
              f"on {placed[name]}")
    # The names were chosen for this; a change of the hash would show here first.
    assert refused == ["delta"], placed
    holding = {server: [n for n in NAMES if server in placed[n]] for server in servers}
    assert all(len(set(pair)) == 2 for pair in placed.values())
    assert all(len(nodes) < len(NAMES) for nodes in holding.values()), holding
    assert BIG in holding[servers[KILLED]], holding

    # The full server backs two nodes' reserves and nothing more (no headroom).
    lab.start_daemon(server=FULL, swap_options="max_nodes = 2", pool_options='headroom = "1MiB"')
    for server in range(3):
        if server != FULL:
            lab.start_daemon(server=server)
    nodes = {name: lab.boot(name, script(name, servers), memory=NODE_MEMORY) for name in NAMES}
    for attaching in ROUNDS:
        for name in attaching:
            nodes[name].release(f"attach-{name}")
        for name in attaching:  # (an agent that failed goes straight to the hold)
            nodes[name].wait_for(rf"{MIRRORED}|^hold attached$", HANG_GUARD)
    for node in nodes.values():
        node.held("attached", HANG_GUARD)
    phase("every node attached")
    for name in NAMES:
        console = nodes[name].console()
        found = re.findall(r"attached swap/\S+ of ([\d.]+):10809 as", console)
        assert found == placed[name], (name, console)
        assert re.search(MIRRORED, console), console
    delta = nodes["delta"].console()
    assert re.search(rf"attach: {servers[FULL]}:10809 did not take swap/delta: ERR_POLICY",
                     delta), delta
    for node in nodes.values():
        node.release("attached")

    # Mid-swap, one server dies and stays dead while every node finishes its workload.
    nodes[BIG].wait_for(r"^progress 30$", HANG_GUARD)
    lab.stop_daemon(signal.SIGKILL, server=KILLED)
    phase(f"server {servers[KILLED]} killed")
    for name, node in nodes.items():
        node.held("resync", HANG_GUARD)
        console = node.console()
        assert re.search(r"^bad pages: 0$", console, re.MULTILINE), console
        assert re.search(r"^workload exit 0$", console, re.MULTILINE), console
        if servers[KILLED] in placed[name]:
            assert re.search(r"longer than the dead-connection timeout.*marked faulty in md and "
                             r"disconnected.*goes on with", console), console
            assert "faulty failed" not in console, console  # md knew before the writes failed

    # Back: every member it held is re-added, md resyncs, and says clean.
    phase("every node read its pages back")
    lab.start_again(server=KILLED)
    for node in nodes.values():
        node.release("resync")
    results = {name: node.wait(HANG_GUARD) for name, node in nodes.items()}
    phase("every node resynced, detached and powered off")
    for result in results.values():
        print(result)
    for name, result in results.items():
        console = result.console
        assert result.status == 0, result
        assert "md sync_action idle" in console and "md degraded 0" in console, result
        assert re.search(r"State : (clean|active)\s*$", console, re.MULTILINE), result
        assert len(re.findall(r"active sync", console)) == 2, result
        assert re.search(r"^mirror: clean", console, re.MULTILINE), result
        assert "status exit 0" in console and "swap detached" in console, result
        assert re.search(r"^agent exit 0$", console, re.MULTILINE), result
        if servers[KILLED] in placed[name]:
            assert re.search(rf"{servers[KILLED]}:10809 is back as /dev/nbd\d+, re-added", console), result
    adopter = results[ADOPTER].console
    assert re.search(r"^agent killed$", adopter, re.MULTILINE), adopter
    assert re.search(r"adopted /dev/md\d+ \(swap/echo of ", adopter), adopter
    assert len(re.findall(r"/dev/nbd\d+: adopted, 1 of 1 connection", adopter)) == 2, adopter
    stalls = {name: re.findall(r"^longest page (?:write|read): ([\d.]+) s", r.console, re.MULTILINE)
              for name, r in results.items()}
    print(f"\nserver {servers[KILLED]} SIGKILLed mid-swap, restarted after every node had "
          f"checked its pages; longest page write / read per node (s): {stalls}")
