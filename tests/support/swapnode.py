"""The node side of swap over NBD (and NFS) on this machine, for tests and benchmarks.

This kernel has no nbd driver, so a node is emulated with nbdfuse (exposing an NBD export as
a file) + a loop device + mkswap + swapon, and a workload in a child memory cgroup limited
below its data, which the kernel must then swap through that device. Every context manager
undoes what it set up, also when the body fails.

Nor has it an NFS client: a swap file on an NFS server is opened by qemu-nbd with QEMU's NFS
driver (libnfs; it finds the ports through the portmapper, as a mount without port= does)
and served as NBD on a Unix socket, which the same nbdfuse + loop + swapon then swap to.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

WORKLOAD = textwrap.dedent(
    """
    import hashlib, mmap, sys
    size = int(sys.argv[1])
    page = 4096
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def content(index):
        # Distinct, incompressible-enough bytes per page, recomputable for the check.
        seed = hashlib.sha256(index.to_bytes(8, "little")).digest()
        return seed * (page // len(seed))

    for index in range(size // page):
        area[index * page:(index + 1) * page] = content(index)
    print("written", flush=True)
    sys.stdin.readline()
    bad = sum(area[i * page:(i + 1) * page] != content(i) for i in range(size // page))
    print(f"bad pages: {bad}", flush=True)
    sys.exit(1 if bad else 0)
    """
)


def own_memory_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    raise RuntimeError("no cgroup v1 memory controller for this process")


def swap_used_kib(device: str) -> int:
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        fields = line.split()
        if os.path.realpath(fields[0]) == os.path.realpath(device):
            return int(fields[3])
    return -1


def run(*argv, **kwargs):
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120, **kwargs)


@contextlib.contextmanager
def nbdfuse_file(uri: str, mountpoint: Path):
    mountpoint.mkdir()
    pidfile = mountpoint.parent / "nbdfuse.pid"
    proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(mountpoint / "swap"), uri],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbdfuse did not come up: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.05)
        yield mountpoint / "swap"
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def qemu_nbd_nfs(url: str, socket_path: Path, prefix: tuple[str, ...] = ()):
    """qemu-nbd serving the file at `url` (nfs://HOST/EXPORT/FILE) as NBD on a Unix socket;
    yields the NBD URI. `prefix` runs it elsewhere (ip netns exec NS)."""
    process = subprocess.Popen([*prefix, "qemu-nbd", "-f", "raw", "--cache=none",
                                "-k", str(socket_path), url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-nbd did not come up on {url}: "
                                   f"{process.stderr.read() if process.poll() is not None else ''}")
            time.sleep(0.05)
        yield f"nbd+unix:///?socket={socket_path}"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def loop_device(path: Path):
    device = run("losetup", "-f", "--show", str(path)).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


@contextlib.contextmanager
def swap_on(device: str):
    run("mkswap", device)
    # Highest priority: if the machine has other swap, this device is used first.
    run("swapon", "-p", "32767", device)
    try:
        yield
    finally:
        subprocess.run(["swapoff", device], capture_output=True, timeout=600)


@contextlib.contextmanager
def workload_in(group: Path, size: int):
    """WORKLOAD over `size` bytes, started inside memory cgroup `group`: it prints "written"
    once every page is written, checks them all after a line on its stdin, and prints
    "bad pages: N". Killed on the way out if it is still running."""
    workload = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD, str(size)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
    try:
        yield workload
    finally:
        if workload.poll() is None:
            workload.kill()
            workload.wait()


@contextlib.contextmanager
def memory_cgroup(limit: int):
    group = own_memory_cgroup() / f"netswap-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        (group / "memory.swappiness").write_text("100")
        yield group
    finally:
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)  # the workload's pages are still being uncharged
