"""Prometheus metrics: state is read at scrape time, never pushed from the data path.

The collector reads the C pool's counters (one locked snapshot), the reservation tree's
groups, the daemon's event counters and the pressure monitor when Prometheus asks; the data
path only increments plain counters. Serving /metrics is a non-swap consumer: its buffers
come from the heap, never from the pool or its reserve.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("netswap.metrics")

# Event counters of the data path (counters.py) exported under their own names, with the
# label each one carries.
_EVENTS = {
    "emergency_dropped": ("netswap_emergency_dropped_total",
                          "Reserve buffers released unprocessed because their consumer is not swap.",
                          "consumer"),
    "attach_refused": ("netswap_attach_refused_total",
                       "Swap attaches refused because the pool could not back the reserve.",
                       "reason"),
    "enomem": ("netswap_non_swap_enomem_total",
               "Non-swap requests answered ENOMEM because the normal budget was gone.", "export"),
    "pool_waits": ("netswap_held_back_total",
                   "Requests that waited for pool memory (the reader stopped reading).",
                   "consumer"),
    "pressure_throttled": ("netswap_pressure_throttled_total",
                           "Non-swap requests passed one at a time under memory pressure.",
                           "export"),
    "protocol_errors": ("netswap_protocol_errors_total",
                        "Connections closed for breaking the protocol.", "reason"),
}


class NetswapCollector:
    def __init__(self, pool, tree, counters, server=None, pressure=None) -> None:
        self._pool = pool
        self._tree = tree
        self._counters = counters
        self._server = server
        self._pressure = pressure

    def collect(self) -> Iterator:
        yield from self._pool_metrics()
        yield from self._group_metrics()
        yield from self._event_metrics()
        if self._server is not None:
            yield GaugeMetricFamily("netswap_connections", "Open client connections.",
                                    value=self._server.connection_count)
        if self._pressure is not None:
            yield GaugeMetricFamily("netswap_emergency_mode",
                                    "1 while memory pressure holds non-swap exports back.",
                                    value=int(self._pressure.emergency))
            yield CounterMetricFamily("netswap_emergency_mode_transitions",
                                      "Entries into and exits from emergency mode.",
                                      value=self._pressure.transitions)

    def _pool_metrics(self) -> Iterator:
        pool, stats = self._pool, self._pool.stats()
        gauges = [
            ("netswap_pool_size_bytes", "Bytes in the request-memory pool.", pool.size),
            ("netswap_pool_locked_bytes", "Bytes of the pool locked in RAM.", pool.locked_bytes),
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

    def _event_metrics(self) -> Iterator:
        families = {key: CounterMetricFamily(name, help_text, labels=[label])
                    for key, (name, help_text, label) in _EVENTS.items()}
        for (event, label), value in self._counters.snapshot().items():
            family = families.get(event)
            if family is not None:
                family.add_metric([label], value)
        yield from families.values()


def _paths(tree, prefix: str = "") -> Iterator:
    path = f"{prefix}/{tree.name}" if prefix else tree.name
    yield path, tree
    for child in tree.children:
        yield from _paths(child, path)


class MetricsServer:
    """/metrics on each configured address, each in its own HTTP server thread."""

    def __init__(self, collector: NetswapCollector, listen) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._listen = listen
        self._servers: list = []

    def start(self) -> list[str]:
        addresses = []
        for host, port in self._listen:
            address = {"": "::", "*": "::", "localhost": "127.0.0.1"}.get(host, host)
            server, _thread = start_http_server(port, address, registry=self.registry)
            self._servers.append(server)
            bound = server.server_address
            addresses.append(f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}")
        return addresses

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()


def serve(collector: NetswapCollector, listen) -> Optional[MetricsServer]:
    if not listen:
        return None
    server = MetricsServer(collector, listen)
    try:
        log.info("metrics on %s", ", ".join(server.start()))
    except OSError as exc:
        server.stop()
        raise OSError(exc.errno, f"metrics.listen: cannot listen: {exc.strerror}") from exc
    return server
