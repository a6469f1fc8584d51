#!/usr/bin/env python3
"""Many nodes at once: per-node swap-like load on netswapd and on nbdkit, for sizing.

For each node count N (ascending) and each server (order alternating over the repeats), the
server serves N nodes at once on 127.0.0.1 and one fio process runs N jobs, one per node, each
its own NBD connection with a light swap-like load: 4K random reads and writes at iodepth 1,
rate-limited to --iops per node. netswapd serves every job its own per-node swap export
(`swap/nodeK`, created and attached as a real node's is, its reserve slot included); nbdkit
serves one sparse file of N node regions and job K uses region K. While the load runs the
server's VmRSS, locked memory, VmLck, threads, descriptors and CPU are sampled from /proc,
with fio's CPU and everyone else's. Printed as Markdown: achieved
against asked IOPS and server resources, and the per-node completion latency (p50, p99,
p99.9 of each node; the median node and the worst node), reads and writes apart.

A larger N is tried only by servers that reached --min-achieved % of the asked IOPS at every
smaller N: the largest N that passed is "as many nodes as this machine allows" with fio on
the same cores. See bench/README.md.

    python3 bench/many_nodes.py                               # 16,128,256; 3 repeats
    python3 bench/many_nodes.py --nodes 16 --repeats 1 --runtime 5 --ramp 2   # smoke test
    python3 bench/many_nodes.py --nodes 16,128,256 --json out.json

Only the standard library is used; fio (with the nbd engine) and nbdkit must be installed,
and netswap importable (this checkout's daemon/ is used when its C pool is built in place).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from fio_matrix import (CLOCK_TICKS, BenchError, Server, _proc_table, check_tools,  # noqa: E402
                        fmt_mib, fmt_num, fmt_us, parse_size, proc_alive, reap_orphans,
                        set_child_subreaper, tree)

SERVERS = ("netswapd", "nbdkit")
PERCENTILES = (("p50", "50.000000", 50.0), ("p99", "99.000000", 99.0),
               ("p99.9", "99.900000", 99.9))
DIRECTIONS = ("read", "write")
SAMPLE_INTERVAL = 0.5
SMAPS_EVERY = 10


# --------------------------------------------------------------------------- servers


@dataclass
class NodesServer(Server):
    """fio_matrix's server, serving `nodes` nodes of `node_size` bytes each.

    netswapd: per-node swap exports swap/node0 .. swap/node<N-1>, created on first attach as
    for real nodes (sparse files in its state dir), N reserve slots (swap.max_nodes = N),
    loopback peers tagged as swap nodes from accept (swap.node_networks). Its control socket,
    metrics and NFS are off, so it touches nothing outside its temp dir and ports.
    nbdkit: its file plugin on `image` (N x node_size, sparse), default threads unless
    `nbdkit_threads`; every connection asks for the default export.
    """

    nodes: int = 1
    node_size: int = 0
    nbdkit_threads: int = 0

    def node_uri(self, k: int) -> str:
        if self.name == "netswapd":
            return f"nbd://127.0.0.1:{self.port}/swap/node{k}"
        return f"nbd://127.0.0.1:{self.port}/"

    def node_offset(self, k: int) -> int:
        """Where node k's region starts in what its URI serves."""
        return 0 if self.name == "netswapd" else k * self.node_size

    def command(self) -> list[str]:
        if self.name == "netswapd":
            # Every node's connection (and fio's short probe connection per job) comes from
            # 127.0.0.1: the per-client limit must not be what stops them.
            conns = 2 * self.nodes + 64
            return self.netswapd_command(f"""\
                max_connections = {conns}
                max_connections_per_client = {conns}

                [pool]
                lock = "best-effort"

                [swap]
                size = {self.node_size}
                max_nodes = {self.nodes}
                node_networks = ["127.0.0.0/8"]

                [metrics]
                listen = []

                [nfs]
                enabled = false
                """, daemon_keys='control_socket = ""\n')
        cmd = super().command()
        if self.name == "nbdkit" and self.nbdkit_threads:
            cmd[1:1] = ["--threads", str(self.nbdkit_threads)]
        return cmd


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmLck (bytes) and Threads of one process; {} if it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmLck", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
                elif key == "Threads":
                    out[key] = int(value)
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return out


