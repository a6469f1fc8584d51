"""The reservation tree sizes the pool; the lifecycle attaches and detaches nodes' reserves."""

import time
from types import SimpleNamespace

import pytest

from netswap import config as configuration
from netswap.counters import Counters
from netswap.errors import AttachRefused
from netswap.swap.attach import Lifecycle, NodeAttached, NodeSlots
from netswap.reserve.pool import Pool
from netswap.reserve.tree import build_tree, pool_size, render

MiB = 1 << 20
KiB = 1 << 10


def make_config(headroom="1MiB", **swap):
    settings = {"max_nodes": 2, "reserve_inflight": 8, "reserve_request": "128KiB",
                "max_connections": 2, "detach_grace": "0.2s", **swap}
    return configuration.parse({
        "daemon": {"state_dir": "/tmp/netswap-tree-test"},
        "pool": {"normal_budget": "32MiB", "headroom": headroom},
        "swap": settings,
    })


def make_lifecycle(config, pool_config=None):
    """A Lifecycle for `config` over a pool sized by `pool_config` (default: the same)."""
    sizing = pool_config or config
    tree = build_tree(sizing)
    pool = Pool(pool_size(sizing, tree), lock="off", min_normal=sizing.pool.normal_budget)
    counters = Counters()
    return Lifecycle(pool, tree, config, counters), pool, tree, counters


def swap_export(node):
    return SimpleNamespace(name=f"swap/{node}", node=node, is_swap=True)


def test_leaves_come_from_config_and_inner_groups_sum_them():
    tree = build_tree(make_config())
    node = (8 * 128 + 2 * 64) * KiB
    assert tree.find("normal").total == 32 * MiB
    assert tree.find("unrouted").total == 8 * 128 * KiB
    assert tree.find("nbd").total == 8 * 128 * KiB + 2 * node
    assert tree.total == 32 * MiB + 8 * 128 * KiB + 2 * node
    assert pool_size(make_config(), tree) == tree.total + MiB


def test_explicit_pool_size_below_the_tree_is_refused_with_the_keys():
    config = configuration.parse({"daemon": {"state_dir": "/tmp/x"}, "pool": {"size": "33MiB"}})
    with pytest.raises(configuration.ConfigError) as err:
        pool_size(config, build_tree(config))
    assert "pool.size" in str(err.value) and "auto" in str(err.value)


def test_render_is_an_indented_tree_with_reservation_and_usage():
    text = render(build_tree(make_config()))
    lines = text.splitlines()
    assert lines[0].split() == ["group", "reserved", "used"]
    assert lines[1].startswith("netswapd") and lines[2].startswith("  normal")
    assert any(line.startswith("    swap/<node> ×2") for line in lines)
    assert any(line.startswith("      requests") and "8 × 128KiB" in line for line in lines)


@pytest.fixture
def lifecycle():
    made = make_lifecycle(make_config())
    yield made
    made[0].close()


def test_attach_raises_the_watermark_and_detach_after_grace_lowers_it(lifecycle):
    life, pool, tree, counters = lifecycle
    base = pool.watermark  # the unrouted group is connected for the daemon's life
    assert base == tree.find("unrouted").total
    first = life.attach(swap_export("a"))
    node = (8 * 128 + 2 * 64) * KiB
    assert pool.watermark == base + node
    second = life.attach(swap_export("a"))  # the node's second connection shares its reserve
    assert pool.watermark == base + node and second.requests is first.requests
    assert tree.find("swap/a") is not None
    first.release()
    second.release()
    assert pool.watermark == base + node  # within the grace period the reserve stays
    time.sleep(0.5)
    assert pool.watermark == base and tree.find("swap/a") is None
    assert counters.get("swap_attaches") == 1 and counters.get("swap_detaches") == 1


def test_reattach_within_grace_keeps_the_same_reserve(lifecycle):
    life, pool, _, counters = lifecycle
    attachment = life.attach(swap_export("b"))
    group = attachment.requests
    attachment.release()
    again = life.attach(swap_export("b"))
    time.sleep(0.4)
    assert again.requests is group and group.connected
    again.release()


def test_attach_beyond_what_the_pool_backs_is_refused():
    # A pool sized for 2 nodes under a lifecycle that would allow 4: the pool is the limit.
    life, pool, _, counters = make_lifecycle(make_config(max_nodes=4), make_config())
    try:
        life.attach(swap_export("n1"))
        life.attach(swap_export("n2"))
        watermark = pool.watermark
        with pytest.raises(AttachRefused) as err:
            life.attach(swap_export("n3"))
        assert "n3" in str(err.value) and err.value.reason == "reserve"
        assert pool.watermark == watermark  # a refused attach leaves nothing connected
        assert counters.get("attach_refused", "reserve") == 1
    finally:
        life.close()


