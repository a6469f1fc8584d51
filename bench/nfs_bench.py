#!/usr/bin/env python3
"""NFSv3 throughput: netswapd's scratch export beside nfs-ganesha (FSAL VFS), same client.

Each server in turn serves a fresh directory on loopback; one client process (Debian's
libnfs13 through ctypes, its synchronous API: one request in flight) creates a file there,
writes it sequentially with 1 MiB requests, fsyncs (COMMIT), reads it back, then does the same
with 4 KiB requests on a smaller file.  Every read is compared with what was written.  The
whole run is repeated ``--repeats`` times with the server order rotated, and the medians are
printed as a Markdown table with the ratio netswapd/ganesha per row.

    python3 bench/nfs_bench.py                  # both servers, 3 repeats, 256 MiB + 32 MiB
    python3 bench/nfs_bench.py --quick          # smoke test, well under a minute
    python3 bench/nfs_bench.py --servers netswapd --json out.json
    python3 bench/nfs_bench.py --export swap    # a swap node's own swap file (see below)

With ``--export swap`` the client (as node localhost) writes and reads the swap file
netswapd made for it in its swap export, the calls its C loop serves (``nfs.c_loop``;
``--no-c-loop`` for the Python path); ganesha serves a fully allocated file of the same
size, made beforehand, which the client opens the same way (no create, no truncate).

Only the standard library is used (plus fio_matrix.py beside this file, for the process
helpers).  Needs libnfs13 (Debian: libnfs13), and for the peer nfs-ganesha, nfs-ganesha-vfs
and rpcbind; without them, or when ganesha will not start here, the bench says why and
measures netswapd alone.  ganesha needs rpcbind: an already running one is used, otherwise
``rpcbind -f -w`` is started for the run and stopped after it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fio_matrix import (  # noqa: E402  (a sibling script, not a package)
    REPO, BenchError, RssSampler, _die_with_parent, fmt_mib, fmt_num, free_port, median,
    netswapd_command, parse_size, print_problems, proc_alive, reap_orphans,
    set_child_subreaper, tool_version, tree, vm_rss)

ALL_SERVERS = ("netswapd", "ganesha")
MiB = 1 << 20
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 40.0  # netswapd drains for up to daemon.shutdown_timeout (5 s here)
BENCH_FILE = "nfs-bench.bin"


@dataclass(frozen=True)
class Phase:
    key: str
    label: str
    op: str  # "write" or "read"
    block: int


PHASES = (
    Phase("write-1m", "1 MiB WRITE (seq)", "write", MiB),
    Phase("read-1m", "1 MiB READ (seq)", "read", MiB),
    Phase("write-4k", "4 KiB WRITE (seq)", "write", 4096),
    Phase("read-4k", "4 KiB READ (seq)", "read", 4096),
)


# --------------------------------------------------------------------------- the client

# Runs in a child process so a crash inside libnfs cannot take the harness down.  argv: url
# (for the ports), server, export, then per block size "block:size:seconds".  For each block
# size: create+truncate the file, pwrite it sequentially, fsync (COMMIT) - the write phase
# ends after the fsync - then pread it back and compare every block with what was written.
# A phase stops early once `seconds` have passed (then the read covers what was written).
# Prints one JSON object per phase.  The data buffer is filled once; the loop allocates
# nothing per request, so the client's own cost stays small beside the servers'.
CLIENT = r"""
import ctypes, json, os, sys, time
lib = ctypes.CDLL("libnfs.so.13")
libc = ctypes.CDLL(None)
vp, u64 = ctypes.c_void_p, ctypes.c_uint64
lib.nfs_init_context.restype = vp
lib.nfs_destroy_context.argtypes = [vp]
lib.nfs_parse_url_full.restype = vp
lib.nfs_parse_url_full.argtypes = [vp, ctypes.c_char_p]
lib.nfs_mount.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p]
lib.nfs_create.argtypes = [vp, ctypes.c_char_p, ctypes.c_int, ctypes.c_int,
                           ctypes.POINTER(vp)]
