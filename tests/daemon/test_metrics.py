"""The Prometheus endpoint: the pool, the reserve tree and the drop counters, scraped from a
real netswapd while a node is attached."""

from support.daemon import REPO, free_port, start_daemon  # noqa: E402
from support.libnbd import import_libnbd  # noqa: E402
from support.metrics import samples  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from support.nbd_raw import (  # noqa: E402
    closed_by_server, connect_raw, request, simple_reply, transmission,
)

nbd = import_libnbd()


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


# -- per-request statistics, connections, nodes ------------------------------------------------

import struct  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.core import CollectorRegistry  # noqa: E402

from netswap.counters import LATENCY_BUCKETS, Counters, RequestStats  # noqa: E402
from netswap.metrics import DaemonCollector  # noqa: E402
from netswap.nbd import constants as C  # noqa: E402
from netswap.protect import ProtectionReport  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20


def series(values, name):
    """{labels dict as a sorted tuple: value} of one sample name."""
    return {labels: v for (n, labels), v in values.items() if n == name}


def value(values, name, **labels):
    return values.get((name, tuple(sorted(labels.items()))), 0)


def settled(daemon):
    """The exposition once every connection has ended: a request is accounted before its
    connection can finish, so nothing is still on its way into the counters."""
    deadline = time.monotonic() + 10
    while True:
        values = samples(daemon.metrics())
        if values[("netswap_connections", ())] == 0 or time.monotonic() > deadline:
            return values
        time.sleep(0.02)


def test_request_stats_buckets_are_le_and_unknown_commands_share_one_entry():
    stats = RequestStats()
    stats.observe("e", C.CMD_READ, 4096, 0, 10_000)  # exactly 10 µs: the first bucket (le)
    stats.observe("e", C.CMD_READ, 4096, 0, 10_001)  # just above: the second
    stats.observe("e", C.CMD_READ, 4096, C.EIO, 6 * 10**9)  # above the last bound: +Inf
    for command in (42, 43, 60000):
        stats.observe("e", command, 512, C.EINVAL, 1000)
    (read, unknown) = sorted(stats.snapshot(), key=lambda s: s.op)
    assert (read.op, unknown.op) == ("read", "unknown")
    assert read.buckets[:2] == (1, 1) and read.buckets[-1] == 1
    assert len(read.buckets) == len(LATENCY_BUCKETS) + 1
    assert read.requests == 3 and read.bytes == 8192  # the failed read moved no bytes
    assert read.errors == {C.EIO: 1}
    assert read.latency_seconds == pytest.approx(6.000020001)
    assert unknown.requests == 3 and unknown.errors == {C.EINVAL: 3}


def test_request_stats_are_exact_under_concurrent_observers():
    stats = RequestStats()
    threads, per_thread = 8, 20000

    def observe():
        for i in range(per_thread):
            stats.observe("swap/n", C.CMD_WRITE, 4096, 0, i * 1000)

    workers = [threading.Thread(target=observe) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    (write,) = stats.snapshot()
    assert write.requests == threads * per_thread
    assert write.bytes == threads * per_thread * 4096


def test_requests_bytes_errors_and_latency_per_export_and_op(daemon):
    h = nbd.NBD()
    h.set_strict_mode(0)  # let the server, not libnbd, refuse what is invalid
    h.connect_uri(daemon.uri("disk"))
    for i in range(10):
        h.pwrite(bytes([i]) * 65536, i * 65536)
    for i in range(5):
        h.pread(4096, i * 4096)
    h.trim(65536, 0)
    h.flush()
    with pytest.raises(nbd.Error):
        h.pread(4096, 64 * MiB)  # past the end: EINVAL from the server
    h.shutdown()
    ro = nbd.NBD()
    ro.set_strict_mode(0)
    ro.connect_uri(daemon.uri("ro"))
    with pytest.raises(nbd.Error):
        ro.pwrite(b"x" * 512, 0)  # EPERM: the export is read-only
    ro.shutdown()
    sock = transmission(daemon)
    request(sock, 42, 0, 512, cookie=7)  # a command the protocol does not have
    assert simple_reply(sock) == (C.EINVAL, 7)
    sock.close()

    values = settled(daemon)
    assert value(values, "netswap_requests_total", export="disk", op="write") == 10
    assert value(values, "netswap_request_bytes_total", export="disk", op="write") == 10 * 65536
    assert value(values, "netswap_requests_total", export="disk", op="read") == 6
    assert value(values, "netswap_request_bytes_total", export="disk", op="read") == 5 * 4096
    assert value(values, "netswap_request_errors_total", export="disk", op="read",
                 errno="EINVAL") == 1
    assert value(values, "netswap_request_bytes_total", export="disk", op="trim") == 65536
    assert value(values, "netswap_requests_total", export="disk", op="flush") == 1
    assert value(values, "netswap_request_errors_total", export="ro", op="write",
                 errno="EPERM") == 1
    assert value(values, "netswap_request_errors_total", export="disk", op="unknown",
                 errno="EINVAL") == 1

    for op, count in (("write", 10), ("read", 6), ("trim", 1), ("flush", 1)):
        key = {"export": "disk", "op": op}
        buckets = sorted(((float(dict(labels)["le"]), v) for labels, v in
                          series(values, "netswap_request_duration_seconds_bucket").items()
                          if {k: v for k, v in labels if k != "le"} == key))
        assert len(buckets) == len(LATENCY_BUCKETS) + 1
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), "cumulative buckets never decrease"
        assert counts[-1] == count == value(values, "netswap_request_duration_seconds_count", **key)
        assert 0 < value(values, "netswap_request_duration_seconds_sum", **key) < count * 5


