#!/usr/bin/env python3
"""Side-by-side fio benchmark: netswapd against nbdkit, nbd-server and qemu-nbd.

One sparse file is created (and filled with data once), then served by each server in turn on
loopback, with the same fio jobs (fio's libnbd-based ``ioengine=nbd``) for every server.  The
whole matrix is repeated ``--repeats`` times with the server order rotated each repeat, and the
medians are printed as a Markdown table.  See bench/README.md for how to read the numbers.

    python3 bench/fio_matrix.py                       # all servers, 3 repeats, 10 s per row
    python3 bench/fio_matrix.py --quick --repeats 1   # smoke test, ~2 minutes
    python3 bench/fio_matrix.py --servers netswapd,nbdkit --rows randrw-4k-qd32 --json out.json

Only the standard library is used; the servers and fio must be installed (Debian: fio,
nbdkit, nbd-server, qemu-utils) and netswap importable (``python3 -m pip install -e .``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPORT = "bench"
ALL_SERVERS = ("netswapd", "nbdkit", "nbd-server", "qemu-nbd")
BINARIES = {"nbdkit": "nbdkit", "nbd-server": "nbd-server", "qemu-nbd": "qemu-nbd"}
INSTALL_HINT = {"fio": "fio", "nbdkit": "nbdkit", "nbd-server": "nbd-server",
                "qemu-nbd": "qemu-utils"}
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 40.0  # netswapd drains for up to daemon.shutdown_timeout (5 s here)
PAGE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A problem the user has to fix (missing tool, no space...): printed without a traceback."""


# --------------------------------------------------------------------------- the fio matrix


@dataclass(frozen=True)
class Row:
    key: str  # what --rows takes
    label: str  # what the table shows
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1
    fsync: int = 0  # fio's fsync=N: a FLUSH after every N writes of each job (0: none)
    client_cpu: int | None = None  # fio's cpus_allowed: the client on this CPU only

    @property
    def latency_dir(self) -> str:
        """Which direction's completion latency the table reports (reads for mixed rows)."""
        return "write" if self.rw in ("write", "randwrite") else "read"


ROWS = (
    Row("randwrite-4k-qd1", "4K randwrite QD1", "randwrite", "4k", 1),
    Row("randread-4k-qd1", "4K randread QD1", "randread", "4k", 1),
    # The same with the client held on CPU 0: its packets are received there, as a real
    # NIC queue's interrupt CPU is fixed (nbd.follow_receiving_cpu follows it; nothing
    # follows a client the scheduler keeps moving, as on loopback above).
    Row("randwrite-4k-qd1-cpu0", "4K randwrite QD1, client on CPU 0", "randwrite", "4k", 1,
        client_cpu=0),
    Row("randread-4k-qd1-cpu0", "4K randread QD1, client on CPU 0", "randread", "4k", 1,
        client_cpu=0),
    Row("randrw-4k-qd32", "4K randrw QD32", "randrw", "4k", 32),
    Row("write-128k-qd8", "128K write QD8 (seq)", "write", "128k", 8),
    Row("read-128k-qd8", "128K read QD8 (seq)", "read", "128k", 8),
    Row("randrw-4k-qd32x4", "4K randrw QD32 x4 conns", "randrw", "4k", 32, numjobs=4),
    # What a file system on an NBD disk sends: writes with a FLUSH every few, on two
    # connections (CAN_MULTI_CONN), so a FLUSH on one covers writes of the other.
    Row("randwrite-128k-fsync4-qd32x2", "128K randwrite fsync=4 QD32 x2 conns", "randwrite",
        "128k", 32, numjobs=2, fsync=4),
)
ROWS_BY_KEY = {row.key: row for row in ROWS}


def fio_job(row: Row, uri: str, size: int, runtime: int, ramp: int) -> str:
    """The job file for one row.  Identical for every server except the URI."""
    mixed = "rwmixread=50\n" if row.rw == "randrw" else ""
    if row.fsync:
        mixed += f"fsync={row.fsync}\n"
    if row.client_cpu is not None:
        mixed += f"cpus_allowed={row.client_cpu}\n"
    return textwrap.dedent(f"""\
        [global]
        ioengine=nbd
        uri={uri}
        size={size}
        time_based=1
        runtime={runtime}
        ramp_time={ramp}
        norandommap=1
        randrepeat=1
        group_reporting=1

        [{row.key}]
        rw={row.rw}
        bs={row.bs}
        iodepth={row.iodepth}
        numjobs={row.numjobs}
        """) + mixed


