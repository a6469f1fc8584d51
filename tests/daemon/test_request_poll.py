"""The NBD C loop polls for a client's next request before it sleeps (cext/nbdfast.c,
recv_request), but only for a client that sends one request at a time, each soon after the
last reply. What the poll buys is measured in bench/fio_matrix.py (the QD1 rows), never
asserted here; these tests check who polls and who does not, on
netswap_c_loop_request_polls_total."""

from __future__ import annotations

import subprocess
import time

from netswap.nbd import constants as C
from support.metrics import metric
from support.nbd_raw import recv_exact, request, request_header, simple_reply, transmission
from support.wait import wait_until

KiB = 1 << 10
POLLS = "netswap_c_loop_request_polls_total"


def polls(daemon) -> int:
    return sum(metric(daemon, POLLS, outcome=outcome) for outcome in ("won", "lost"))


def test_fio_at_queue_depth_one_has_its_requests_polled_for(daemon, tmp_path):
    """The real client: fio's nbd engine (libnbd), one request at a time, each sent as soon
    as the last reply is in."""
    fio = subprocess.Popen(
        ["fio", "--name=qd1", "--ioengine=nbd", f"--uri={daemon.uri('disk')}",
         "--rw=randread", "--bs=4k", "--iodepth=1", "--size=16M", "--time_based",
         "--runtime=30", "--output-format=terse"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        wait_until(lambda: metric(daemon, POLLS, outcome="won") >= 100, timeout=25,
                   what="the loop serving fio polling for its requests")
    finally:
        fio.terminate()
        fio.wait()


def test_a_client_with_gaps_or_queues_never_makes_the_loop_poll(daemon):
    sock = transmission(daemon)
    try:
        data = bytes(range(256)) * 16
        for cookie in range(20):  # one at a time, but 5 ms apart: a swap node's pace
            request(sock, C.CMD_WRITE, cookie * 4 * KiB, 4 * KiB, cookie=cookie, payload=data)
            assert simple_reply(sock) == (0, cookie)
            time.sleep(0.005)
        for batch in range(10):  # queues of 16: the loop never waits after one request
            sock.sendall(b"".join(request_header(C.CMD_READ, cookie * 4 * KiB, 4 * KiB, cookie)
                                  for cookie in range(16)))
            for _ in range(16):
                error, cookie = simple_reply(sock)
                assert error == 0
                assert recv_exact(sock, 4 * KiB) == data
        assert metric(daemon, "netswap_requests_total", export="disk", op="read") == 160
        assert polls(daemon) == 0
    finally:
        sock.close()
