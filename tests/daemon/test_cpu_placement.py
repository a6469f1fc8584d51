"""The NBD C loop's thread placement (nbd.follow_receiving_cpu, cext/placement.h).

A client that sends one request at a time gets its loop's thread held on the CPU that
receives its packets (SO_INCOMING_CPU: on loopback the sender's own CPU, so the test pins
its client thread); a queue of requests gives the thread every CPU back; a crowded CPU
too. What the placement buys is measured in bench/fio_matrix.py (the "client on CPU 0"
rows), never asserted here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from netswap.nbd import constants as C
from support.daemon import start_daemon, stop_clean
from support.metrics import metric
from support.nbd_raw import request, request_header, simple_reply, transmission
from support.wait import wait_until

KiB = 1 << 10
PLACEMENTS = "netswap_c_loop_placements_total"
CPUS = sorted(os.sched_getaffinity(0))
CLIENT_CPU = CPUS[-1]

pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="placement needs two CPUs to choose from")


def held_threads(pid: int) -> dict[int, str]:
    """The daemon's threads allowed fewer CPUs than the test may use: {tid: their list}."""
    held = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue  # a thread that just ended
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                allowed = line.split(":", 1)[1].strip()
                if allowed != cpu_list(CPUS):
                    held[int(task.name)] = allowed
    return held


def cpu_list(cpus) -> str:
    """The kernel's Cpus_allowed_list form of a set of CPUs (ranges joined)."""
    cpus, parts, start = sorted(cpus), [], None
    for index, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if index + 1 == len(cpus) or cpus[index + 1] != cpu + 1:
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(parts)


@contextmanager
def on_cpu(cpu: int):
    """Run the calling thread (the test's client) on `cpu` only."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def one_at_a_time(sock, count: int) -> None:
    for cookie in range(count):
        request(sock, C.CMD_READ, (cookie % 64) * 4 * KiB, 4 * KiB, cookie=cookie)
        error, got = simple_reply(sock)
        assert (error, got) == (0, cookie)
        sock.recv(4 * KiB, 0x100)  # MSG_WAITALL: the data


@pytest.fixture
def daemon(tmp_path, request):
    running = start_daemon(tmp_path, nbd_options=getattr(request, "param",
                                                          "follow_receiving_cpu = true"))
    yield running
    stop_clean(running)


def test_a_one_at_a_time_client_gets_its_loop_on_its_cpu_and_a_queue_gives_it_back(daemon):
    sock = transmission(daemon)
    try:
        with on_cpu(CLIENT_CPU):
            one_at_a_time(sock, 64)
            held = held_threads(daemon.process.pid)
            print(f"one request at a time from CPU {CLIENT_CPU}: held threads {held}")
            assert list(held.values()) == [str(CLIENT_CPU)], held
            assert metric(daemon, PLACEMENTS, event="moved") >= 1
            # 32 requests in one send: a queue, so parallelism beats locality.
            sock.sendall(b"".join(request_header(C.CMD_READ, cookie * 4 * KiB, 4 * KiB, cookie)
                                  for cookie in range(32)))
            for _ in range(32):
                error, _cookie = simple_reply(sock)
                assert error == 0
                sock.recv(4 * KiB, 0x100)
            one_at_a_time(sock, 1)  # the loop waits again: it looks at what it served
            assert held_threads(daemon.process.pid) == {}
            assert metric(daemon, PLACEMENTS, event="released") >= 1
    finally:
        sock.close()


def test_fio_at_queue_depth_one_on_one_cpu_gets_its_loop_there(daemon, tmp_path):
    """The real client: fio's nbd engine (libnbd), iodepth 1, pinned with taskset."""
    fio = subprocess.Popen(
        ["taskset", "-c", str(CLIENT_CPU), "fio", "--name=qd1", "--ioengine=nbd",
         f"--uri={daemon.uri('disk')}", "--rw=randread", "--bs=4k", "--iodepth=1",
         "--size=16M", "--time_based", "--runtime=30", "--output-format=terse"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        wait_until(lambda: list(held_threads(daemon.process.pid).values()) == [str(CLIENT_CPU)],
                   timeout=20, what=f"the loop serving fio held on CPU {CLIENT_CPU}")
    finally:
        fio.terminate()
        fio.wait()
    wait_until(lambda: held_threads(daemon.process.pid) == {}, timeout=10,
               what="the connection's thread gone with it")


@pytest.mark.parametrize("daemon", ["follow_receiving_cpu = false"], indirect=True)
def test_placement_can_be_turned_off(daemon):
    sock = transmission(daemon)
    try:
        with on_cpu(CLIENT_CPU):
            one_at_a_time(sock, 64)
        assert held_threads(daemon.process.pid) == {}
        assert metric(daemon, PLACEMENTS, event="moved") == 0
    finally:
        sock.close()


def test_a_crowded_cpu_gives_the_loop_back(daemon):
    """Two busy loops on the client's CPU: the loop held there waits behind them longer
    than a wake-up elsewhere costs, so it lets go (and counts it)."""
    hog = "while True: pass"
    hogs = [subprocess.Popen(["taskset", "-c", str(CLIENT_CPU), sys.executable, "-c", hog])
            for _ in range(2)]
    sock = transmission(daemon)
    try:
        with on_cpu(CLIENT_CPU):
            wait_until(lambda: one_at_a_time(sock, 50) or
                       metric(daemon, PLACEMENTS, event="crowded") >= 1,
                       timeout=60, what="the loop let go of a crowded CPU")
        assert metric(daemon, PLACEMENTS, event="moved") >= 1
    finally:
        sock.close()
        for process in hogs:
            process.kill()
            process.wait()
