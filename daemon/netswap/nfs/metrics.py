"""The NFS front end's metrics: open connections per service, per-call latency
(counters.CallStats) and the events nfs/ and rpc/ declared."""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from ..metrics import cumulative, event_families


class NfsCollector:
    """`nfs` is the NfsService, None when NFS is off (its events then stay empty)."""

    def __init__(self, counters, nfs=None) -> None:
        self._counters = counters
        self._nfs = nfs

    def collect(self) -> Iterator:
        if self._nfs is not None:
            open_now = GaugeMetricFamily("netswap_rpc_open_connections",
                                         "Open NFS-side connections, by service.",
                                         labels=["service"])
            for service, count in sorted(self._nfs.connection_counts().items()):
                open_now.add_metric([service], count)
            yield open_now
        calls = HistogramMetricFamily(
            "netswap_rpc_call_duration_seconds",
            "Time from an RPC call's record being received to its reply being sent, by "
            "service (nfs, mount, portmap) and procedure.", labels=["service", "procedure"])
        for stats in self._counters.calls.snapshot():
            calls.add_metric([stats.export, stats.op], cumulative(stats.buckets),
                             stats.latency_seconds)
        yield calls
        yield from event_families(self._counters, "nfs")