def parse_fio(result: dict, row: Row) -> dict:
    """IOPS, MB/s and clat percentiles of one row from fio's JSON output."""
    jobs = result.get("jobs") or []
    if not jobs:
        raise ValueError("fio reported no jobs")
    if len(jobs) != 1:  # group_reporting folds numjobs into one entry
        raise ValueError(f"expected 1 job entry with group_reporting, got {len(jobs)}")
    job = jobs[0]
    if job.get("error"):
        raise ValueError(f"fio job error {job['error']}")
    read, write = job["read"], job["write"]
    if read["io_bytes"] + write["io_bytes"] == 0:
        raise ValueError("fio did no I/O")
    percentiles = job[row.latency_dir]["clat_ns"].get("percentile", {})

    def pct(name):
        value = percentiles.get(name)
        return None if value is None else value / 1000.0  # ns -> µs

    return {
        "iops": read["iops"] + write["iops"],
        "read_iops": read["iops"],
        "write_iops": write["iops"],
        "mbps": (read["bw_bytes"] + write["bw_bytes"]) / 1e6,
        "p50_us": pct("50.000000"),
        "p99_us": pct("99.000000"),
        "latency_dir": row.latency_dir,
        "clat_mean_us": job[row.latency_dir]["clat_ns"]["mean"] / 1000.0,
    }


# --------------------------------------------------------------------------- processes


def set_child_subreaper() -> None:
    """Become the reaper of orphaned descendants.

    nbd-server has no "foreground but still fork per client" mode (-d serves one client at a
    time), so it must daemonize; as a subreaper its daemon stays our child and we can wait for
    it instead of leaving a zombie or losing track of it.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def reap_orphans(timeout: float = 3.0) -> None:
    """Wait for every remaining child, including orphans reparented to us (subreaper), so an
    interrupted run leaves no zombies behind.  Call only when no Popen is still in use."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if pid == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)


def _die_with_parent() -> None:  # preexec_fn: SIGTERM the server if this harness dies
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def proc_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, rss bytes, cpu ticks incl. reaped children) for every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # fields[0] is field 3 (state): ppid=4, utime=14, stime=15, cutime=16, cstime=17, rss=24
        ppid = int(fields[1])
        cpu = sum(int(x) for x in fields[11:15])
        rss = int(fields[21]) * PAGE
        table[int(entry)] = (ppid, rss, cpu)
    return table


def tree(pid: int) -> tuple[list[int], int, int]:
    """(pids, summed RSS bytes, summed CPU ticks) of pid and all its descendants."""
    table = _proc_table()
    if pid not in table:
        return [], 0, 0
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(p)
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(children.get(p, ()))
    return pids, sum(table[p][1] for p in pids), sum(table[p][2] for p in pids)


