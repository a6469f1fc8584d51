"""The Prometheus endpoint: the pool, the reserve tree and the drop counters, scraped from a
real netswapd while a node is attached."""

from conftest import import_libnbd
from prometheus_client.parser import text_string_to_metric_families

nbd = import_libnbd()


def samples(text):
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_reserve_tree_and_pool_are_exported(daemon):
    h = nbd.NBD()
    h.connect_uri(daemon.uri("swap/metric-node"))
    h.pwrite(b"x" * 65536, 0)
    values = samples(daemon.metrics())
    h.shutdown()
    assert values[("netswap_pool_size_bytes", ())] > 0
    assert values[("netswap_pool_watermark_bytes", ())] > 0  # the attached node's reserve
    reservation = {labels[0][1]: v for (name, labels), v in values.items()
                   if name == "netswap_reserve_group_reservation_bytes"}
    assert "netswapd/normal" in reservation and "netswapd/nbd/unrouted" in reservation
    assert reservation["netswapd/nbd/swap/metric-node/requests"] > 0
    assert reservation["netswapd"] == sum(v for k, v in reservation.items() if k.count("/") == 1)
    assert ("netswap_reserve_group_usage_bytes", (("group", "netswapd/nbd/swap/metric-node/requests"),)) in values
    assert values[("netswap_connections", ())] >= 1
    assert any(name == "netswap_pool_allocations_total" for name, _ in values)
