"""The reserve's metrics: the C pool's counters (one locked snapshot), the reservation
groups, and the reserve events (counters.declare in reserve/tree.py)."""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..metrics import event_families


class ReserveCollector:
    def __init__(self, pool, tree, counters) -> None:
        self._pool = pool
        self._tree = tree
        self._counters = counters

    def collect(self) -> Iterator:
        yield from self._pool_metrics()
        yield from self._group_metrics()
        yield from event_families(self._counters, "reserve")

    def _pool_metrics(self) -> Iterator:
        pool, stats = self._pool, self._pool.stats()
        gauges = [
            ("netswap_pool_size_bytes", "Bytes in the request-memory pool.", pool.size),
            ("netswap_pool_locked_bytes", "Bytes of the pool locked in RAM.", pool.locked_bytes),
            ("netswap_pool_faulted_bytes",
             "Pool bytes faulted in, which allocations may use (the size once the start-up "
             "prefault is done).", pool.faulted_bytes),
            ("netswap_pool_free_bytes", "Pool bytes not allocated.", stats["free_bytes"]),
            ("netswap_pool_watermark_bytes",
             "Free bytes normal allocations may not go below (attached nodes' reserves).",
             stats["watermark"]),
            ("netswap_pool_reserve_in_use_bytes", "Pool bytes allocated from the reserve.",
             stats["emergency_in_use_bytes"]),
            ("netswap_pool_high_water_bytes", "Most pool bytes ever allocated at once.",
             stats["high_water_bytes"]),
        ]
        for name, help_text, value in gauges:
            yield GaugeMetricFamily(name, help_text, value=value)
        counters = [
            ("netswap_pool_allocations", "Pool allocations.", stats["allocs"]),
            ("netswap_pool_waits", "Pool allocations that had to wait.", stats["waits"]),
            ("netswap_pool_failures", "Pool allocations that found nothing in time.",
             stats["failures"]),
            ("netswap_emergency_allocations", "Allocations served from the reserve.",
             stats["emergency_allocs"]),
        ]
        for name, help_text, value in counters:
            yield CounterMetricFamily(name, help_text, value=value)

    def _group_metrics(self) -> Iterator:
        reservation = GaugeMetricFamily("netswap_reserve_group_reservation_bytes",
                                        "Bytes a reservation group reserves (all its copies).",
                                        labels=["group"])
        usage = GaugeMetricFamily("netswap_reserve_group_usage_bytes",
                                  "Bytes a group holds below the watermark now.", labels=["group"])
        high = GaugeMetricFamily("netswap_reserve_group_high_water_bytes",
                                 "Most bytes a group ever held below the watermark.",
                                 labels=["group"])
        waits = CounterMetricFamily("netswap_reserve_group_charge_waits",
                                    "Charges that waited for the group's usage to drop.",
                                    labels=["group"])
        failures = CounterMetricFamily("netswap_reserve_group_charge_failures",
                                       "Charges refused because the group's reserve was full.",
                                       labels=["group"])
        for path, group in _paths(self._tree):
            reservation.add_metric([path], group.total)
            usage.add_metric([path], group.usage())
            if group.pool_group is not None:
                stats = group.pool_group.stats()
                high.add_metric([path], stats["high_water"])
                waits.add_metric([path], stats["charge_waits"])
                failures.add_metric([path], stats["charge_failures"])
        yield from (reservation, usage, high, waits, failures)


def _paths(tree, prefix: str = "") -> Iterator:
    path = f"{prefix}/{tree.name}" if prefix else tree.name
    yield path, tree
    for child in tree.children:
        yield from _paths(child, path)