lib.nfs_pwrite.argtypes = [vp, vp, u64, u64, vp]
lib.nfs_pread.argtypes = [vp, vp, u64, u64, vp]
lib.nfs_fsync.argtypes = [vp, vp]
lib.nfs_close.argtypes = [vp, vp]
lib.nfs_get_error.restype = ctypes.c_char_p
lib.nfs_get_error.argtypes = [vp]
lib.nfs_get_readmax.restype = u64
lib.nfs_get_readmax.argtypes = [vp]
lib.nfs_get_writemax.restype = u64
lib.nfs_get_writemax.argtypes = [vp]
libc.memcmp.argtypes = [vp, vp, ctypes.c_size_t]

lib.nfs_open.argtypes = [vp, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(vp)]
url, server, export, name, how = (a.encode() for a in sys.argv[1:6])
nfs = lib.nfs_init_context()
def check(result, what):
    if result < 0:
        sys.exit(f"{what}: {lib.nfs_get_error(nfs).decode(errors='replace')}")
    return result
if not lib.nfs_parse_url_full(nfs, url):
    sys.exit("bad url: " + lib.nfs_get_error(nfs).decode(errors="replace"))
check(lib.nfs_mount(nfs, server, export), "mount")
print(json.dumps({"readmax": lib.nfs_get_readmax(nfs), "writemax": lib.nfs_get_writemax(nfs)}),
      flush=True)
source = ctypes.create_string_buffer(os.urandom(1 << 20), 1 << 20)
back = ctypes.create_string_buffer(1 << 20)
src, dst = ctypes.addressof(source), ctypes.addressof(back)
for spec in sys.argv[6:]:
    block, size, seconds = (int(x) for x in spec.split(":"))
    tag = "1m" if block == 1 << 20 else f"{block // 1024}k"
    fh = vp()
    if how == b"open":  # a swap file: there already, at its size
        check(lib.nfs_open(nfs, b"/" + name, os.O_RDWR, ctypes.byref(fh)), "open")
    else:
        check(lib.nfs_create(nfs, b"/" + name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600,
                             ctypes.byref(fh)), "create")
    ops, offset, start = 0, 0, time.monotonic()
    while offset < size:
        done = check(lib.nfs_pwrite(nfs, fh, offset, block, src + offset % (1 << 20)), "pwrite")
        if done != block:
            sys.exit(f"pwrite at {offset}: {done} of {block} bytes")
        offset += block
        ops += 1
        if ops % 64 == 0 and time.monotonic() - start > seconds:
            break
    check(lib.nfs_fsync(nfs, fh), "fsync")
    elapsed = time.monotonic() - start
    written = offset
    print(json.dumps({"phase": "write-" + tag, "bytes": written, "ops": ops,
                      "seconds": elapsed}), flush=True)
    ops, offset, start = 0, 0, time.monotonic()
    while offset < written:
        got = check(lib.nfs_pread(nfs, fh, offset, block, dst), "pread")
        if got != block:
            sys.exit(f"pread at {offset}: {got} of {block} bytes")
        if libc.memcmp(dst, src + offset % (1 << 20), block):
            sys.exit(f"pread at {offset}: data differs from what was written")
        offset += block
        ops += 1
    elapsed = time.monotonic() - start
    print(json.dumps({"phase": "read-" + tag, "bytes": offset, "ops": ops,
                      "seconds": elapsed}), flush=True)
    check(lib.nfs_close(nfs, fh), "close")