def established(port: int) -> int:
    """TCP connections established to 127.0.0.1:port (server side), from /proc/net/tcp."""
    local = f"0100007F:{port:04X}"
    count = 0
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split(None, 4)
                if fields[1] == local and fields[3] == "01":
                    count += 1
    except (OSError, StopIteration, IndexError):
        pass
    return count


def open_fds(pid: int) -> int | None:
    """File descriptors the process has open (sockets, swap files, ...)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def machine_times() -> tuple[int, int]:
    """(busy, steal): CPU ticks all CPUs spent working since boot, kernel work included, and
    ticks the hypervisor gave our virtual CPUs to someone else (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    return sum(fields[:7]) - fields[3] - fields[4], fields[7]


def others_ticks() -> int:
    """CPU ticks other people took: every process outside this harness's tree (which holds
    the server and fio), reaped children included, plus the hypervisor's steal time (on a
    VM, the host's other guests). Kernel threads are left out: the writeback and network
    work of our own load runs there."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    ours, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        ours.add(pid)
        todo.extend(children.get(pid, ()))
    return machine_times()[1] + sum(cpu for pid, (ppid, _, cpu) in table.items()
                                    if pid not in ours and pid != 2 and ppid != 2)


def listen_overflows() -> int:
    """The kernel's count of connections dropped at a full listen queue (TcpExt
    ListenOverflows, all sockets). A client whose final ACK is dropped there believes it is
    connected and waits for the server's greeting: with no timeout of its own (libnbd's
    connect has none), for ever."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return dict(zip(names.split()[1:], map(int, values.split()[1:]))).get(
                "ListenOverflows", 0)
    return 0