def test_attach_beyond_max_nodes_is_refused_though_headroom_could_back_it():
    # 8 MiB of headroom backs several more nodes' reserves (1152 KiB each); it is the
    # allocator's slack, and max_nodes is what the server promises.
    life, pool, _, counters = make_lifecycle(make_config(headroom="8MiB"))
    try:
        first = life.attach(swap_export("n1"))
        life.attach(swap_export("n2"))
        watermark = pool.watermark
        with pytest.raises(AttachRefused) as err:
            life.attach(swap_export("n3"))
        assert err.value.reason == "max_nodes" and "node slots" in str(err.value)
        assert pool.watermark == watermark
        assert counters.get("attach_refused", "max_nodes") == 1
        # The node holding a slot attaches again (a second connection) without another one.
        life.attach(swap_export("n1")).release()
        # Once a node's grace period has ended its slot is free again.
        first.release()
        time.sleep(0.5)
        life.attach(swap_export("n3"))
    finally:
        life.close()


def test_non_swap_exports_attach_without_a_reserve(lifecycle):
    life, pool, _, _ = lifecycle
    before = pool.watermark
    attachment = life.attach(SimpleNamespace(name="disk", is_swap=False))
    assert not attachment.is_swap and pool.watermark == before
    attachment.release()


def test_node_slots_count_nodes_holding_a_reserve_grace_included(lifecycle):
    life, _, _, _ = lifecycle
    assert (life.node_slots().total, life.node_slots().free) == (2, 2)
    first = life.attach(swap_export("n1"))
    assert life.node_slots().free == 1
    second = life.attach(swap_export("n1"))  # the same node: no second slot
    assert life.node_slots().free == 1
    life.attach(swap_export("n2"))
    assert str(life.node_slots()) == "0 of 2 node slots free"
    first.release()
    second.release()
    assert life.node_slots().free == 0  # n1's grace period: its slot is still held
    time.sleep(0.5)
    assert life.node_slots().free == 1
    life.close()
    assert life.node_slots().free == 0  # stopping: nothing attaches any more


def test_node_slots_are_what_the_pool_backs_when_that_is_less():
    life, _, _, _ = make_lifecycle(make_config(max_nodes=4), make_config())
    try:
        assert (life.node_slots().total, life.node_slots().free) == (4, 2)
        life.attach(swap_export("n1"))
        assert life.node_slots().free == 1
        life.attach(swap_export("n2"))
        assert life.node_slots().free == 0
        with pytest.raises(AttachRefused):
            life.attach(swap_export("n3"))
    finally:
        life.close()


def test_no_node_slots_without_swap():
    config = configuration.parse({"daemon": {"state_dir": "/tmp/netswap-tree-test"},
                                  "swap": {"enabled": False}, "nfs": {"enabled": False}})
    life, _, _, _ = make_lifecycle(config)
    try:
        assert life.node_slots() is None
    finally:
        life.close()


def test_a_description_with_slots_is_cut_before_the_count_is():
    slots = NodeSlots(8, 3)
    assert slots.describe("netswap swap", 2048) == "netswap swap; 3 of 8 node slots free"
    assert slots.describe("", 2048) == "3 of 8 node slots free"
    long = slots.describe("é" * 3000, 2048)
    assert long.endswith("; 3 of 8 node slots free") and len(long.encode()) <= 2048


class _Zeroes:
    """A swap export's backend that records its wipes."""

    def __init__(self) -> None:
        self.wipes = 0

    def write_zeroes(self, offset, length, may_trim, fua):
        self.wipes += 1


def wiped_swap_export(node):
    return SimpleNamespace(name=f"swap/{node}", node=node, is_swap=True, size=MiB,
                           backend=_Zeroes())


@pytest.mark.parametrize("swap_wipe", [True, False], ids=["swap.wipe", "detach --wipe"])
def test_an_operators_detach_does_not_wipe_a_node_attached_again_meanwhile(swap_wipe):
    """netswapctl detach closes the node's connections, waits until none is attached, then
    releases (and wipes) it. A connection attaching in between must not be wiped under
    (its WRITEs would land after the zeroing) nor have its reserve pulled."""
    life, _, _, _ = make_lifecycle(make_config(wipe=swap_wipe, detach_grace="60s"))
    try:
        export = wiped_swap_export("d")
        life.attach(export).release()  # its connections closed: the detach saw none
        if not swap_wipe:
            assert life.release_now("d")  # released; detach --wipe wipes after that
        again = life.attach(export)  # the node came back before the wipe
        with pytest.raises(NodeAttached):
            if swap_wipe:
                life.release_now("d")  # swap.wipe wipes as it releases
            else:
                life.wipe(export, "operator's detach --wipe")
        assert export.backend.wipes == 0
        assert again.requests.connected and life.attached_nodes() == {"d": 1}
        again.release()
        # Once it is gone, the operator's detach goes through, wipe and all.
        assert life.release_now("d")
        if not swap_wipe:
            life.wipe(export, "operator's detach --wipe")
        assert export.backend.wipes == 1
    finally:
        life.close()