lib.nfs_destroy_context(nfs)
"""


def run_client(server: "Server", specs: list[str], timeout: float) -> tuple[dict, list[dict]]:
    """The client against one server: (its mount info, one dict per phase)."""
    url = (f"nfs://127.0.0.1{server.export}?version=3&nfsport={server.nfs_port}"
           f"&mountport={server.mount_port}")
    how = "open" if server.swap_size else "create"
    cmd = [sys.executable, "-c", CLIENT, url, "127.0.0.1", server.export, server.file_name,
           how, *specs]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"client did not finish within {timeout:.0f} s (killed)") from None
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"client exited with {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    return lines[0], lines[1:]


# --------------------------------------------------------------------------- servers


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Server:
    """One NFSv3 server on 127.0.0.1 (NFS and MOUNT on ports of its own)."""

    name: str
    workdir: Path  # this run's own directory: config, log, state or the exported dir
    workers: int
    netswapd_log_level: str
    nfs_port: int = 0
    mount_port: int = 0
    export: str = ""
    served_dir: Path | None = None  # where the bench file lands on the server's side
    process: subprocess.Popen | None = field(default=None, repr=False)
    log_path: Path | None = None
    swap_size: int = 0  # --export swap: the size of the file the client opens (0: scratch)
    c_loop: bool = True  # netswapd's nfs.c_loop
    file_name: str = BENCH_FILE

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def command(self) -> list[str]:
        if self.name == "netswapd":
            if self.swap_size:
                # The swap export only; the client is node localhost (the default nodes).
                self.export, self.file_name = "/swap", "localhost"
                self.served_dir = self.workdir / "state" / "nfs-swap"
                swap_export, scratch_export = "/swap", ""
            else:
                # No swap (NBD or NFS), no static exports: the scratch export is all it serves.
                self.export = "/scratch"
                self.served_dir = self.workdir / "state" / "nfs-scratch"
                swap_export, scratch_export = "", "/scratch"
            swap_size = max(self.swap_size // MiB, 1)  # used only when swap_export is set
            return netswapd_command(self.workdir, self.netswapd_log_level, self.workers, f"""\
                [pool]
                size = "256MiB"
                lock = "best-effort"

                [nbd]
                listen = []
                unix_socket = ""

                [swap]
                enabled = false

                [nfs]
                enabled = true
                listen = ["127.0.0.1:{self.nfs_port}"]
                mount_listen = ["127.0.0.1:{self.mount_port}"]
                swap_export = "{swap_export}"
                swap_size = "{swap_size}MiB"
                scratch_export = "{scratch_export}"
                max_io = "1MiB"
                c_loop = {str(self.c_loop).lower()}

                [metrics]
                listen = []
                """)
        if self.name == "ganesha":
            # FSAL VFS needs a file system with file handles (open_by_handle_at; ext4, xfs,
            # recent tmpfs, not every overlayfs): the workdir is under --dir, /var/tmp.
            self.served_dir = self.workdir / "export"
            self.served_dir.mkdir()
            self.export = str(self.served_dir)
            if self.swap_size:  # a swap file's stand-in: fully allocated, opened as is
                fd = os.open(self.served_dir / BENCH_FILE, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    os.posix_fallocate(fd, 0, self.swap_size)
                finally:
                    os.close(fd)
            config = self.workdir / "ganesha.conf"
            # Graceless: NFSv3 I/O does not wait for a grace period, but skipping it keeps
            # startup quick.  Max{Read,Write} = 1 MiB, as netswapd's max_io, so a 1 MiB
            # request is one READ/WRITE on both.
            config.write_text(textwrap.dedent(f"""\
                NFS_CORE_PARAM {{
                    Bind_addr = 127.0.0.1;
                    NFS_Port = {self.nfs_port};
                    MNT_Port = {self.mount_port};
                    Protocols = 3;
                    Enable_NLM = false;
                    Enable_UDP = false;
                    Enable_RQUOTA = false;
                }}
                NFSV4 {{ Graceless = true; }}
                EXPORT {{
                    Export_Id = 1;
                    Path = {self.export};
                    Pseudo = {self.export};
                    Protocols = 3;
                    Transports = TCP;
                    Access_Type = RW;
                    Squash = No_Root_Squash;
                    SecType = sys;
                    MaxRead = 1048576;
                    MaxWrite = 1048576;
                    FSAL {{ Name = VFS; }}
                }}
                """))
            return ["ganesha.nfsd", "-F", "-f", str(config), "-L", str(self.log_path),
                    "-N", "NIV_EVENT", "-p", str(self.workdir / "ganesha.pid")]
        raise ValueError(self.name)

    def start(self) -> None:
        self.nfs_port, self.mount_port = free_port(), free_port()
        self.log_path = self.workdir / f"{self.name}.log"
        cmd = self.command()
        # netswapd logs to stderr; ganesha logs to -L and keeps stdout for crashes.
        out_path = self.log_path if self.name == "netswapd" else self.workdir / "ganesha.out"
        with open(out_path, "w") as out:
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=REPO if self.name == "netswapd" else self.workdir,
                start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if not proc_alive(self.pid):
                raise RuntimeError(f"{self.name} exited during startup:\n{self.log_tail()}")
            ready = self.name != "ganesha" or "NFS SERVER INITIALIZED" in self.log()
            if ready and port_open(self.nfs_port) and port_open(self.mount_port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on ports {self.nfs_port}/"
                           f"{self.mount_port} within {SERVER_START_TIMEOUT:.0f} s:\n"
                           f"{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after SERVER_STOP_TIMEOUT; never raises."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        pids = tree(self.pid)[0]
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            for pid in [p for p in pids if proc_alive(p)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            print(f"  !! {self.name} did not stop on SIGTERM within "
                  f"{SERVER_STOP_TIMEOUT:.0f} s; killed", file=sys.stderr)
            return self.process.wait()

    def log(self) -> str:
        text = ""
        for path in (self.log_path, self.workdir / f"{self.name}.out"):
            try:
                text += path.read_text(errors="replace") if path else ""
            except FileNotFoundError:
                pass
        return text

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(no output)"


class Rpcbind:
    """ganesha registers its programs with rpcbind and gives up without one.  Use a running
    rpcbind; otherwise run one in the foreground for the length of the bench."""

    def __init__(self):
        self.process: subprocess.Popen | None = None

    def ensure(self) -> str:
        if port_open(111):
            return "rpcbind already running"
        self.process = subprocess.Popen(["rpcbind", "-f", "-w"], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"rpcbind -f -w exited with {self.process.returncode}: "
                                 f"{self.process.stderr.read().decode(errors='replace')}")
            if port_open(111):
                return "rpcbind started for this run"
            time.sleep(0.05)
        raise BenchError("rpcbind -f -w did not listen on port 111 within 10 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --------------------------------------------------------------------------- running


LOG_PROBLEM_WORDS = ("Traceback", "ERROR", "CRITICAL", "Exception", ":CRIT :", ":MAJ :",
                     ":FATAL :")
# ganesha complains at startup about facilities a loopback NFSv3 bench does not use.
# (No dbus, no Kerberos: the export is sec=sys.)
GANESHA_EXPECTED = ("dbus", "DBUS", "Cannot acquire credentials for principal nfs",
                    "no usable keytab entry")


def run_server(args, name: str, repeat: int, tmp: Path, results: dict) -> None:
    """Start one server, run the client against it, record, stop it."""
    workdir = tmp / f"r{repeat}-{name}"
    workdir.mkdir()
    server = Server(name, workdir, args.workers, args.netswapd_log_level,
                    swap_size=args.swap_size, c_loop=args.c_loop)
    run = {"repeat": repeat, "server": name, "phases": {}, "errors": [], "log_findings": []}
    results["runs"].append(run)
    sampler = None
    try:
        try:
            server.start()
        except RuntimeError as exc:
            run["errors"].append(f"start: {exc}")
            print(f"  !! {name}: {exc}", file=sys.stderr)
            return
        sampler = RssSampler(server.pid)
        sampler.start()
        run["rss_start"] = vm_rss(server.pid)
        print(f"[repeat {repeat + 1}/{args.repeats}] {name} pid {server.pid} "
              f"nfs port {server.nfs_port} mount port {server.mount_port}", flush=True)
        cpu0 = tree(server.pid)[2]
        t0 = time.monotonic()
        try:
            mount, phases = run_client(server, args.specs, args.client_timeout)
        except (RuntimeError, ValueError) as exc:
            run["errors"].append(f"client: {exc}")
            print(f"  !! client: {exc}", file=sys.stderr)
            return
        wall = time.monotonic() - t0
        run["server_cpu_pct"] = 100.0 * (tree(server.pid)[2] - cpu0) / os.sysconf(
            "SC_CLK_TCK") / wall
        run["mount"] = mount
        for p in phases:
            m = {"mbps": p["bytes"] / p["seconds"] / 1e6, "ops": p["ops"] / p["seconds"],
                 "bytes": p["bytes"], "seconds": p["seconds"]}
            run["phases"][p["phase"]] = m
            label = next(ph.label for ph in PHASES if ph.key == p["phase"])
            print(f"  {label:<20} {m['mbps']:>8.1f} MB/s {m['ops']:>9.0f} ops/s "
                  f"({p['bytes'] / MiB:.0f} MiB in {p['seconds']:.2f} s)", flush=True)
        served = server.served_dir / server.file_name if server.served_dir else None
        if served is not None and not served.exists():
            run["errors"].append(f"{served} is not on the server's side")
        run["rss_end"] = vm_rss(server.pid)
        run["rss_tree_peak"] = max(sampler.peak, tree(server.pid)[1])
    finally:
        if sampler:
            sampler.stop()
        code = server.stop()
        if server.served_dir is not None:  # one bench file on disk at a time
            (server.served_dir / server.file_name).unlink(missing_ok=True)
        run["exit_code"] = code
        if code not in (None, 0, -signal.SIGTERM) and not run["errors"]:
            run["errors"].append(f"{name} exited with {code}")
        log = server.log()
        run["log_findings"] = [l for l in log.splitlines()
                               if any(w in l for w in LOG_PROBLEM_WORDS)
                               and not any(w in l for w in GANESHA_EXPECTED)][:50]
        if "Traceback" in log:
            run["errors"].append(f"{name} log has a Traceback")
            run["log_tail"] = server.log_tail(80)
        if args.keep_logs and server.log_path and server.log_path.exists():
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(server.log_path, args.keep_logs / f"r{repeat}-{name}.log")


# --------------------------------------------------------------------------- reporting


def summarize(results: dict, servers: list[str]) -> dict:
    summary = {"phases": {}, "rss": {}, "cpu": {}}
    for phase in PHASES:
        out = summary["phases"][phase.key] = {}
        per = {s: {r["repeat"]: r["phases"][phase.key] for r in results["runs"]
                   if r["server"] == s and phase.key in r["phases"]} for s in servers}
        for s in servers:
            samples = list(per[s].values())
            out[s] = {"n": len(samples), "mbps": median(m["mbps"] for m in samples),
                      "ops": median(m["ops"] for m in samples),
                      "mbps_min": min((m["mbps"] for m in samples), default=None),
                      "mbps_max": max((m["mbps"] for m in samples), default=None)}
        # The median of the per-repeat ratios (same repeat, same machine state), not the
        # ratio of the medians.
        if "netswapd" in per and "ganesha" in per:
            ratios = [per["netswapd"][r]["mbps"] / per["ganesha"][r]["mbps"]
                      for r in per["netswapd"] if r in per["ganesha"]]
            out["ratios"], out["ratio"] = ratios, median(ratios)
    for s in servers:
        runs = [r for r in results["runs"] if r["server"] == s]
        summary["rss"][s] = {k: [r.get(k) for r in runs]
                             for k in ("rss_start", "rss_end", "rss_tree_peak")}
        summary["cpu"][s] = median(r.get("server_cpu_pct") for r in runs)
    return summary


def print_report(results: dict, summary: dict, servers: list[str]) -> None:
    meta = results["meta"]
    print()
    print(f"## NFSv3 over loopback, libnfs sync client (one request in flight): "
          f"{meta['size_1m'] // MiB} MiB file with 1 MiB requests, {meta['size_4k'] // MiB} MiB "
          f"with 4 KiB (at most {meta['seconds_4k']} s per 4 KiB write); median of "
          f"{meta['repeats']} repeat(s)")
    print()
    print(f"Host: {meta['host']['kernel']}, {meta['host']['cpus']} CPUs; "
          + "; ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    if meta.get("ganesha_note"):
        print()
        print(f"ganesha: {meta['ganesha_note']}")
    print()
    ratio = any(summary["phases"][p.key].get("ratio") is not None for p in PHASES)
    header = ["phase"]
    for s in servers:
        header += [f"{s} MB/s", "ops/s"]
    if ratio:
        header.append("netswapd/ganesha")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for phase in PHASES:
        out = summary["phases"][phase.key]
        cells = [phase.label]
        for s in servers:
            cells += [fmt_num(out[s]["mbps"], 1), fmt_num(out[s]["ops"])]
        if ratio:
            cells.append("n/a" if out.get("ratio") is None else f"{out['ratio']:.2f}")
        print("| " + " | ".join(cells) + " |")
    print()
    print("MB/s = 10^6 bytes/s; a write phase includes its closing fsync (COMMIT); every read "
          "is compared with what was written.  The ratio is the median of per-repeat MB/s "
          "ratios.  Reads come from the server's page cache (the file was just written).")
    print()
    print("Server CPU (% of one core, process tree, median over the client run) and MB/s "
          "spread across repeats ((max-min)/median):")
    print()
    print("- " + "; ".join(f"{s} CPU {fmt_num(summary['cpu'][s])}"
                           + ("%" if summary["cpu"][s] is not None else "") for s in servers))
    for phase in PHASES:
        out = summary["phases"][phase.key]
        spreads = []
        for s in servers:
            m = out[s]
            spreads.append(f"{s} {100 * (m['mbps_max'] - m['mbps_min']) / m['mbps']:.0f}%"
                           if m["n"] >= 2 and m["mbps"] else f"{s} n/a")
        print(f"- {phase.label}: " + ", ".join(spreads))
    print()
    print("Server memory per repeat (VmRSS after start, VmRSS at the end, peak RSS of the "
          "process tree while the client ran; netswapd's includes its preallocated, mlocked "
          "256 MiB pool):")
    print()
    for s in servers:
        rss = summary["rss"][s]
        print(f"- {s}: start {', '.join(fmt_mib(v) for v in rss['rss_start'])}; "
              f"end {', '.join(fmt_mib(v) for v in rss['rss_end'])}; "
              f"peak {', '.join(fmt_mib(v) for v in rss['rss_tree_peak'])}")
    mounts = {r["server"]: r.get("mount") for r in results["runs"] if r.get("mount")}
    if mounts:
        print()
        print("Transfer sizes the servers offered (FSINFO rtmax/wtmax, as libnfs saw them): "
              + "; ".join(f"{s} {m['readmax'] // 1024} KiB / {m['writemax'] // 1024} KiB"
                          for s, m in mounts.items()))
    print_problems(results)


# --------------------------------------------------------------------------- setup


def check_tools(servers: list[str], results: dict) -> list[str]:
    """Versions into results["meta"]; returns the servers that can run.  A missing ganesha
    is said in the output, not fatal: netswapd is still measured."""
    versions = results["meta"]["versions"]
    probe = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.CDLL('libnfs.so.13')"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise BenchError("libnfs.so.13 cannot be loaded (Debian: apt-get install libnfs13)")
    runnable = []
    if "netswapd" in servers:
        probe = subprocess.run([sys.executable, "-c", "import netswap, netswap._pool"],
                               capture_output=True, text=True, cwd=REPO)
        if probe.returncode != 0:
            raise BenchError(f"netswap is not importable by {sys.executable} "
                             f"(run `{sys.executable} -m pip install -e .` at the repo root):\n"
                             + (probe.stdout + probe.stderr).strip()[-800:])
        versions["netswapd"] = tool_version([sys.executable, "-m", "netswap", "--version"])
        runnable.append("netswapd")
    if "ganesha" in servers:
        missing = [t for t in ("ganesha.nfsd", "rpcbind") if shutil.which(t) is None]
        fsal = any(Path(d, "libfsalvfs.so").exists()
                   for d in ("/usr/lib/x86_64-linux-gnu/ganesha", "/usr/lib/ganesha",
                             "/usr/lib64/ganesha", "/usr/lib/aarch64-linux-gnu/ganesha"))
        if missing or not fsal:
            results["meta"]["ganesha_note"] = (
                "not measured: " + ", ".join(missing + ([] if fsal else ["libfsalvfs.so"]))
                + " missing (Debian: apt-get install nfs-ganesha nfs-ganesha-vfs rpcbind)")
        elif os.geteuid() != 0:
            results["meta"]["ganesha_note"] = (
                "not measured: FSAL VFS needs root (open_by_handle_at, CAP_DAC_READ_SEARCH)")
        else:
            dpkg = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "nfs-ganesha"],
                                  capture_output=True, text=True)
            versions["ganesha"] = ("nfs-ganesha " + dpkg.stdout.strip()
                                   if dpkg.returncode == 0 else "nfs-ganesha (version unknown)")
            runnable.append("ganesha")
    dpkg = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libnfs13"],
                          capture_output=True, text=True)
    versions["client"] = "libnfs13 " + (dpkg.stdout.strip() if dpkg.returncode == 0
                                        else "(version unknown)")
    return runnable


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=",".join(ALL_SERVERS),
                   help="comma-separated subset of %(default)s")
    p.add_argument("--repeats", type=int, default=None,
                   help="repeats, server order rotated (default 3; 1 with --quick)")
    p.add_argument("--size", default=None,
                   help="file written with 1 MiB requests (default 256MiB; 32MiB with --quick)")
    p.add_argument("--size-4k", default=None,
                   help="file written with 4 KiB requests (default 32MiB; 4MiB with --quick)")
    p.add_argument("--seconds-4k", type=int, default=None,
                   help="stop a 4 KiB write phase after this many seconds; the read then "
                        "covers what was written (default 30; 10 with --quick)")
    p.add_argument("--quick", action="store_true", help="small files, one repeat: a smoke run")
    p.add_argument("--dir", default="/var/tmp",
                   help="where the temp dir (exported dirs, state, logs) goes (default "
                        "/var/tmp; ganesha's FSAL VFS needs a file system with file handles, open_by_handle_at)")
    p.add_argument("--workers", type=int, default=8, help="netswapd daemon.workers (default 8)")
    p.add_argument("--export", choices=("scratch", "swap"), default="scratch",
                   help="netswapd's scratch export (a file the client creates), or its swap "
                        "export (node localhost's swap file; ganesha: a preallocated file)")
    p.add_argument("--no-c-loop", dest="c_loop", action="store_false",
                   help="netswapd with nfs.c_loop = false (--export swap: the Python path)")
    p.add_argument("--netswapd-log-level", default="warning",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--json", type=Path, help="write raw results here")
    p.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy server logs to DIR")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args(argv)
    q = args.quick
    args.repeats = args.repeats if args.repeats is not None else (1 if q else 3)
    args.seconds_4k = args.seconds_4k if args.seconds_4k is not None else (10 if q else 30)
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in args.server_list if s not in ALL_SERVERS]
    if bad or not args.server_list:
        p.error(f"unknown server(s) {bad}; choose from {', '.join(ALL_SERVERS)}")
    try:
        args.size_1m = parse_size(args.size or ("32MiB" if q else "256MiB"))
        args.size_4k = parse_size(args.size_4k or ("4MiB" if q else "32MiB"))
    except ValueError:
        p.error("bad --size or --size-4k")
    if min(args.size_1m, args.size_4k) <= 0 or (args.size_1m | args.size_4k) % MiB:
        p.error("--size and --size-4k must be positive multiples of 1MiB")
    if args.repeats < 1 or args.seconds_4k < 1 or args.workers < 1:
        p.error("--repeats, --seconds-4k and --workers must be >= 1")
    # --export swap: one file for both phases, as large as the larger.
    args.swap_size = max(args.size_1m, args.size_4k) if args.export == "swap" else 0
    # The 1 MiB phases are not time-capped (--seconds-4k is for the slow 4 KiB ones).
    args.specs = [f"{MiB}:{args.size_1m}:{10**6}", f"4096:{args.size_4k}:{args.seconds_4k}"]
    args.client_timeout = 600 + 2 * args.seconds_4k
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    base = Path(args.dir)
    if not base.is_dir():
        print(f"nfs_bench: --dir {base} is not a directory", file=sys.stderr)
        return 2
    need = max(args.size_1m, args.size_4k)  # one bench file at a time (run_server)
    if shutil.disk_usage(base).free < need + (1 << 30):
        print(f"nfs_bench: not enough free space in {base}", file=sys.stderr)
        return 2
    results = {
        "meta": {
            "argv": sys.argv, "repeats": args.repeats, "size_1m": args.size_1m,
            "size_4k": args.size_4k, "seconds_4k": args.seconds_4k, "workers": args.workers,
            "export": args.export, "c_loop": args.c_loop,
            "versions": {},
            "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                     "python": sys.version.split()[0]},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "runs": [],
    }
    try:
        servers = check_tools(args.server_list, results)
    except BenchError as exc:
        print(f"nfs_bench: {exc}", file=sys.stderr)
        return 2
    note = results["meta"].get("ganesha_note")
    if note:
        print(f"ganesha: {note}", flush=True)

    set_child_subreaper()

    def on_sigterm(signum, frame):  # make `kill` of the harness run the finally blocks
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="netswap-nfs-bench-", dir=base))
    rpcbind = Rpcbind()
    started = time.monotonic()
    status = 0
    try:
        if "ganesha" in servers:
            try:
                results["meta"]["rpcbind"] = rpcbind.ensure()
            except BenchError as exc:
                note = results["meta"]["ganesha_note"] = f"not measured: {exc}"
                print(f"ganesha: {note}", flush=True)
                servers.remove("ganesha")
        if not servers:
            raise BenchError("no server left to measure")
        print(f"servers {', '.join(servers)}; {args.size_1m // MiB} MiB at 1 MiB, "
              f"{args.size_4k // MiB} MiB at 4 KiB; {args.repeats} repeat(s); in {tmp}",
              flush=True)
        for repeat in range(args.repeats):
            shift = repeat % len(servers)
            for name in servers[shift:] + servers[:shift]:  # rotate: drift hits all alike
                run_server(args, name, repeat, tmp, results)
            if repeat == 0 and "ganesha" in servers:
                first = [r for r in results["runs"] if r["server"] == "ganesha"][0]
                if first["errors"] and not first["phases"]:  # it does not run here: say why
                    note = results["meta"]["ganesha_note"] = (
                        "not measured: it did not run here (" + first["errors"][0][:300] + ")")
                    print(f"ganesha: {note}", flush=True)
                    servers.remove("ganesha")
                    # "Beside ganesha where it runs": not running here is the note above,
                    # not a failed run (exit status 1).
                    results["runs"].remove(first)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped, reporting what finished", file=sys.stderr)
        status = 130
    except BenchError as exc:
        print(f"nfs_bench: {exc}", file=sys.stderr)
        status = 2
    finally:
        rpcbind.stop()
        results["meta"]["elapsed_s"] = time.monotonic() - started
        reap_orphans()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    shown = [s for s in args.server_list if any(r["server"] == s for r in results["runs"])]
    summary = summarize(results, shown)
    results["summary"] = summary
    if results["runs"]:
        print_report(results, summary, shown)
        print(f"\n(total {results['meta']['elapsed_s']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"raw results: {args.json}")
    if status == 0 and any(r["errors"] for r in results["runs"]):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