def locked_resident(pid: int) -> int | None:
    """Bytes of the process's memory that are both resident and locked (smaps_rollup
    "Locked"). Not VmLck: under mlockall(MCL_FUTURE|MCL_ONFAULT) every mapping is locked, so
    VmLck counts address space never touched (thread stacks, arenas), not pinned memory."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Locked:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return None


class Sampler(threading.Thread):
    """Every SAMPLE_INTERVAL: time, the server's tree CPU ticks, threads (summed over its
    tree), VmRSS and VmLck (its main process), tree RSS; and fio's tree CPU ticks. Every
    SMAPS_EVERY samples also the locked resident bytes (smaps_rollup walks the page tables:
    not twice a second)."""

    def __init__(self, server_pid: int, port: int, nodes: int):
        super().__init__(daemon=True)
        self.server_pid, self.port, self.nodes = server_pid, port, nodes
        self.all_connected_at: float | None = None  # first sample with every node connected
        self.fio_pid = 0
        self.samples: list[dict] = []
        self._stop_event = threading.Event()

    def sample(self) -> None:
        pids, tree_rss, cpu = tree(self.server_pid)
        if not pids:
            return
        status = proc_status(self.server_pid)
        threads = sum(proc_status(p).get("Threads", 0) for p in pids)
        fio_cpu = tree(self.fio_pid)[2] if self.fio_pid else None
        locked = locked_resident(self.server_pid) if len(self.samples) % SMAPS_EVERY == 0 \
            else None
        now = time.monotonic()
        conns = established(self.port)
        if conns >= self.nodes and self.all_connected_at is None and self.fio_pid:
            self.all_connected_at = now
        self.samples.append({"t": now, "cpu": cpu, "threads": threads, "conns": conns,
                             "busy": machine_times()[0], "others": others_ticks(),
                             "fds": open_fds(self.server_pid),
                             "rss": status.get("VmRSS"), "lck": status.get("VmLck"),
                             "locked": locked, "tree_rss": tree_rss, "fio_cpu": fio_cpu})

    def run(self):
        self.sample()
        while not self._stop_event.wait(SAMPLE_INTERVAL):
            self.sample()

    def stop(self):
        self._stop_event.set()
        self.join(5)


# --------------------------------------------------------------------------- fio


def fio_jobs(server: NodesServer, args) -> str:
    """One fio job file: a job per node, each its own connection to its own region."""
    reads = args.iops * args.read_mix // 100
    writes = args.iops - reads
    text = textwrap.dedent(f"""\
        [global]
        ioengine=nbd
        thread=1
        size={args.node_bytes}
        time_based=1
        runtime={args.runtime}
        ramp_time={args.ramp}
        rw=randrw
        rwmixread={args.read_mix}
        bs={args.bs}
        iodepth=1
        rate_iops={reads},{writes}
        rate_process={args.rate_process}
        norandommap=1
        randrepeat=1

        """)
    for k in range(server.nodes):
        text += f"[node{k}]\nuri={server.node_uri(k)}\n"
        if server.node_offset(k):
            text += f"offset={server.node_offset(k)}\n"
    return text


class FioRun:
    """fio in its own session, its JSON to a file, its console kept for error messages."""

    def __init__(self, job_text: str, workdir: Path):
        self.job = workdir / "nodes.fio"
        self.out = workdir / "fio.json"
        self.job.write_text(job_text)
        self.console = workdir / "fio.console"
        self.started = time.monotonic()
        with open(self.console, "w") as console:
            self.process = subprocess.Popen(
                ["fio", "--output-format=json+", f"--output={self.out}", str(self.job)],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                cwd=workdir, start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"fio did not finish within {timeout:.0f} s (killed)")

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()

    def messages(self) -> str:
        """What fio said besides its JSON (it writes notes into the output file too)."""
        lines = []
        for path in (self.console, self.out):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            if path == self.out and "{" in text:
                text = text[:text.index("{")]
            lines += [l for l in text.splitlines() if l.strip()
                      and "connected to NBD server" not in l]
        return "\n".join(lines[-20:])

    def result(self) -> dict:
        text = self.out.read_text()
        try:  # fio may print notes before the JSON document
            return json.loads(text[text.index("{"):])
        except ValueError as exc:
            raise RuntimeError(f"cannot parse fio JSON ({exc}): {text[:500]}") from None


def bins_percentile(bins: dict[int, int], pct: float) -> float | None:
    """fio's percentile of a latency histogram (value ns -> count): the smallest bin value
    whose cumulative count reaches pct % of all. In µs."""
    total = sum(bins.values())
    if not total:
        return None
    want = pct / 100.0 * total
    seen = 0
    for value in sorted(bins):
        seen += bins[value]
        if seen >= want:
            return value / 1000.0
    return max(bins) / 1000.0


def parse_jobs(result: dict, nodes: int, asked_iops: int) -> dict:
    """Per-node latency percentiles, their distribution over nodes, pooled percentiles of
    all nodes together (from fio's histogram bins), IOPS achieved."""
    jobs = result.get("jobs") or []
    if len(jobs) != nodes:
        raise ValueError(f"fio reported {len(jobs)} jobs, expected {nodes}")
    per_node = []
    failed = []
    pooled = {d: {} for d in DIRECTIONS}
    iops = 0.0
    for job in jobs:
        node = {"name": job["jobname"], "error": job.get("error", 0)}
        if node["error"] or job["read"]["total_ios"] + job["write"]["total_ios"] == 0:
            failed.append(f"{job['jobname']}: error {node['error']}, "
                          f"{job['read']['total_ios'] + job['write']['total_ios']} I/Os")
        for d in DIRECTIONS:
            clat = job[d]["clat_ns"]
            node[f"{d}_iops"] = job[d]["iops"]
            node[f"{d}_ios"] = job[d]["total_ios"]
            percentiles = clat.get("percentile") or {}
            for label, key, _ in PERCENTILES:
                value = percentiles.get(key)
                node[f"{d}_{label}"] = None if value is None or not job[d]["total_ios"] \
                    else value / 1000.0
            node[f"{d}_max"] = clat["max"] / 1000.0 if job[d]["total_ios"] else None
            for value, count in (clat.get("bins") or {}).items():
                pooled[d][int(value)] = pooled[d].get(int(value), 0) + count
            iops += job[d]["iops"]
        per_node.append(node)
    out = {"nodes": nodes, "iops": iops, "asked_iops": asked_iops,
           "achieved_pct": 100.0 * iops / asked_iops, "failed_nodes": failed,
           "per_node": per_node}
    for d in DIRECTIONS:
        for label, _, pct in PERCENTILES:
            values = sorted(n[f"{d}_{label}"] for n in per_node if n[f"{d}_{label}"] is not None)
            out[f"{d}_{label}_median_node"] = statistics.median(values) if values else None
            out[f"{d}_{label}_worst_node"] = values[-1] if values else None
            out[f"{d}_{label}_all"] = bins_percentile(pooled[d], pct)
        maxes = [n[f"{d}_max"] for n in per_node if n[f"{d}_max"] is not None]
        out[f"{d}_max"] = max(maxes) if maxes else None
    return out


def wait_for_quiet(args) -> float | None:
    """Before a run: wait (up to --quiet-wait s) until everything else on the machine takes
    less than --quiet-below % of one core, measured over 2 s; return the last measurement.
    On a shared machine this keeps other people's bursts out of the tail latencies."""
    if args.quiet_below <= 0:
        return None
    deadline = time.monotonic() + args.quiet_wait
    said = False
    while True:
        b0, t0 = others_ticks(), time.monotonic()
        time.sleep(2)
        others = 100.0 * (others_ticks() - b0) / CLOCK_TICKS / (time.monotonic() - t0)
        if others < args.quiet_below:
            return others
        if time.monotonic() >= deadline:
            print(f"  .. the machine is still busy ({others:.0f}% of a core elsewhere); "
                  "running anyway", flush=True)
            return others
        if not said:
            print(f"  .. waiting for the machine to quieten ({others:.0f}% of a core "
                  f"elsewhere, want < {args.quiet_below:g}%, up to {args.quiet_wait} s)",
                  flush=True)
            said = True
        time.sleep(3)


# --------------------------------------------------------------------------- one run


def window_stats(samples: list[dict], start: float, end: float) -> dict:
    """Server and fio CPU (% of one core) between the samples nearest `start` and `end`;
    peaks of memory and threads over all samples."""
    out = {}
    inside = [s for s in samples if start <= s["t"] <= end]
    if len(inside) >= 2:
        first, last = inside[0], inside[-1]
        secs = last["t"] - first["t"]
        out["window_s"] = secs
        out["server_cpu_pct"] = 100.0 * (last["cpu"] - first["cpu"]) / CLOCK_TICKS / secs
        if first["fio_cpu"] is not None and last["fio_cpu"] is not None:
            out["fio_cpu_pct"] = 100.0 * (last["fio_cpu"] - first["fio_cpu"]) / CLOCK_TICKS / secs
            out["machine_cpu_pct"] = 100.0 * (last["busy"] - first["busy"]) / CLOCK_TICKS / secs
            out["other_cpu_pct"] = 100.0 * (last["others"] - first["others"]) / CLOCK_TICKS / secs
    for key in ("rss", "lck", "locked", "threads", "fds", "tree_rss"):
        values = ([s[key] for s in inside if s[key] is not None]
                  or [s[key] for s in samples if s[key] is not None])
        out[f"{key}_peak"] = max(values) if values else None
    return out


def run_one(args, name: str, nodes: int, repeat: int, tmp: Path) -> dict:
    """Start the server for `nodes` nodes, run the fio load, sample, stop; one result."""
    workdir = tmp / f"n{nodes}-r{repeat}-{name}"
    workdir.mkdir()
    image = workdir / "nodes.img"
    if name == "nbdkit":
        with open(image, "wb") as f:
            f.truncate(nodes * args.node_bytes)  # sparse: N node regions
    run = {"nodes": nodes, "repeat": repeat, "server": name, "errors": []}
    run["others_before_pct"] = wait_for_quiet(args)
    server = NodesServer(name=name, image=image, size=nodes * args.node_bytes, workdir=workdir,
                         workers=args.workers, netswapd_log_level=args.netswapd_log_level,
                         nodes=nodes, node_size=args.node_bytes,
                         nbdkit_threads=args.nbdkit_threads, netswapd_nbd=args.netswapd_nbd)
    sampler = fio = None
    try:
        try:
            server.start()
        except RuntimeError as exc:
            run["errors"].append(f"start: {exc}")
            return run
        run["pid"] = server.pid
        sampler = Sampler(server.pid, server.port, nodes)
        sampler.start()
        overflows = listen_overflows()
        fio = FioRun(fio_jobs(server, args), workdir)
        sampler.fio_pid = fio.process.pid
        timeout = args.runtime + args.ramp + 60 + 0.5 * nodes
        try:
            code = fio.wait(timeout)
        finally:
            run["listen_overflows"] = listen_overflows() - overflows
        if run["listen_overflows"]:
            print(f"  .. the kernel dropped {run['listen_overflows']} connection(s) at a full "
                  "listen queue during that run (TcpExt ListenOverflows, any socket)",
                  flush=True)
        ended = time.monotonic()
        sampler.stop()
        if not proc_alive(server.pid):
            run["errors"].append(f"{name} died during the run")
        if code != 0:
            run["errors"].append(f"fio exited with {code}: {fio.messages()[-1500:]}")
        # The measured seconds: from the ramp's end after every node's connection was up (as
        # the server's port shows it) to the runtime's end, less half a second at each side.
        connected = sampler.all_connected_at
        run["conns_peak"] = max((s["conns"] for s in sampler.samples), default=0)
        if connected is None:
            run["errors"].append(f"never saw {nodes} connections at once "
                                 f"(at most {run['conns_peak']})")
        begin = (connected or fio.started) + args.ramp + 0.5
        run["setup_s"] = (connected or ended) - fio.started
        run.update(window_stats(sampler.samples, begin, begin + args.runtime - 1.0))
        if code == 0 or fio.out.exists():
            try:
                metrics = parse_jobs(fio.result(), nodes, nodes * args.iops)
            except (RuntimeError, ValueError, KeyError) as exc:
                run["errors"].append(f"fio result: {exc}")
            else:
                if metrics["failed_nodes"]:
                    run["errors"].append(f"{len(metrics['failed_nodes'])} node(s) failed: "
                                         + "; ".join(metrics["failed_nodes"][:5]))
                if not args.json:
                    metrics.pop("per_node")
                run.update(metrics)
        if run.get("server_cpu_pct") is not None and run.get("iops"):
            run["server_cpu_us_per_io"] = run["server_cpu_pct"] / 100.0 / run["iops"] * 1e6
    except RuntimeError as exc:
        most = max((s["conns"] for s in sampler.samples), default=0) if sampler else 0
        run["errors"].append(f"{exc}; at most {most} of {nodes} connections were up at once"
                             + (f"; fio said: {fio.messages()[-800:]}"
                                if fio is not None and fio.messages() else ""))
    finally:
        if fio is not None:
            fio.kill()
        if sampler is not None:
            sampler.stop()
        code = server.stop()
        if code not in (None, 0, -signal.SIGTERM) and not run["errors"]:
            run["errors"].append(f"{name} exited with {code}")
        log = server.log()
        run["log_findings"] = [line for line in log.splitlines() if any(
            w in line for w in ("Traceback", "ERROR", "WARNING", "CRITICAL", "Exception",
                                "error"))][:20]
        if run["errors"] or "Traceback" in log:
            run["log_tail"] = server.log_tail(40)
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            if server.log_path and server.log_path.exists():
                shutil.copy(server.log_path, args.keep_logs / f"n{nodes}-r{repeat}-{name}.log")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)  # N node files: do not let them pile up
    return run