def vm_rss(pid: int) -> int | None:
    """VmRSS of one process in bytes (None if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


class RssSampler(threading.Thread):
    """Polls the server's process tree RSS twice a second and keeps the peak."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak = pid, 0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(0.5):
            self.peak = max(self.peak, tree(self.pid)[1])

    def stop(self):
        self._stop_event.set()
        self.join(2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


NBD_MAGIC = b"NBDMAGIC"
NBD_IHAVEOPT = b"IHAVEOPT"
NBD_OPT_ABORT = 2
NBD_FLAG_C_FIXED_NEWSTYLE = 1
NBD_FLAG_C_NO_ZEROES = 2


def nbd_ready(port: int) -> bool:
    """True once port speaks newstyle NBD.  Ends politely with NBD_OPT_ABORT, so servers do not
    log a failed negotiation for the probe (a bare connect-and-close makes qemu-nbd do so)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            greeting = b""
            while len(greeting) < 18:
                chunk = sock.recv(18 - len(greeting))
                if not chunk:
                    return False
                greeting += chunk
            if greeting[:8] != NBD_MAGIC or greeting[8:16] != NBD_IHAVEOPT:
                return False
            flags = (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_bytes(4, "big")
            sock.sendall(flags + NBD_IHAVEOPT + NBD_OPT_ABORT.to_bytes(4, "big")
                         + (0).to_bytes(4, "big"))
            try:
                sock.recv(20)  # the ACK to the abort; some servers just close
            except OSError:
                pass
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- servers


def netswapd_command(workdir: Path, log_level: str, workers: int, sections: str,
                     daemon_keys: str = "") -> list[str]:
    """Write a bench netswapd's config in `workdir` (its state dir is workdir/state, made
    here) from the [daemon] section every bench uses (plus `daemon_keys`, lines of more
    [daemon] keys) and `sections` (dedented); return the command that runs it. Shared with
    nfs_bench.py and many_nodes.py."""
    state = workdir / "state"
    state.mkdir()
    config = workdir / "netswapd.toml"
    config.write_text(textwrap.dedent(f"""\
        [daemon]
        state_dir = "{state}"
        log_level = "{log_level}"
        workers = {workers}
        shutdown_timeout = "5s"
        """) + textwrap.dedent(daemon_keys) + "\n" + textwrap.dedent(sections))
    return [sys.executable, "-m", "netswap", "--config", str(config)]


@dataclass
class Server:
    """One running NBD server serving the bench file on 127.0.0.1:port."""

    name: str
    image: Path
    size: int
    workdir: Path  # this server run's own directory (config, logs)
    workers: int
    netswapd_log_level: str
    port: int = 0
    pid: int = 0  # the process serving (for nbd-server: the daemon, not the launcher)
    process: subprocess.Popen | None = field(default=None, repr=False)
    log_path: Path | None = None
    netswapd_nbd: str = ""  # more [nbd] keys for netswapd (TOML lines), e.g. to compare options

    @property
    def uri(self) -> str:
        # nbdkit serves any export name: use the default (empty) one.
        name = "" if self.name == "nbdkit" else EXPORT
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def command(self) -> list[str]:
        w = self.workdir
        if self.name == "netswapd":
            return self.netswapd_command(f"""\
                [pool]
                size = "256MiB"
                lock = "best-effort"

                [swap]
                enabled = false

                [[exports]]
                name = "{EXPORT}"
                backend = "file"
                path = "{self.image}"
                size = {self.size}
                description = "fio_matrix bench file"
                """)
        if self.name == "nbdkit":
            return ["nbdkit", "--foreground", "--exit-with-parent", "-p", str(self.port),
                    "-i", "127.0.0.1", "file", str(self.image)]
        if self.name == "nbd-server":
            config = w / "nbd-server.conf"
            # max_threads: nbd-server's worker pool (default 4), set like netswapd's workers.
            config.write_text(textwrap.dedent(f"""\
                [generic]
                port = {self.port}
                listenaddr = 127.0.0.1
                max_threads = {self.workers}
                allowlist = false

                [{EXPORT}]
                exportname = {self.image}
                """))
            return ["nbd-server", "-C", str(config), "-p", str(w / "nbd-server.pid")]
        if self.name == "qemu-nbd":
            # Default cache (writeback, through the page cache) and aio=threads, as the file
            # plugins of the other servers; --shared must cover the 4-connection row.
            return ["qemu-nbd", "-f", "raw", "-x", EXPORT, "-p", str(self.port),
                    "-b", "127.0.0.1", "--persistent", "--shared=8", str(self.image)]
        raise ValueError(self.name)

    def netswapd_command(self, sections: str, daemon_keys: str = "") -> list[str]:
        """netswapd on 127.0.0.1:port with a state dir of its own, plus `sections` of config
        (indented as in this file; dedented here) and `daemon_keys` in [daemon]."""
        return netswapd_command(self.workdir, self.netswapd_log_level, self.workers, f"""\
            [nbd]
            listen = ["127.0.0.1:{self.port}"]
            unix_socket = ""
            """ + self.netswapd_nbd + "\n" + textwrap.dedent(sections), daemon_keys)


    def start(self) -> None:
        self.port = free_port()
        cmd = self.command()
        self.log_path = self.workdir / f"{self.name}.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO if self.name == "netswapd" else self.workdir,
                start_new_session=True,  # our Ctrl-C does not reach it; stop() does
                preexec_fn=_die_with_parent)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        if self.name == "nbd-server":
            self._wait_for_daemon(deadline)
        else:
            self.pid = self.process.pid
        # With log_level "warning" netswapd logs nothing on startup; its "listening on" line
        # is info.  It binds before logging it, so an NBD greeting on the port is the signal.
        want_line = self.name == "netswapd" and self.netswapd_log_level in ("debug", "info")
        while time.monotonic() < deadline:
            if not proc_alive(self.pid):
                raise RuntimeError(f"{self.name} exited during startup:\n{self.log_tail()}")
            if (not want_line or "listening on" in self.log()) and nbd_ready(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer NBD on port {self.port} within "
                           f"{SERVER_START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def _wait_for_daemon(self, deadline: float) -> None:
        """nbd-server forks into the background; find the daemon through its pid file."""
        pidfile = self.workdir / "nbd-server.pid"
        try:
            code = self.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"nbd-server launcher did not exit:\n{self.log_tail()}")
        if code != 0:
            raise RuntimeError(f"nbd-server exited with {code}:\n{self.log_tail()}")
        while time.monotonic() < deadline:
            try:
                self.pid = int(pidfile.read_text().split()[0])
                return
            except (FileNotFoundError, ValueError, IndexError):
                time.sleep(0.05)
        raise RuntimeError(f"nbd-server wrote no pid file:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after SERVER_STOP_TIMEOUT; never raises.  Returns the exit code
        when we could see it (not for nbd-server's daemon)."""
        if not self.pid:
            if self.process and self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            return None
        pids = tree(self.pid)[0]
        if proc_alive(self.pid):
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + SERVER_STOP_TIMEOUT
        while proc_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = False
        for pid in [p for p in pids if proc_alive(p)]:  # the server, then any stragglers
            try:
                os.kill(pid, signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
        if killed:
            print(f"  !! {self.name} did not stop on SIGTERM within {SERVER_STOP_TIMEOUT:.0f} s; "
                  "killed", file=sys.stderr)
        code = None
        if self.process is not None and self.process.pid == self.pid:
            try:
                code = self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for pid in pids:  # reap what was reparented to us (see set_child_subreaper)
            if self.process is None or pid != self.process.pid:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        self.pid = 0
        return code

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(no output)"


# --------------------------------------------------------------------------- running


def run_fio(args, job_text: str, workdir: Path, name: str) -> dict:
    """Run one fio job file; returns parsed JSON or raises RuntimeError."""
    job = workdir / f"{name}.fio"
    out = workdir / f"{name}.json"
    job.write_text(job_text)
    timeout = args.runtime + args.ramp + 60
    proc = subprocess.Popen(
        ["fio", "--output-format=json", f"--output={out}", str(job)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        cwd=workdir, start_new_session=True, text=True)
    try:
        console, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # fio forks a process per job
        proc.communicate()
        raise RuntimeError(f"fio did not finish within {timeout} s (killed)")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    console = "\n".join(l for l in console.splitlines() if "connected to NBD server" not in l)
    if proc.returncode != 0:
        raise RuntimeError(f"fio exited with {proc.returncode}: {console.strip()[-1500:]}")
    text = out.read_text()
    try:  # fio may print notes before the JSON document
        return json.loads(text[text.index("{"):])
    except ValueError as exc:
        raise RuntimeError(f"cannot parse fio JSON ({exc}): {text[:500]}") from None


def prefill(path: Path, size: int, workdir: Path) -> float:
    """Write every byte of the file once (fio's random buffers), and fsync it.

    Reading a hole costs a file-backed server almost nothing, which would flatter every read
    row; after this, reads return real data.  The fsync keeps the writeback of this pass from
    landing on the first server's measurements.
    """
    start = time.monotonic()
    job = workdir / "prefill.fio"
    job.write_text(textwrap.dedent(f"""\
        [prefill]
        ioengine=psync
        filename={path}
        rw=write
        bs=1m
        size={size}
        end_fsync=1
        """))
    proc = subprocess.run(["fio", "--output-format=terse", str(job)], cwd=workdir,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise BenchError(f"prefill with fio failed:\n{proc.stdout[-2000:]}")
    return time.monotonic() - start


def run_server_matrix(args, name: str, repeat: int, rows: list[Row], image: Path, size: int,
                      tmp: Path, results: dict) -> None:
    """Start one server, run every row against it, record, stop it."""
    workdir = tmp / f"r{repeat}-{name}"
    workdir.mkdir()
    server = Server(name, image, size, workdir, args.workers, args.netswapd_log_level,
                    netswapd_nbd=args.netswapd_nbd)
    run = {"repeat": repeat, "server": name, "rows": {}, "errors": [], "log_findings": []}
    results["runs"].append(run)
    sampler = None
    try:
        try:
            server.start()
        except RuntimeError as exc:
            run["errors"].append(f"start: {exc}")
            print(f"  !! {name}: {exc}", file=sys.stderr)
            return
        run["port"], run["pid"] = server.port, server.pid
        sampler = RssSampler(server.pid)
        sampler.start()
        print(f"[repeat {repeat + 1}/{args.repeats}] {name} pid {server.pid} port {server.port}",
              flush=True)
        for row in rows:
            if not proc_alive(server.pid):
                msg = f"{row.key}: {name} is no longer running"
                run["errors"].append(msg)
                print(f"  !! {msg}", file=sys.stderr)
                continue
            job = fio_job(row, server.uri, size, args.runtime, args.ramp)
            cpu0, t0 = tree(server.pid)[2], time.monotonic()
            try:
                raw = run_fio(args, job, workdir, row.key)
                metrics = parse_fio(raw, row)
            except (RuntimeError, ValueError, KeyError) as exc:
                run["errors"].append(f"{row.key}: {exc}")
                print(f"  !! {row.key}: {exc}", file=sys.stderr)
                continue
            cpu1, t1 = tree(server.pid)[2], time.monotonic()
            metrics["server_cpu_pct"] = 100.0 * (cpu1 - cpu0) / CLOCK_TICKS / (t1 - t0)
            metrics["wall_s"] = t1 - t0
            run["rows"][row.key] = {"metrics": metrics, "fio": raw if args.json else None}
            print(f"  {row.label:<24} {metrics['iops']:>10.0f} IOPS {metrics['mbps']:>8.1f} MB/s "
                  f"p50 {fmt_us(metrics['p50_us']):>7} p99 {fmt_us(metrics['p99_us']):>7} µs "
                  f"server CPU {metrics['server_cpu_pct']:.0f}%", flush=True)
        run["rss_end"] = vm_rss(server.pid)
        run["rss_tree_peak"] = max(sampler.peak, tree(server.pid)[1])
    finally:
        if sampler:
            sampler.stop()
        code = server.stop()
        run["exit_code"] = code
        if code not in (None, 0, -signal.SIGTERM) and not run["errors"]:
            run["errors"].append(f"{name} exited with {code}")
        log = server.log()
        findings = [l for l in log.splitlines()
                    if any(w in l for w in ("Traceback", "Error", "ERROR", "WARNING", "CRITICAL",
                                            "error", "Exception"))]
        run["log_findings"] = findings[:50]
        run["log_bytes"] = len(log)
        if "Traceback" in log:
            run["errors"].append(f"{name} log has a Traceback (see log_tail)")
            run["log_tail"] = server.log_tail(80)
        if args.keep_logs and server.log_path and server.log_path.exists():
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(server.log_path, args.keep_logs / f"r{repeat}-{name}.log")


# --------------------------------------------------------------------------- reporting


def fmt_us(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def fmt_num(v, digits=0) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def fmt_mib(v) -> str:
    return "n/a" if v is None else f"{v / 2**20:.0f} MiB"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(results: dict, servers: list[str], rows: list[Row], baselines: list[str]) -> dict:
    per = {}  # (server, row) -> list of metrics per repeat
    for run in results["runs"]:
        for key, entry in run["rows"].items():
            per.setdefault((run["server"], key), []).append((run["repeat"], entry["metrics"]))
    summary = {"rows": {}, "rss": {}}
    for row in rows:
        out = summary["rows"][row.key] = {}
        for s in servers:
            samples = [m for _, m in per.get((s, row.key), [])]
            iops = [m["iops"] for m in samples]
            out[s] = {
                "n": len(samples),
                "iops": median(iops),
                "mbps": median(m["mbps"] for m in samples),
                "p50_us": median(m["p50_us"] for m in samples),
                "p99_us": median(m["p99_us"] for m in samples),
                "server_cpu_pct": median(m["server_cpu_pct"] for m in samples),
                "iops_min": min(iops) if iops else None,
                "iops_max": max(iops) if iops else None,
            }
        # netswapd / each peer: the median of the per-repeat ratios (same repeat, same
        # machine state), not the ratio of the medians.
        out["ratio"], out["ratios"] = {}, {}
        mine = dict((r, m["iops"]) for r, m in per.get(("netswapd", row.key), []))
        for baseline in baselines:
            if "netswapd" not in servers or baseline not in servers or baseline == "netswapd":
                continue
            base = dict((r, m["iops"]) for r, m in per.get((baseline, row.key), []))
            ratios = [mine[r] / base[r] for r in mine if base.get(r)]
            out["ratio"][baseline] = median(ratios)
            out["ratios"][baseline] = ratios
    for s in servers:
        runs = [r for r in results["runs"] if r["server"] == s]
        summary["rss"][s] = {
            "rss_end": [r.get("rss_end") for r in runs],
            "rss_tree_peak": [r.get("rss_tree_peak") for r in runs],
        }
    return summary


def print_report(results: dict, summary: dict, servers: list[str], rows: list[Row],
                 baselines: list[str]) -> None:
    meta = results["meta"]
    print()
    print(f"## fio matrix: {meta['size_gib']:g} GiB file, {meta['runtime']} s per row "
          f"(+{meta['ramp']} s ramp), median of {meta['repeats']} repeat(s)")
    print()
    print(f"Host: {meta['host']['kernel']}, {meta['host']['cpus']} CPUs; "
          + "; ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    print()
    compared = [b for b in baselines if any(b in summary["rows"][r.key]["ratio"] for r in rows)]
    header = ["row"]
    for s in servers:
        header += [f"{s} IOPS", "MB/s", "p50 µs", "p99 µs"]
    header += [f"netswapd/{b} IOPS" for b in compared]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows:
        out = summary["rows"][row.key]
        cells = [row.label]
        for s in servers:
            m = out[s]
            cells += [fmt_num(m["iops"]), fmt_num(m["mbps"], 1), fmt_us(m["p50_us"]),
                      fmt_us(m["p99_us"])]
        for baseline in compared:
            ratio = out["ratio"].get(baseline)
            cells.append("n/a" if ratio is None else f"{ratio:.2f}")
        print("| " + " | ".join(cells) + " |")
    print()
    print("p50/p99: fio completion latency (clat); for randrw rows, of the reads. "
          "randrw IOPS and MB/s are read+write. MB/s = 10^6 bytes/s.")

    # Secondary table: server CPU and run-to-run spread.
    print()
    print("Server CPU (% of one core, process tree, median) and IOPS spread across repeats "
          "((max-min)/median):")
    print()
    header = ["row"] + [f"{s} CPU" for s in servers] + [f"{s} spread" for s in servers]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows:
        out = summary["rows"][row.key]
        cells = [row.label]
        cells += [fmt_num(out[s]["server_cpu_pct"]) + "%" if out[s]["server_cpu_pct"] is not None
                  else "n/a" for s in servers]
        for s in servers:
            m = out[s]
            if m["n"] >= 2 and m["iops"]:
                cells.append(f"{100 * (m['iops_max'] - m['iops_min']) / m['iops']:.0f}%")
            else:
                cells.append("n/a")
        print("| " + " | ".join(cells) + " |")

    print()
    print("Memory at the end of each server's matrix (VmRSS of the server process; peak RSS "
          "summed over its process tree while rows ran), per repeat:")
    print()
    for s in servers:
        rss = summary["rss"][s]
        ends = ", ".join(fmt_mib(v) for v in rss["rss_end"])
        peaks = ", ".join(fmt_mib(v) for v in rss["rss_tree_peak"])
        print(f"- {s}: VmRSS {ends}; tree peak {peaks}")

    print_problems(results)


def print_problems(results: dict) -> None:
    """Errors, notable server log lines and log tails of every run, if any (shared with
    nfs_bench.py)."""
    problems = [(r, e) for r in results["runs"] for e in r["errors"]]
    findings = [(r, l) for r in results["runs"] for l in r["log_findings"]]
    if problems or findings:
        print()
        print("Problems:")
        for run, err in problems:
            print(f"- repeat {run['repeat'] + 1} {run['server']}: {err}")
        for run, line in findings[:40]:
            print(f"- repeat {run['repeat'] + 1} {run['server']} log: {line}")
        for run in results["runs"]:
            if run.get("log_tail"):
                print(f"\n{run['server']} (repeat {run['repeat'] + 1}) log tail:\n"
                      + textwrap.indent(run["log_tail"], "    "))


# --------------------------------------------------------------------------- setup


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=20, cwd=REPO).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (out.strip().splitlines() or ["unknown"])[0]


def check_tools(servers: list[str]) -> dict:
    versions = {}
    missing = [t for t in ["fio"] + [BINARIES[s] for s in servers if s in BINARIES]
               if shutil.which(t) is None]
    if missing:
        raise BenchError(
            "missing tool(s): " + ", ".join(missing) + ". Install them (Debian: apt-get install "
            + " ".join(sorted({INSTALL_HINT[t] for t in missing})) + ") or leave the server out "
            "with --servers.")
    enghelp = subprocess.run(["fio", "--enghelp=nbd"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    if enghelp.returncode != 0 or "uri" not in enghelp.stdout:
        raise BenchError("this fio has no nbd ioengine (needs fio built with libnbd, fio >= 3.20)")
    versions["fio"] = tool_version(["fio", "--version"])
    if "netswapd" in servers:
        probe = subprocess.run([sys.executable, "-c", "import netswap, netswap._pool"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=REPO)
        if probe.returncode != 0:
            raise BenchError(f"netswap is not importable by {sys.executable} "
                             f"(run `{sys.executable} -m pip install -e .` at the repo root):\n"
                             + probe.stdout.strip()[-800:])
        versions["netswapd"] = tool_version([sys.executable, "-m", "netswap", "--version"])
    if "nbdkit" in servers:
        versions["nbdkit"] = tool_version(["nbdkit", "--version"])
    if "nbd-server" in servers:
        versions["nbd-server"] = tool_version(["nbd-server", "-V"]).replace(
            "This is nbd-server version ", "nbd-server ")
    if "qemu-nbd" in servers:
        versions["qemu-nbd"] = tool_version(["qemu-nbd", "--version"])
    return versions


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(t[:-1]) * units[t[-1]]
    return int(t)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="rows: " + ", ".join(r.key for r in ROWS))
    p.add_argument("--servers", default=",".join(ALL_SERVERS),
                   help="comma-separated subset of %(default)s")
    p.add_argument("--rows", default=",".join(r.key for r in ROWS),
                   help="comma-separated subset of the rows (see below)")
    p.add_argument("--repeats", type=int, default=3, help="matrix repeats (default 3)")
    p.add_argument("--runtime", type=int, default=None,
                   help="seconds per row, after the ramp (default 10; 3 with --quick)")
    p.add_argument("--ramp", type=int, default=None,
                   help="fio ramp_time seconds per row (default 2; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="short rows for a smoke test")
    p.add_argument("--size", default="4GiB", help="bench file size (default 4GiB)")
    p.add_argument("--dir", default="/var/tmp",
                   help="where the temp dir with the bench file goes (default /var/tmp; "
                        "avoid tmpfs if you want the file on disk)")
    p.add_argument("--workers", type=int, default=8,
                   help="netswapd daemon.workers, also nbd-server max_threads (default 8)")
    p.add_argument("--netswapd-log-level", default="warning",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--netswapd-nbd", default="", metavar="TOML",
                   help='more [nbd] keys for netswapd, e.g. "follow_receiving_cpu = true"')
    p.add_argument("--baselines", default="nbdkit,nbd-server,qemu-nbd",
                   help="servers netswapd's IOPS ratio is computed against, a column each "
                        "(default nbdkit,nbd-server,qemu-nbd: every peer that ran)")
    p.add_argument("--no-prefill", action="store_true",
                   help="leave the file sparse (reads then hit holes: unrealistically fast)")
    p.add_argument("--json", type=Path, help="write raw results (incl. fio JSON) here")
    p.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy server logs to DIR")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (file, jobs, logs)")
    args = p.parse_args(argv)
    if args.runtime is None:
        args.runtime = 3 if args.quick else 10
    if args.ramp is None:
        args.ramp = 1 if args.quick else 2
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in args.server_list if s not in ALL_SERVERS]
    if bad or not args.server_list:
        p.error(f"unknown server(s) {bad}; choose from {', '.join(ALL_SERVERS)}")
    args.row_list = [ROWS_BY_KEY.get(r.strip()) for r in args.rows.split(",") if r.strip()]
    if None in args.row_list or not args.row_list:
        p.error(f"unknown row in {args.rows!r}; choose from {', '.join(ROWS_BY_KEY)}")
    if args.repeats < 1 or args.runtime < 1 or args.ramp < 0 or args.workers < 1:
        p.error("--repeats, --runtime and --workers must be >= 1, --ramp >= 0")
    try:
        args.size_bytes = parse_size(args.size)
    except ValueError:
        p.error(f"bad --size {args.size!r}")
    if args.size_bytes <= 0 or args.size_bytes % (1 << 20):
        p.error("--size must be a positive multiple of 1MiB")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    servers, rows = args.server_list, args.row_list
    try:
        versions = check_tools(servers)
    except BenchError as exc:
        print(f"fio_matrix: {exc}", file=sys.stderr)
        return 2
    base = Path(args.dir)
    if not base.is_dir():
        print(f"fio_matrix: --dir {base} is not a directory", file=sys.stderr)
        return 2
    need = 0 if args.no_prefill else args.size_bytes
    if shutil.disk_usage(base).free < need + (1 << 30):
        print(f"fio_matrix: not enough free space in {base} for a {args.size} file",
              file=sys.stderr)
        return 2

    set_child_subreaper()

    def on_sigterm(signum, frame):  # make `kill` of the harness run the finally blocks
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="netswap-fio-matrix-", dir=base))
    image = tmp / "bench.img"
    results = {
        "meta": {
            "argv": sys.argv, "servers": servers, "rows": [r.key for r in rows],
            "repeats": args.repeats, "runtime": args.runtime, "ramp": args.ramp,
            "size": args.size_bytes, "size_gib": args.size_bytes / 2**30, "workers": args.workers,
            "prefill": not args.no_prefill, "versions": versions,
            "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                     "python": sys.version.split()[0]},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "jobs": {r.key: fio_job(r, "nbd://127.0.0.1:PORT/EXPORT", args.size_bytes,
                                    args.runtime, args.ramp) for r in rows},
        },
        "runs": [],
    }
    started = time.monotonic()
    status = 0
    try:
        with open(image, "wb") as f:
            f.truncate(args.size_bytes)  # sparse
        print(f"bench file {image} ({args.size}); servers {', '.join(servers)}; "
              f"{len(rows)} rows x {args.runtime}+{args.ramp} s x {args.repeats} repeat(s)",
              flush=True)
        if not args.no_prefill:
            secs = prefill(image, args.size_bytes, tmp)
            results["meta"]["prefill_s"] = secs
            print(f"prefilled in {secs:.1f} s", flush=True)
        for repeat in range(args.repeats):
            shift = repeat % len(servers)
            for name in servers[shift:] + servers[:shift]:  # rotate: drift hits all alike
                run_server_matrix(args, name, repeat, rows, image, args.size_bytes, tmp, results)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped, reporting what finished", file=sys.stderr)
        status = 130
    except BenchError as exc:
        print(f"fio_matrix: {exc}", file=sys.stderr)
        status = 2
    finally:
        results["meta"]["elapsed_s"] = time.monotonic() - started
        reap_orphans()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    baselines = args.baselines.split(",")
    summary = summarize(results, servers, rows, baselines)
    results["summary"] = summary
    if results["runs"]:
        print_report(results, summary, servers, rows, baselines)
        print(f"\n(total {results['meta']['elapsed_s'] / 60:.1f} min)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"raw results: {args.json}")
    if status == 0 and any(r["errors"] for r in results["runs"]):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