def test_connection_and_handshake_counters(daemon):
    sock = connect_raw(daemon)
    sock.sendall(struct.pack(">QII", 0xBADBADBAD, C.OPT_GO, 0))  # broken in the handshake
    assert closed_by_server(sock)
    sock = transmission(daemon)
    sock.sendall(struct.pack(">IHHQQI", 0x12345678, 0, C.CMD_READ, 1, 0, 512))  # after it
    assert closed_by_server(sock)
    values = settled(daemon)
    assert values[("netswap_connections_accepted_total", ())] == 2
    assert value(values, "netswap_handshakes_failed_total", reason="bad_option_magic") == 1
    assert value(values, "netswap_protocol_errors_total", reason="bad_option_magic") == 1
    assert value(values, "netswap_protocol_errors_total", reason="bad_request_magic") == 1
    assert not series(values, "netswap_handshakes_failed_total").get(
        (("reason", "bad_request_magic"),))


@pytest.mark.parametrize("backend", ["memory", "file"])
def test_attached_nodes_with_their_swap_size_and_use(tmp_path, backend):
    # Without mlockall: the kernel refuses to free locked pages, so under it a memory export
    # zeroes a trimmed range and keeps holding it (see backends.MemoryBackend._release).
    daemon = start_daemon(tmp_path, swap_options=f'backend = "{backend}"\ndetach_grace = "30s"',
                          extra='[protect]\nmlockall = "off"\n')
    try:
        h = nbd.NBD()
        h.connect_uri(daemon.uri("swap/node-a"))
        for i in range(32):
            h.pwrite(b"s" * (64 * KiB), i * 64 * KiB)
        key = {"node": "node-a", "export": "swap/node-a"}
        values = samples(daemon.metrics())
        assert value(values, "netswap_node_connections", **key) == 1
        assert value(values, "netswap_node_swap_size_bytes", **key) == 64 * MiB
        written = value(values, "netswap_node_swap_used_bytes", **key)
        # A memory export holds exactly the pages written; a file may allocate a little more
        # (file system metadata or preallocation), never less.
        assert written == 2 * MiB if backend == "memory" else written >= 2 * MiB
        h.trim(MiB, 0)
        after_trim = value(samples(daemon.metrics()), "netswap_node_swap_used_bytes", **key)
        assert after_trim <= written - MiB
        h.shutdown()
        # In its detach grace period the node is still attached, with no connection.
        values = settled(daemon)
        assert value(values, "netswap_node_connections", **key) == 0
        assert ("netswap_node_swap_used_bytes", tuple(sorted(key.items()))) in values
        # A node that never attached is not shown, and the scrape did not create its swap.
        assert not any(dict(labels).get("node") == "other" for _, labels in values)
        assert not list((daemon.state_dir / "swap").glob("other*"))
    finally:
        assert daemon.stop() == 0


def test_exposition_of_a_daemon_that_served_traffic_passes_promtool(daemon):
    h = nbd.NBD()
    h.connect_uri(daemon.uri("swap/lint-node"))
    h.pwrite(b"p" * 65536, 0)
    h.pread(65536, 0)
    h.flush()
    text = daemon.metrics()
    h.shutdown()
    assert "netswap_request_duration_seconds_bucket" in text
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


def test_pressure_and_protection_as_the_daemon_saw_them():
    """The collector in-process, with a ProtectionReport and a monitor's readings."""
    pressure = SimpleNamespace(emergency=True, transitions=3, trigger_events=2,
                               psi_some_avg10=12.5, available_bytes=3 * (1 << 30))
    protection = ProtectionReport(mlockall=True, oom_score_adj=-1000, io_flusher=False)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(Counters(), pressure=pressure, protection=protection))
    values = samples(generate_latest(registry).decode())
    assert values[("netswap_emergency_mode", ())] == 1
    assert values[("netswap_emergency_mode_transitions_total", ())] == 3
    assert values[("netswap_pressure_trigger_events_total", ())] == 2
    assert values[("netswap_memory_pressure_some_avg10_ratio", ())] == 0.125
    assert values[("netswap_memory_available_bytes", ())] == 3 * (1 << 30)
    assert value(values, "netswap_protection_enabled", what="mlockall") == 1
    assert value(values, "netswap_protection_enabled", what="oom_score_adj") == 1
    assert ("netswap_protection_enabled", (("what", "io_flusher"),)) in values
    assert value(values, "netswap_protection_enabled", what="io_flusher") == 0
    # Without PSI (psi=0, no CONFIG_PSI) there is no PSI series rather than a made-up 0.
    pressure.psi_some_avg10 = None
    values = samples(generate_latest(registry).decode())
    assert ("netswap_memory_pressure_some_avg10_ratio", ()) not in values


def test_every_exported_series_is_documented(tmp_path):
    """docs/metrics.md lists every series: scraped from a daemon with everything that adds
    series turned on (NFS, the pressure monitor)."""
    daemon = start_daemon(tmp_path, pressure_options="enabled = true", nfs_options=(
        f'enabled = true\nlisten = ["127.0.0.1:{free_port()}"]\n'
        f'mount_listen = ["127.0.0.1:{free_port()}"]'))
    try:
        families = [family for family in text_string_to_metric_families(daemon.metrics())
                    if family.name.startswith("netswap_")]
    finally:
        assert daemon.stop() == 0, daemon.log()
    documented = (REPO / "docs" / "metrics.md").read_text()
    names = [family.name + "_total" if family.type == "counter" else family.name
             for family in families]
    assert "netswap_emergency_mode" in names and "netswap_nfs_calls_total" in names
    assert [name for name in names if f"| `{name}` |" not in documented] == []