def run_quietest(args, name: str, nodes: int, repeat: int, tmp: Path) -> dict:
    """run_one, again (at most --busy-retries times) while the rest of the machine took more
    than --quiet-below % of a core during the measured seconds; the quietest attempt."""
    best = None
    for attempt in range(1 + args.busy_retries):
        run = run_one(args, name, nodes, repeat, tmp)
        run["attempt"] = attempt + 1
        print_run(run, args.repeats)
        others = run.get("other_cpu_pct")
        if best is None or (others is not None and (best.get("other_cpu_pct") is None
                                                    or others < best["other_cpu_pct"])):
            best = run
        if others is None or args.quiet_below <= 0 or others < args.quiet_below:
            break
        if attempt < args.busy_retries:
            print(f"  .. the rest of the machine took {others:.0f}% of a core during that run: "
                  "once more", flush=True)
    best["attempts"] = attempt + 1
    return best


def print_run(run: dict, repeats: int) -> None:
    head = f"N={run['nodes']:<4} repeat {run['repeat'] + 1}/{repeats} {run['server']:<8}"
    if "iops" in run:
        print(f"{head} {run['iops']:>8.0f}/{run['asked_iops']} IOPS "
              f"({run['achieved_pct']:.1f}%)  read p99 median/worst node "
              f"{fmt_us(run['read_p99_median_node'])}/{fmt_us(run['read_p99_worst_node'])} µs  "
              f"server CPU {fmt_num(run.get('server_cpu_pct'))}%  fio CPU "
              f"{fmt_num(run.get('fio_cpu_pct'))}%  others {fmt_num(run.get('other_cpu_pct'))}%  "
              f"RSS {fmt_mib(run.get('rss_peak'))}  "
              f"threads {run.get('threads_peak')}", flush=True)
    for err in run["errors"]:
        print(f"  !! {head.strip()}: {err}", file=sys.stderr, flush=True)
    if run.get("log_tail") and run["errors"]:
        print(textwrap.indent(run["log_tail"], "     | "), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- summary


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


SUMMARY_KEYS = (["iops", "achieved_pct", "server_cpu_pct", "server_cpu_us_per_io", "fio_cpu_pct",
                 "other_cpu_pct", "machine_cpu_pct", "rss_peak", "lck_peak", "locked_peak",
                 "threads_peak", "fds_peak", "tree_rss_peak", "setup_s"]
                + [f"{d}_{label}_{kind}" for d in DIRECTIONS for label, _, _ in PERCENTILES
                   for kind in ("median_node", "worst_node", "all")]
                + [f"{d}_max" for d in DIRECTIONS])


def summarize(runs: list[dict]) -> dict:
    """(nodes, server) -> medians over the repeats that produced a result."""
    summary = {}
    for run in runs:
        summary.setdefault((run["nodes"], run["server"]), []).append(run)
    out = {}
    for key, group in summary.items():
        ok = [r for r in group if "iops" in r]
        entry = {"repeats": len(group), "measured": len(ok),
                 "failed": sum(1 for r in group if r["errors"])}
        for k in SUMMARY_KEYS:
            entry[k] = med(r.get(k) for r in ok)
        out[key] = entry
    return out


def fmt_pct(v) -> str:
    return "n/a" if v is None else f"{v:.0f}%"


def print_report(meta: dict, summary: dict, servers: list[str]) -> None:
    print()
    print(f"## Many nodes: {meta['iops']} IOPS per node ({meta['bs']} random, "
          f"{meta['read_mix']}% reads, {meta['rate_process']}), {meta['runtime']} s "
          f"(+{meta['ramp']} s ramp), median of {meta['repeats']} repeat(s)")
    print()
    print(f"Host: {meta['host']['kernel']}, {meta['host']['cpus']} CPUs, "
          f"{meta['host']['mem_gib']:.0f} GiB; "
          + "; ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    print()
    keys = sorted(summary, key=lambda k: (k[0], servers.index(k[1])))
    print("| nodes | server | IOPS asked | achieved | server CPU | CPU µs/IO | VmRSS | locked "
          "| VmLck | threads | fds | fio CPU | others' CPU |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for nodes, name in keys:
        s = summary[(nodes, name)]
        achieved = ("failed" if s["iops"] is None else
                    f"{fmt_num(s['iops'])} ({s['achieved_pct']:.1f}%)")
        if s["failed"] and s["iops"] is not None:
            achieved += f" ({s['failed']} of {s['repeats']} failed)"
        print(f"| {nodes} | {name} | {fmt_num(nodes * meta['iops'])} | {achieved} "
              f"| {fmt_pct(s['server_cpu_pct'])} | {fmt_num(s['server_cpu_us_per_io'])} "
              f"| {fmt_mib(s['rss_peak'])} | {fmt_mib(s['locked_peak'])} "
              f"| {fmt_mib(s['lck_peak'])} "
              f"| {fmt_num(s['threads_peak'])} | {fmt_num(s['fds_peak'])} "
              f"| {fmt_pct(s['fio_cpu_pct'])} "
              f"| {fmt_pct(s['other_cpu_pct'])} |")
    print()
    print("Server CPU, fio CPU and others' (every process but this harness, the server and "
          "fio, kernel threads left out; plus the hypervisor's steal time): "
          "% of one core over the measured seconds (the machine has "
          f"{meta['host']['cpus']}); CPU µs/IO: server CPU time per request. VmRSS, locked "
          "(resident and mlocked: smaps_rollup Locked), VmLck (address space in locked "
          "mappings, touched or not): the server process's peak while the load ran; threads, "
          "fds: its peak thread count and open file descriptors.")
    if all(summary[k]["iops"] is None for k in keys):
        return
    print()
    print("Completion latency (fio clat, µs) per node: the median node / the worst node of "
          "each node's own percentile; \"all\": the percentile of every request of every node "
          "together.")
    print()
    print("| nodes | server | | p50 | p99 | p99.9 | all p99 | all p99.9 | max |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for nodes, name in keys:
        s = summary[(nodes, name)]
        if s["iops"] is None:
            continue
        for d in DIRECTIONS:
            cells = [f"{fmt_us(s[f'{d}_{label}_median_node'])} / "
                     f"{fmt_us(s[f'{d}_{label}_worst_node'])}" for label, _, _ in PERCENTILES]
            print(f"| {nodes} | {name} | {d}s | " + " | ".join(cells)
                  + f" | {fmt_us(s[f'{d}_p99_all'])} | {fmt_us(s[f'{d}_p99.9_all'])} "
                  f"| {fmt_us(s[f'{d}_max'])} |")


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default="16,128,256",
                   help="node counts, tried in ascending order (default %(default)s)")
    p.add_argument("--servers", default=",".join(SERVERS), help="subset of %(default)s")
    p.add_argument("--repeats", type=int, default=3, help="runs per node count and server")
    p.add_argument("--runtime", type=int, default=25, help="measured seconds per run (25)")
    p.add_argument("--ramp", type=int, default=5,
                   help="fio ramp_time: seconds run before measuring (5)")
    p.add_argument("--iops", type=int, default=100,
                   help="requests per second per node, reads and writes together (100)")
    p.add_argument("--read-mix", type=int, default=50, help="%% of reads (50)")
    p.add_argument("--bs", default="4k", help="request size (4k)")
    p.add_argument("--rate-process", default="poisson", choices=("poisson", "linear"),
                   help="fio rate_process: poisson (independent nodes; default) or linear")
    p.add_argument("--node-size", default="256MiB",
                   help="each node's swap size (netswapd swap.size; nbdkit region) (256MiB)")
    p.add_argument("--min-achieved", type=float, default=95.0,
                   help="a server tries the next node count only if fio achieved this %% of "
                        "the asked IOPS (median over repeats) at this one (95)")
    p.add_argument("--workers", type=int, default=8, help="netswapd daemon.workers (8)")
    p.add_argument("--netswapd-nbd", default="", metavar="TOML",
                   help='more [nbd] keys for netswapd, e.g. "follow_receiving_cpu = true"')
    p.add_argument("--nbdkit-threads", type=int, default=0,
                   help="nbdkit --threads (per connection; default: nbdkit's own, 16)")
    p.add_argument("--netswapd-log-level", default="warning",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--quiet-below", type=float, default=25.0,
                   help="before each run, wait until the rest of the machine uses less than "
                        "this %% of one core (25; 0: do not wait)")
    p.add_argument("--quiet-wait", type=int, default=300,
                   help="seconds to wait for that at most, then run anyway (300)")
    p.add_argument("--busy-retries", type=int, default=2,
                   help="run again, at most this many times, when the rest of the machine took "
                        "--quiet-below %% of a core or more during the measured seconds; the "
                        "quietest attempt counts (2)")
    p.add_argument("--dir", default="/var/tmp", help="parent of the temp dir (/var/tmp)")
    p.add_argument("--json", type=Path, help="write every run (per-node numbers too) here")
    p.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy server logs to DIR")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args(argv)
    try:
        args.node_list = sorted({int(n) for n in args.nodes.split(",") if n.strip()})
    except ValueError:
        p.error(f"bad --nodes {args.nodes!r}")
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.server_list or any(s not in SERVERS for s in args.server_list):
        p.error(f"--servers: choose from {', '.join(SERVERS)}")
    if not args.node_list or args.node_list[0] < 1 or args.node_list[-1] > 4096:
        p.error("--nodes: between 1 and 4096 (netswapd's swap.max_nodes)")
    if (args.repeats < 1 or args.runtime < 2 or args.ramp < 0 or args.iops < 1
            or args.busy_retries < 0):
        p.error("--repeats and --iops must be >= 1, --runtime >= 2, --ramp and "
                "--busy-retries >= 0")
    if not 0 <= args.read_mix <= 100:
        p.error("--read-mix is a percentage")
    try:
        args.node_bytes = parse_size(args.node_size)
    except ValueError:
        p.error(f"bad --node-size {args.node_size!r}")
    if args.node_bytes < 2**20 or args.node_bytes % 2**20:
        p.error("--node-size: a multiple of 1MiB")
    return args


def use_this_checkout() -> str:
    """Run this checkout's netswap when its C pool is built in place (setup.py build_ext
    --inplace), whatever is installed; return where netswap comes from."""
    daemon = REPO / "daemon"
    if list((daemon / "netswap").glob("_pool*.so")):
        path = os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = str(daemon) + (os.pathsep + path if path else "")
    probe = subprocess.run([sys.executable, "-c", "import netswap; print(netswap.__file__)"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    return str(Path(probe.stdout.strip()).parent) if probe.returncode == 0 else "not importable"


def main(argv=None) -> int:
    args = parse_args(argv)
    servers = args.server_list
    netswap_from = use_this_checkout() if "netswapd" in servers else None
    try:
        versions = check_tools(servers)
    except BenchError as exc:
        print(f"many_nodes: {exc}", file=sys.stderr)
        return 2
    if netswap_from:
        versions["netswapd"] += f" ({netswap_from})"
    base = Path(args.dir)
    if not base.is_dir():
        print(f"many_nodes: --dir {base} is not a directory", file=sys.stderr)
        return 2

    set_child_subreaper()

    def on_sigterm(signum, frame):  # make `kill` of the harness run the finally blocks
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    meta = {
        "argv": sys.argv, "servers": servers, "nodes": args.node_list, "repeats": args.repeats,
        "runtime": args.runtime, "ramp": args.ramp, "iops": args.iops, "read_mix": args.read_mix,
        "bs": args.bs, "rate_process": args.rate_process, "node_size": args.node_bytes,
        "min_achieved": args.min_achieved, "workers": args.workers, "versions": versions,
        "quiet_below": args.quiet_below, "quiet_wait": args.quiet_wait,
        "busy_retries": args.busy_retries,
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                 "mem_gib": mem_kib / 2**20, "python": sys.version.split()[0]},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    runs: list[dict] = []
    status = 0
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="netswap-many-nodes-", dir=base))
    active = list(servers)  # servers still keeping up
    print(f"node counts {', '.join(map(str, args.node_list))}; servers {', '.join(servers)}; "
          f"{args.repeats} repeat(s) x {args.runtime}+{args.ramp} s; {args.iops} IOPS per node",
          flush=True)
    try:
        for nodes in args.node_list:
            if not active:
                print(f"N={nodes}: skipped, no server kept up at the previous node count",
                      flush=True)
                break
            for repeat in range(args.repeats):
                order = active if repeat % 2 == 0 else list(reversed(active))
                for name in order:
                    runs.append(run_quietest(args, name, nodes, repeat, tmp))
            summary = summarize([r for r in runs if r["nodes"] == nodes])
            for name in list(active):
                s = summary[(nodes, name)]
                if s["achieved_pct"] is None:
                    print(f"N={nodes}: {name} failed every repeat: no larger node count for it",
                          flush=True)
                    active.remove(name)
                elif s["achieved_pct"] < args.min_achieved:
                    print(f"N={nodes}: {name} reached {s['achieved_pct']:.1f}% of the asked "
                          f"IOPS (< {args.min_achieved:g}%): no larger node count for it",
                          flush=True)
                    active.remove(name)
    except KeyboardInterrupt:
        print("\ninterrupted; servers and fio stopped, reporting what finished", file=sys.stderr)
        status = 130
    finally:
        meta["elapsed_s"] = time.monotonic() - started
        reap_orphans()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(runs)
    if runs:
        print_report(meta, summary, servers)
        largest = {}
        for (nodes, name), s in summary.items():
            if s["achieved_pct"] is not None and s["achieved_pct"] >= args.min_achieved:
                largest[name] = max(largest.get(name, 0), nodes)
        print()
        print("Largest node count with >= {:g}% of the asked IOPS: ".format(args.min_achieved)
              + ", ".join(f"{name} {largest.get(name, 'none')}" for name in servers))
        findings: dict[tuple[str, str], list[str]] = {}  # (server, line) -> runs
        for run in runs:
            for line in run.get("log_findings", []):
                line = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", "", line)
                findings.setdefault((run["server"], line), []).append(
                    f"N={run['nodes']}/{run['repeat'] + 1}")
        if findings:
            print("\nServer log lines worth a look (runs as N/repeat):")
            for (name, line), where in list(findings.items())[:30]:
                runs_text = ", ".join(where) if len(where) <= 4 else f"{len(where)} runs"
                print(f"- {name} ({runs_text}): {line}")
        print(f"\n(total {meta['elapsed_s'] / 60:.1f} min)")
    if args.json:
        args.json.write_text(json.dumps({
            "meta": meta, "runs": runs,
            "summary": {f"{n}/{s}": v for (n, s), v in summary.items()}}, indent=1, default=str))
        print(f"raw results: {args.json}")
    if status == 0 and any(r["errors"] for r in runs):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
