"""Prometheus metrics: state is read at scrape time, never pushed from the data path.

The collector reads the C pool's counters (one locked snapshot), the reservation tree's
groups, the daemon's event counters, the per-request statistics (counters.RequestStats), the
attached nodes and the pressure monitor when Prometheus asks; the data path only increments
plain counters. No lock it takes is held by the data path for more than a few counter
updates. Serving /metrics is a non-swap consumer: its buffers come from the heap, never from
the pool or its reserve.

Names follow Prometheus conventions: prefix netswap_, base units (bytes, seconds, ratios
0..1), counters end in _total (prometheus-client appends it to CounterMetricFamily names).
"""

from __future__ import annotations

import errno
import logging
from typing import Iterator, Optional

from prometheus_client import start_http_server
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from .counters import LATENCY_BUCKETS
from .nbd import constants as C

log = logging.getLogger("netswap.metrics")

# Event counters of the data path (counters.py) exported under their own names, with the
# label each one carries (None: the event has none, and its counter is exported even at 0).
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
    "handshake_failed": ("netswap_handshakes_failed_total",
                         "Connections that ended in the handshake without GO, EXPORT_NAME or "
                         "ABORT, by reason (a protocol error's reason, connection_lost, closed, "
                         "or truncated: closed in the middle of a message).", "reason"),
    "options_refused": ("netswap_options_refused_total",
                        "Handshake options answered with an error reply, by reason "
                        "(unsupported_option, malformed_option, unknown_export, "
                        "export_unavailable, attach_refused).", "reason"),
    "connections_accepted": ("netswap_connections_accepted_total",
                             "Client connections accepted.", None),
    "connection_lost": ("netswap_connections_lost_total",
                        "Connections ended by a socket error, by exception.", "reason"),
    "export_open_failures": ("netswap_export_open_failures_total",
                             "Exports that exist but could not be opened for a client.", None),
    "socket_tag_failures": ("netswap_socket_tag_failures_total",
                            "Swap sockets whose kernel tagging (priority, DSCP, mark, buffers) "
                            "was incomplete.", None),
    "swap_attaches": ("netswap_node_attaches_total",
                      "Nodes whose reserve was connected (first NBD connection, or NFS MNT or "
                      "swap-file I/O, after none).", None),
    "swap_detaches": ("netswap_node_detaches_total",
                      "Nodes whose reserve was released after the detach grace period.", None),
    "send_timeouts": ("netswap_send_timeouts_total",
                      "Clients disconnected for taking no replies for nbd.send_timeout (NBD) "
                      "or nfs.send_timeout (NFS).", None),
    "io_errors": ("netswap_backend_errors_total",
                  "Requests the backing storage refused or failed, by request:NBD errno.",
                  "request"),
    "access_denied": ("netswap_access_denied_total",
                      "Clients refused an export by an allow list, a swap binding or secret, "
                      'as "export:reason" ("swap" for every node\'s swap export).', "export_reason"),
    "wipes": ("netswap_wipes_total",
              "Exports whose contents were discarded (wipe = true, or netswapctl detach --wipe).",
              "export"),
    "wipe_failures": ("netswap_wipe_failures_total",
                      "Wipes that failed: the export's old contents remain (logged).", "export"),
    "tls_handshakes": ("netswap_tls_handshakes_total",
                       "TLS sessions established after STARTTLS, by TLS version.", "version"),
    "tls_handshake_failures": ("netswap_tls_handshake_failures_total",
                               "TLS handshakes after STARTTLS that failed (the connection was "
                               "closed), by reason.", "reason"),
    "tls_required_refusals": ("netswap_tls_required_refusals_total",
                              "Options refused with ERR_TLS_REQD (or EXPORT_NAME closed) "
                              "because the listener requires TLS.", None),
    "c_loop_handoffs": ("netswap_c_loop_handoffs_total",
                        "Times the C request loop handed a connection to the Python path, by "
                        "reason (python: a request only Python serves; queued_reply: a reply "
                        "that had to wait for the socket; write_error: a failed write; the "
                        "NFS call loop's nfs_python, nfs_queued_reply, nfs_io_error likewise).",
                        "reason"),
    "rpc_connections": ("netswap_rpc_connections_total",
                        "NFS and MOUNT connections accepted, by service.", "service"),
    "rpc_protocol_errors": ("netswap_rpc_protocol_errors_total",
                            "RPC records and calls refused (the record cap, no xid, wrong "
                            "version, credentials, garbage arguments, unknown program or "
                            "procedure), by reason.", "reason"),
    "nfs_calls": ("netswap_nfs_calls_total", "NFSv3 calls, by procedure.", "procedure"),
    "nfs_errors": ("netswap_nfs_errors_total",
                   "NFSv3 calls answered with an NFS3ERR status, by status number.", "status"),
    "mount_calls": ("netswap_mount_calls_total", "MOUNT v3 calls, by procedure.", "procedure"),
    "nfs_bytes": ("netswap_nfs_bytes_total",
                  "Payload bytes of NFS READs and WRITEs that succeeded, by procedure.",
                  "procedure"),
    "nfs_node_releases": ("netswap_nfs_node_releases_total",
                          "NFS swap nodes whose reserve the NFS side gave back, by reason "
                          "(umnt, idle, stop); swap.detach_grace runs after it.", "reason"),
    "portmap_calls": ("netswap_portmap_calls_total",
                      "Portmapper calls served (PMAP v2, rpcbind v3/v4), by procedure.",
                      "procedure"),
    "rpcbind_registration_failures": ("netswap_rpcbind_registration_failures_total",
                                      "NFS and MOUNT mappings the local rpcbind did not take "
                                      "(or give back at stop), by reason.", "reason"),
    "internal_errors": ("netswap_internal_errors_total",
                        "Connections closed by a bug in netswapd (logged with a traceback).", None),
}

