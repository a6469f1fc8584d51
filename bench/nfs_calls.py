#!/usr/bin/env python3
"""CPU time of one NFSv3 scratch READ and WRITE in netswapd's procedure code, no network.

nfs_bench.py measures the whole path beside nfs-ganesha, but on a shared machine its 4 KiB
rows move with everything else that runs (scheduling waits, not work). This measures only
what `Nfs3Program.execute` costs for a 4 KiB call on a scratch file (handle resolve, the
file's checks, pread/pwrite into or from a pool buffer, the reply's encoding): CPU time of
this process (time.process_time: user and kernel, syscalls included) over `--calls` calls,
the best of `--rounds`, which is what a change to that code moves.

With `--live` it starts a netswapd instead (tests/support's daemon and NFS client, loopback)
and counts the daemon's own CPU time (utime + stime from /proc) over 4,000 WRITEs then 4,000
READs of one scratch file, best of 3: the whole server side of a call, network included.

    python3 bench/nfs_calls.py                   # 20,000 calls, best of 5 rounds
    python3 bench/nfs_calls.py --live            # through a live daemon
    PYTHONPATH=/other/checkout/daemon python3 bench/nfs_calls.py   # another version

The file lives in a temp dir under --dir (default /var/tmp: a disk file system, where
scratch files get inode generations; tmpfs keeps none). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from netswap.nfs import codec
from netswap.nfs.exports import NfsExports
from netswap.nfs.nfs3 import Nfs3Program
from netswap.reserve.pool import Pool
from netswap.rpc import xdr

SIZE = 4096
FILE_PAGES = 4096  # a 16 MiB file, written and read in 4 KiB steps, round and round


class _NoCounters:
    def inc(self, *args, **kwargs) -> None:
        pass


def measure(program: Nfs3Program, proc: int, make_args, calls: int, rounds: int) -> float:
    """Best per-call CPU time in µs over `rounds` runs of `calls` calls."""
    best = None
    for _ in range(rounds):
        started = time.process_time()
        for i in range(calls):
            release: list = []
            program.execute(proc, make_args(i), "192.0.2.7", release)
            for part in release:
                part.release()
        per_call = (time.process_time() - started) / calls * 1e6
        best = per_call if best is None else min(best, per_call)
    return best


def daemon_cpu(pid: int) -> float:
    """Seconds of CPU (user + system) process `pid` has used."""
    with open(f"/proc/{pid}/stat") as stat_file:
        fields = stat_file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_live(workdir: Path, calls: int = 4000, rounds: int = 3) -> tuple[float, float]:
    """(WRITE, READ) daemon µs CPU per 4 KiB call through a live netswapd, best of rounds."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from support.daemon import stop_clean
    from support.nfs import NFS3_OK, STRANGER, UNSTABLE, Nfs, create, start_nfs_daemon
    daemon = start_nfs_daemon(workdir)
    try:
        client = Nfs(daemon, STRANGER)
        status, handle = create(client, client.root("/scratch"), b"calls.bin")
        assert status == NFS3_OK
        page = bytes(SIZE)
        results = []
        for call in (lambda i: client.write(handle, (i % 1024) * SIZE, page, UNSTABLE),
                     lambda i: client.read(handle, (i % 1024) * SIZE, SIZE)):
            best = None
            for _ in range(rounds):
                before = daemon_cpu(daemon.process.pid)
                for i in range(calls):
                    assert call(i)[0] == NFS3_OK
                per_call = (daemon_cpu(daemon.process.pid) - before) / calls * 1e6
                best = per_call if best is None else min(best, per_call)
            results.append(best)
        client.close()
    finally:
        stop_clean(daemon)
    return results[0], results[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--live", action="store_true", help="through a live netswapd (see above)")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="netswap-nfs-calls-", dir=args.dir))
    if args.live:
        try:
            write, read = measure_live(workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print("| call (live daemon) | daemon µs CPU per call |\n|---|---:|")
        print(f"| 4 KiB WRITE (UNSTABLE) | {write:.0f} |\n| 4 KiB READ | {read:.0f} |")
        return
    pool = Pool(64 << 20)
    try:
        nfs = SimpleNamespace(swap_export="", scratch_export="/scratch",
                              scratch_directory=workdir / "scratch",
                              node_port_allowed=lambda port: True)
        exports = NfsExports(SimpleNamespace(nfs=nfs, swap=SimpleNamespace(
            node_of=lambda address: None)), workdir)
        try:
            program = Nfs3Program(exports, pool, _NoCounters(), 65536)
            root = exports.root_handle("/scratch")
            parts = program.execute(codec.CREATE, codec.CreateArgs(
                root, b"calls.bin", codec.UNCHECKED, codec.Sattr3(), None), "192.0.2.7", [])
            reply = xdr.Unpacker(b"".join(bytes(part) for part in parts))
            assert reply.uint() == 0 and reply.bool()
            handle = bytes(reply.opaque(64))
            data = memoryview(bytes(SIZE))
            write = measure(program, codec.WRITE, lambda i: codec.WriteArgs(
                handle, (i % FILE_PAGES) * SIZE, SIZE, codec.UNSTABLE, data),
                args.calls, args.rounds)
            read = measure(program, codec.READ, lambda i: codec.ReadArgs(
                handle, (i % FILE_PAGES) * SIZE, SIZE), args.calls, args.rounds)
        finally:
            exports.close()
    finally:
        pool.close()
        shutil.rmtree(workdir, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    print(f"netswap at {codec.__file__.rsplit('/nfs/', 1)[0]} ({commit or 'no git'}), "
          f"{args.calls} calls, best of {args.rounds}\n")
    print("| call | µs CPU per call |\n|---|---:|")
    print(f"| 4 KiB WRITE (UNSTABLE) | {write:.1f} |\n| 4 KiB READ | {read:.1f} |")


if __name__ == "__main__":
    main()
