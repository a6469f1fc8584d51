"""The NBD front end's metrics: open connections, per-request statistics
(counters.RequestStats), exports whose storage failed, and the events nbd/ declared."""

from __future__ import annotations

import errno
from typing import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..metrics import cumulative, event_families
from . import constants as C

# Label values of NBD error numbers: the spec's names (ENOTSUP, not Linux's EOPNOTSUPP).
_ERRNO_NAMES = {C.EPERM: "EPERM", C.EIO: "EIO", C.ENOMEM: "ENOMEM", C.EINVAL: "EINVAL",
                C.ENOSPC: "ENOSPC", C.EOVERFLOW: "EOVERFLOW", C.ENOTSUP: "ENOTSUP",
                C.ESHUTDOWN: "ESHUTDOWN"}


class NbdCollector:
    """`connection_count()` gives the open NBD connections; `registry` the exports (only
    those already open are read: none is ever opened for a scrape)."""

    def __init__(self, counters, connection_count: Callable[[], int], registry) -> None:
        self._counters = counters
        self._connection_count = connection_count
        self._registry = registry

    def collect(self) -> Iterator:
        yield GaugeMetricFamily("netswap_connections", "Open NBD client connections.",
                                value=self._connection_count())
        yield from self._request_metrics()
        yield from self._export_metrics()
        yield from event_families(self._counters, "nbd")

    def _request_metrics(self) -> Iterator:
        labels = ["export", "op"]
        requests = CounterMetricFamily("netswap_requests",
                                       "NBD requests answered (or whose client went away).",
                                       labels=labels)
        nbytes = CounterMetricFamily(
            "netswap_request_bytes",
            "Bytes covered by successful requests: a READ's or WRITE's payload, "
            "the range a TRIM, WRITE_ZEROES, CACHE or BLOCK_STATUS names.",
            labels=labels)
        errors = CounterMetricFamily("netswap_request_errors",
                                     "Requests answered with an error, by NBD error.",
                                     labels=labels + ["errno"])
        latency = HistogramMetricFamily(
            "netswap_request_duration_seconds",
            "Time from a request's header being parsed to its reply being sent.",
            labels=labels)
        for stats in self._counters.requests.snapshot():
            key = [stats.export, stats.op]
            requests.add_metric(key, stats.requests)
            nbytes.add_metric(key, stats.bytes)
            for error, count in sorted(stats.errors.items()):
                name = _ERRNO_NAMES.get(error) or errno.errorcode.get(error, str(error))
                errors.add_metric(key + [name], count)
            latency.add_metric(key, cumulative(stats.buckets), stats.latency_seconds)
        yield from (requests, nbytes, errors, latency)

    def _export_metrics(self) -> Iterator:
        failed = GaugeMetricFamily(
            "netswap_export_failed",
            "1 once an export's storage failed for good (a sync failed, or its backing file "
            "was deleted or replaced): writes and flushes get EIO until a restart.",
            labels=["export"])
        syncs = CounterMetricFamily(
            "netswap_export_flush_syncs",
            "fdatasyncs run to answer FLUSHes (and NFS COMMITs) of a file export: one answers "
            "every FLUSH waiting when it started, none runs when nothing was written since "
            "the last (compare netswap_requests_total{op=\"flush\"}).",
            labels=["export"])
        for export in self._registry.open_exports():
            failed.add_metric([export.name], int(export.backend.failure is not None))
            count = getattr(export.backend, "syncs", None)
            if count is not None:
                syncs.add_metric([export.name], count)
        yield failed
        yield syncs
