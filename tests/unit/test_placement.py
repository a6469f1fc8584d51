"""Rendezvous placement (netswap.node.placement): stable, spread, and moving few nodes when the
server list changes."""

from __future__ import annotations

from collections import Counter

from netswap.node.placement import rank, weight

SERVERS = [(f"10.0.0.{n}", 10809) for n in range(1, 5)]
FIFTH = ("10.0.0.5", 10809)
NODES = [f"node-{n:04d}" for n in range(1000)]


def placed(servers, copies=1):
    return {node: tuple(rank(node, servers)[:copies]) for node in NODES}


def test_the_ranking_is_the_same_on_every_machine_and_in_every_list_order():
    # BLAKE2b, not hash(): the same on every node, every Python, every run.
    assert weight("10.0.0.1:10809", "node-0001") == weight("10.0.0.1:10809", "node-0001")
    assert weight("10.0.0.1:10809", "node-0001") != weight("10.0.0.1:10810", "node-0001")
    assert rank("node-0001", SERVERS) == rank("node-0001", list(reversed(SERVERS)))
    assert sorted(rank("node-0001", SERVERS)) == sorted(SERVERS)
    # Pinned: a change of the hash would move every node of every cluster on upgrade.
    assert weight("10.0.0.1:10809", "node-0001") == 0x92FB86C298073E62
    assert [host for host, _ in rank("node-0001", SERVERS)] == [
        "10.0.0.2", "10.0.0.4", "10.0.0.1", "10.0.0.3"]


def test_nodes_spread_evenly_over_the_servers():
    counts = Counter(first for (first,) in placed(SERVERS).values())
    print({f"{host}": count for (host, _), count in sorted(counts.items())})
    assert set(counts) == set(SERVERS)
    for count in counts.values():
        assert 250 * 0.8 < count < 250 * 1.2, counts


def test_adding_a_fifth_server_moves_about_a_fifth_of_the_nodes_and_only_to_it():
    before, after = placed(SERVERS), placed([*SERVERS, FIFTH])
    moved = [node for node in NODES if before[node] != after[node]]
    print(f"moved {len(moved)} of {len(NODES)} nodes")
    assert 0.15 * len(NODES) < len(moved) < 0.25 * len(NODES)
    assert all(after[node] == (FIFTH,) for node in moved)


def test_removing_a_server_moves_only_its_own_nodes_each_to_its_next_in_rank():
    before = placed(SERVERS)
    after = placed(SERVERS[1:])
    for node in NODES:
        if before[node] != (SERVERS[0],):
            assert after[node] == before[node]
        else:
            assert after[node] == (rank(node, SERVERS)[1],)


def test_mirrored_pairs_are_two_different_servers_and_a_fifth_touches_about_two_fifths():
    before, after = placed(SERVERS, 2), placed([*SERVERS, FIFTH], 2)
    assert all(len(set(pair)) == 2 for pair in before.values())
    changed = [node for node in NODES if set(before[node]) != set(after[node])]
    print(f"pairs changed: {len(changed)} of {len(NODES)}")
    # The new server enters a node's pair when it outweighs one of its two: 2/5 of nodes,
    # and then it replaces exactly one member.
    assert 0.32 * len(NODES) < len(changed) < 0.48 * len(NODES)
    for node in changed:
        assert FIFTH in after[node] and len(set(before[node]) & set(after[node])) == 1
