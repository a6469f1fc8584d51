"""End to end: a real kernel swaps through netswapd.

This kernel has no nbd driver, so the node side is nbdfuse (exposing the per-node export as
a file) + a loop device + mkswap + swapon. A workload in a child memory cgroup, limited to a
quarter of its data, is forced to swap through that device; it then checks every page it
wrote. Everything set up is undone in reverse order, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

MiB = 1 << 20
DATA = 256 * MiB
LIMIT = DATA // 4

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
    pytest.fail("no cgroup v1 memory controller for this process")


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
                pytest.fail(f"nbdfuse did not come up: {proc.stdout.read() if proc.stdout else ''}")
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


def test_kernel_swaps_through_netswapd(tmp_path):
    from conftest import start_daemon

    daemon = start_daemon(tmp_path, swap_size="512MiB")
    try:
        with contextlib.ExitStack() as stack:
            file = stack.enter_context(nbdfuse_file(daemon.uri("swap/testnode"), tmp_path / "mnt"))
            device = stack.enter_context(loop_device(file))
            stack.enter_context(swap_on(device))
            group = stack.enter_context(memory_cgroup(LIMIT))

            workload = subprocess.Popen(
                [sys.executable, "-c", WORKLOAD, str(DATA)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
            )
            try:
                assert workload.stdout.readline().strip() == "written"
                used_kib = swap_used_kib(device)
                stats = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
                # The group holds at most LIMIT in RAM, so most of DATA is on the swap device.
                assert used_kib * 1024 >= DATA - LIMIT - 32 * MiB, (used_kib, stats)
                workload.stdin.write("\n")
                workload.stdin.flush()
                assert workload.stdout.readline().strip() == "bad pages: 0"
                assert workload.wait(300) == 0
            finally:
                if workload.poll() is None:
                    workload.kill()
                    workload.wait()
        # The pages really went through netswapd to the node's swap file.
        image = daemon.state_dir / "swap" / "testnode.img"
        assert image.stat().st_blocks * 512 >= DATA - LIMIT - 32 * MiB
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()
    assert "Traceback" not in daemon.log()
