"""Fairness between nodes (issue 5): one node's swap storm must not starve another node.

Node "storm" writes 128 KiB blocks at 150 MB/s on each of two connections, 32 in flight on
each, and makes them durable every 4 writes (FLUSH): a storm whose cost is in the storage,
which is what fills a server's queues. Node "quiet" reads 4 KiB blocks at 100 per second.
Its p99 latency during the storm is compared with its p99 during the same storm served by
another process, in the same run, rounds interleaved, medians compared.
Both nodes are fio's nbd engine (C) in processes of their own, so the test's own Python is
not what is measured.

What it proves: with one FIFO shared by all nodes (netswapd before the fair queue), the
quiet node's reads waited behind the storm's queue: p50 7 ms, p99 10.6 ms against 0.5 ms
alone (ratio 21) on this 2-core machine. Deficit round robin over nodes, a storm held to
all workers but one, the C request loop (plain requests on each connection's own thread,
no GIL) and a short scheduler slice for swap threads keep it near what the machine itself
costs: the test runs the same storm against a separate nbdkit process (sharing nothing with
netswapd but CPUs, page cache and disk) and compares the quiet node's p99 under the two.
The quiet node's p99 alone is printed too; since the C loop it is ~0.1-0.2 ms, so "during
the storm over alone" (issue 5 measured 2.8 with the Python path's 0.5 ms alone) now reads
3.4-5 on this machine although the latency during the storm is lower than it was.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import time

from support.daemon import free_port, start_daemon

MiB = 1 << 20

RUNTIME = 8  # seconds per measurement
# Each storm connection's bandwidth cap: the same storm for netswapd and for the peer that
# gives the floor (uncapped, nbdkit takes the fsync storm about 3x faster than netswapd, and a
# heavier storm would make a higher floor). Far above what swap needs from one node.
STORM_RATE = "150m"
# The quiet node's p99 during netswapd's storm over its p99 during the same storm served by
# nbdkit. Measured 0.35-1.5 (median about 0.6) on a quiet machine; on 2026-12-02, the machine
# busy (load average 4-6, the fsync storm's disk shared), single rounds ranged 0.5-8.7 with
# the same median for netswapd before and after the pool's background prefault (1.9 vs 2.4,
# five interleaved runs each), and the median of three rounds reached 5.99 once in a full
# CI run. The storm costs the quiet node about what it costs it when another process serves
# it. The bound sits halfway (in log terms) between that noise and the FIFO before the fair
# queue (p99 10.6 ms, ratio about 20), which still fails it by 2x, as would a lock or a
# queue that made the quiet node wait for the storm.
MAX_OVER_FLOOR = 10.0
# Storm rounds against each server, interleaved.
ROUNDS = 3


def median_round(results: list[dict]) -> dict:
    """The quiet node's medians over rounds: p50, p99 and reads, each its own median."""
    return {key: statistics.median(result[key] for result in results) for key in results[0]}


def fio_job(uri: str, name: str, rw: str, bs: str, iodepth: int, extra: list[str]) -> list[str]:
    return ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={iodepth}", "--size=64M", "--output-format=json", *extra]


def fio_json(out: str) -> dict:
    # fio may print notes ("fio: ...") before its JSON document.
    return json.loads(out[out.index("{"):])


def quiet_reads(uri: str, cwd) -> dict:
    """p50/p99 (µs) and count of 4 KiB random reads at 100/s for RUNTIME seconds."""
    out = subprocess.run(
        fio_job(uri, "quiet", "randread", "4k", 1,
                ["--rate_iops=100", "--ramp_time=1", "--time_based", f"--runtime={RUNTIME}"]),
        capture_output=True, text=True, timeout=RUNTIME + 60, cwd=cwd, check=True).stdout
    read = fio_json(out)["jobs"][0]["read"]
    percentiles = read["clat_ns"]["percentile"]
    return {"p50": percentiles["50.000000"] / 1000, "p99": percentiles["99.000000"] / 1000,
            "reads": read["total_ios"]}