# Connections refused before their handshake. A connection limit counts its refusals as
# ("connections_refused", reason); accept(2) failures (EMFILE, ENOBUFS, ...) are counted by
# the server as ("accept_errors", exception class) and exported as reason="accept_error".
_REFUSALS = {"connections_refused": None, "accept_errors": "accept_error"}

# Label values of NBD error numbers: the spec's names (ENOTSUP, not Linux's EOPNOTSUPP).
_ERRNO_NAMES = {C.EPERM: "EPERM", C.EIO: "EIO", C.ENOMEM: "ENOMEM", C.EINVAL: "EINVAL",
                C.ENOSPC: "ENOSPC", C.EOVERFLOW: "EOVERFLOW", C.ENOTSUP: "ENOTSUP",
                C.ESHUTDOWN: "ESHUTDOWN"}

_BUCKET_BOUNDS = [f"{bound:g}" for bound in LATENCY_BUCKETS] + ["+Inf"]


def _cumulative(counts) -> list[tuple[str, int]]:
    """Per-bucket counts -> Prometheus' cumulative (le, count) pairs."""
    total, buckets = 0, []
    for bound, count in zip(_BUCKET_BOUNDS, counts):
        total += count
        buckets.append((bound, total))
    return buckets


class NetswapCollector:
    """Reads the daemon's state when Prometheus scrapes.

    `server` (the NbdServer) also gives the export registry and the lifecycle; `pressure` is
    the PressureMonitor, None when it is disabled; `protection` the ProtectionReport of
    protect.protect_process, None if the daemon did not protect itself; `nfs` the
    NfsService, None when NFS is off.
    """

    def __init__(self, pool, tree, counters, server=None, pressure=None, protection=None,
                 nfs=None) -> None:
        self._nfs = nfs
        self._pool = pool
        self._tree = tree
        self._counters = counters
        self._server = server
        self._pressure = pressure
        self._protection = protection

    def collect(self) -> Iterator:
        yield from self._pool_metrics()
        yield from self._group_metrics()
        yield from self._event_metrics()
        yield from self._request_metrics()
        if self._server is not None:
            yield GaugeMetricFamily("netswap_connections", "Open NBD client connections.",
                                    value=self._server.connection_count)
            yield from self._node_metrics()
            yield from self._export_metrics()
        if self._nfs is not None:
            open_now = GaugeMetricFamily("netswap_rpc_open_connections",
                                         "Open NFS-side connections, by service.",
                                         labels=["service"])
            for service, count in sorted(self._nfs.connection_counts().items()):
                open_now.add_metric([service], count)
            yield open_now
        if self._pressure is not None:
            yield from self._pressure_metrics()
        if self._protection is not None:
            yield from self._protection_metrics()

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

    def _event_metrics(self) -> Iterator:
        families = {key: CounterMetricFamily(name, help_text, labels=[label] if label else None)
                    for key, (name, help_text, label) in _EVENTS.items()}
        refused = CounterMetricFamily(
            "netswap_connections_refused_total",
            "Client connections refused before their handshake, by reason.", labels=["reason"])
        unlabelled = {key: 0 for key, (_, _, label) in _EVENTS.items() if label is None}
        refusals: dict[str, int] = {}
        for (event, label), value in self._counters.snapshot().items():
            if event in unlabelled:
                unlabelled[event] += value
            elif event in families:
                families[event].add_metric([label], value)
            elif event in _REFUSALS:
                reason = _REFUSALS[event] or label
                refusals[reason] = refusals.get(reason, 0) + value
        for event, value in unlabelled.items():
            families[event].add_metric([], value)
        for reason, value in refusals.items():
            refused.add_metric([reason], value)
        yield from families.values()
        yield refused

    def _request_metrics(self) -> Iterator:
        labels = ["export", "op"]
        requests = CounterMetricFamily("netswap_requests",
                                       "NBD requests answered (or whose client went away).",
                                       labels=labels)
        nbytes = CounterMetricFamily(
            "netswap_request_bytes",
            "Bytes covered by successful requests (the payload of READ and WRITE).",
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
            latency.add_metric(key, _cumulative(stats.buckets), stats.latency_seconds)
        yield from (requests, nbytes, errors, latency)
        calls = HistogramMetricFamily(
            "netswap_rpc_call_duration_seconds",
            "Time from an RPC call's record being received to its reply being sent, by "
            "service (nfs, mount, portmap) and procedure.", labels=["service", "procedure"])
        for stats in self._counters.calls.snapshot():
            calls.add_metric([stats.export, stats.op], _cumulative(stats.buckets),
                             stats.latency_seconds)
        yield calls

    def _node_metrics(self) -> Iterator:
        """Attached nodes (reserve connected, grace period included) and their swap: the NBD
        export, or an NFS-only node's swap file. Only exports and files already open are
        read: neither is ever opened for a scrape."""
        labels = ["node", "export"]
        connections = GaugeMetricFamily(
            "netswap_node_connections",
            "Connections of an attached node (0 during the detach grace period).", labels=labels)
        size = GaugeMetricFamily("netswap_node_swap_size_bytes",
                                 "Size of an attached node's swap export.", labels=labels)
        used = GaugeMetricFamily(
            "netswap_node_swap_used_bytes",
            "Bytes of storage an attached node's swap export holds; trimmed ranges are released "
            "(a memory export under mlockall keeps them, zeroed).",
            labels=labels)
        server = self._server
        exports = server.registry.swap_exports()
        swap_files = self._nfs.exports.swap if self._nfs is not None else None
        for node, count in sorted(server.lifecycle.attached_nodes().items()):
            export = exports.get(node)
            if export is None and swap_files is not None:
                export = swap_files.opened(node)  # an NFS-only node: its swap file
            if export is None:
                continue
            key = [node, export.name]
            connections.add_metric(key, count)
            size.add_metric(key, export.size)
            try:
                # st_blocks of the image, or the map's pages holding data (a read of
                # /proc/self/pagemap: ~20 ms per 4 GiB, paid by the scrape, not by requests).
                used.add_metric(key, export.backend.allocated_bytes())
            except (OSError, ValueError) as exc:
                # Closed under us at shutdown: the node's other series still say it is there.
                log.debug("metrics: swap of node %r not readable: %s", node, exc)
        yield from (connections, size, used)

    def _export_metrics(self) -> Iterator:
        failed = GaugeMetricFamily(
            "netswap_export_failed",
            "1 once an export's storage failed for good (a sync failed, or its backing file "
            "was deleted or replaced): writes and flushes get EIO until a restart.",
            labels=["export"])
        for export in self._server.registry.open_exports():
            failed.add_metric([export.name], int(export.backend.failure is not None))
        yield failed

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
