"""Prometheus metrics: state is read at scrape time, never pushed from the data path.

Each subsystem has its own collector beside its code (reserve/, transport/, nbd/, nfs/,
swap/metrics.py); this module holds what they share (the event families, histogram
buckets), the daemon's own collector (pressure, self-protection, reloads, access) and the
HTTP server. An event counter is exported by the collector of the subsystem that declared
it (counters.declare), so declaring one is all it takes to export it.

The data path only increments plain counters. No lock a collector takes is held by the data
path for more than a few counter updates. Serving /metrics is a non-swap consumer: its
buffers come from the heap, never from the pool or its reserve.

Names follow Prometheus conventions: prefix netswap_, base units (bytes, seconds, ratios
0..1), counters end in _total (prometheus-client appends it to CounterMetricFamily names).
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily

from .counters import EVENTS, LATENCY_BUCKETS, Counters

log = logging.getLogger("netswap.metrics")

_BUCKET_BOUNDS = [f"{bound:g}" for bound in LATENCY_BUCKETS] + ["+Inf"]


def cumulative(counts) -> list[tuple[str, int]]:
    """Per-bucket counts (counters.OpSnapshot.buckets) -> Prometheus' cumulative (le, count)
    pairs."""
    total, buckets = 0, []
    for bound, count in zip(_BUCKET_BOUNDS, counts):
        total += count
        buckets.append((bound, total))
    return buckets


def event_families(counters: Counters, subsystem: str) -> Iterator[CounterMetricFamily]:
    """The counters of the events `subsystem` declared, one family each. An event without a
    label is exported even at 0; a labelled one has a series per label counted so far."""
    events = [event for event in EVENTS.values() if event.subsystem == subsystem]
    families = {event.key: CounterMetricFamily(event.metric, event.help,
                                               labels=[event.label] if event.label else None)
                for event in events}
    unlabelled = {event.key: 0 for event in events if event.label is None}
    for (key, label), value in counters.snapshot().items():
        if key in unlabelled:
            unlabelled[key] += value
        elif key in families:
            families[key].add_metric([label], value)
    for key, value in unlabelled.items():
        families[key].add_metric([], value)
    yield from families.values()


class DaemonCollector:
    """The daemon's own state: the pressure monitor (None when disabled), the
    ProtectionReport of protect.protect_process (None if the daemon did not protect itself)
    and the events the daemon declared (reloads, access refusals)."""

    def __init__(self, counters: Counters, pressure=None, protection=None) -> None:
        self._counters = counters
        self._pressure = pressure
        self._protection = protection

    def collect(self) -> Iterator:
        yield from event_families(self._counters, "daemon")
        if self._pressure is not None:
            yield from self._pressure_metrics()
        if self._protection is not None:
            yield from self._protection_metrics()

    def _pressure_metrics(self) -> Iterator:
        pressure = self._pressure
        yield GaugeMetricFamily("netswap_emergency_mode",
                                "1 while memory pressure holds non-swap exports back.",
                                value=int(pressure.emergency))
        yield CounterMetricFamily("netswap_emergency_mode_transitions",
                                  "Entries into and exits from emergency mode.",
                                  value=pressure.transitions)
        yield CounterMetricFamily("netswap_pressure_trigger_events",
                                  "Times the kernel's PSI trigger reported a memory stall.",
                                  value=pressure.trigger_events)
        psi = pressure.psi_some_avg10
        if psi is not None:  # None where the kernel has no PSI
            yield GaugeMetricFamily(
                "netswap_memory_pressure_some_avg10_ratio",
                "Share of the last 10 s in which some task stalled on memory (PSI some avg10), "
                "as the pressure monitor last read it.", value=psi / 100)
        if pressure.available_bytes:  # 0 only until the monitor's first reading
            yield GaugeMetricFamily("netswap_memory_available_bytes",
                                    "MemAvailable as the pressure monitor last read it.",
                                    value=pressure.available_bytes)

    def _protection_metrics(self) -> Iterator:
        report = self._protection
        enabled = GaugeMetricFamily(
            "netswap_protection_enabled",
            "1 if a self-protection took effect at start (mlockall, PR_SET_IO_FLUSHER, "
            "oom_score_adj), else 0.", labels=["what"])
        enabled.add_metric(["mlockall"], int(report.mlockall))
        enabled.add_metric(["io_flusher"], int(report.io_flusher))
        enabled.add_metric(["oom_score_adj"], int(report.oom_score_adj is not None))
        yield enabled


class MetricsServer:
    """/metrics on each configured address, each in its own HTTP server thread."""

    def __init__(self, collectors: Iterable, listen) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        for collector in collectors:
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


def serve(collectors: Iterable, listen) -> Optional[MetricsServer]:
    if not listen:
        return None
    server = MetricsServer(collectors, listen)
    try:
        log.info("metrics on %s", ", ".join(server.start()))
    except OSError as exc:
        server.stop()
        raise OSError(exc.errno, f"metrics.listen: cannot listen: {exc.strerror}") from exc
    return server