def during_storm(storm_uri: str, quiet_uri: str, cwd) -> tuple[dict, float]:
    """The quiet node's reads while `storm_uri` is flooded; and the storm's MB/s."""
    storm = subprocess.Popen(
        fio_job(storm_uri, "storm", "write", "128k", 32,
                ["--numjobs=2", "--group_reporting", "--fsync=4", f"--rate={STORM_RATE}",
                 "--time_based",
                 f"--runtime={RUNTIME + 4}"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    try:
        time.sleep(1)  # the storm is at full strength before the quiet node starts
        quiet = quiet_reads(quiet_uri, cwd)
        out, err = storm.communicate(timeout=RUNTIME + 60)
    finally:
        if storm.poll() is None:
            storm.kill()
            storm.wait()
    assert storm.returncode == 0, err
    return quiet, fio_json(out)["jobs"][0]["write"]["bw_bytes"] / 1e6


def nbdkit_storm_target(tmp_path):
    """A separate nbdkit serving a file like a swap node's: the storm's peer for the floor."""
    image = tmp_path / "peer.img"
    image.write_bytes(b"")
    os.truncate(image, 128 * MiB)
    port = free_port()
    process = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "-p", str(port),
                                "-i", "127.0.0.1", "file", str(image)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"nbd://127.0.0.1:{port}/"
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("nbdkit did not start")


def test_a_swap_storm_does_not_starve_another_node(tmp_path):
    daemon = start_daemon(tmp_path, swap_size="128MiB")
    peer, peer_uri = nbdkit_storm_target(tmp_path)
    try:
        quiet_uri = daemon.uri("swap/quiet")
        # The quiet node's blocks exist: reads of holes would be cheaper than real reads.
        subprocess.run(fio_job(quiet_uri, "fill", "write", "1m", 4, []), check=True,
                       capture_output=True, timeout=120, cwd=tmp_path)

        alone = quiet_reads(quiet_uri, tmp_path)
        # The storm against netswapd and the same storm against another process, interleaved
        # ROUNDS times: what sharing two CPUs, the page cache and the disk costs the quiet node
        # by itself, with no queue or lock of ours involved, measured next to each netswapd
        # round. A p99 of 800 reads moves by 3x between runs on a shared machine; the medians
        # of the rounds are compared.
        rounds = [(during_storm(daemon.uri("swap/storm"), quiet_uri, tmp_path),
                   during_storm(peer_uri, quiet_uri, tmp_path)) for _ in range(ROUNDS)]
        busy = median_round([ours[0] for ours, _ in rounds])
        floor = median_round([peer[0] for _, peer in rounds])
        storm_mbs = min(ours[1] for ours, _ in rounds)
        floor_mbs = min(peer[1] for _, peer in rounds)

        ratio, over_floor = busy["p99"] / alone["p99"], busy["p99"] / floor["p99"]
        per_round = [f"{ours[0]['p99'] / peer[0]['p99']:.2f}" for ours, peer in rounds]
        print(f"\nquiet node, 4K randread at 100/s: alone p50 {alone['p50']:.0f} µs, "
              f"p99 {alone['p99']:.0f} µs ({alone['reads']} reads); during a storm of "
              f"{storm_mbs:.0f} MB/s p50 {busy['p50']:.0f} µs, p99 {busy['p99']:.0f} µs "
              f"({busy['reads']} reads); p99 ratio {ratio:.2f}; during the same storm "
              f"({floor_mbs:.0f} MB/s) served by nbdkit p50 {floor['p50']:.0f} µs, "
              f"p99 {floor['p99']:.0f} µs: netswapd's storm costs {over_floor:.2f}x that "
              f"(medians of {ROUNDS} rounds; per round {', '.join(per_round)})")
        assert storm_mbs > 100, "the storm did not storm: the comparison would prove nothing"
        assert busy["reads"] >= 0.9 * alone["reads"]
        assert over_floor <= MAX_OVER_FLOOR, (alone, busy, floor)
    finally:
        peer.kill()
        peer.wait()
        code = daemon.stop()
    assert code == 0, daemon.log()
