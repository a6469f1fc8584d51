"""The C request loop (cext/nbdfast.c, nbd/fastloop.py) against a real netswapd.

Plain READs and WRITEs on file exports are served in C; everything else is handed to the
Python path, as are requests the C loop began but cannot finish (a reply the socket took
only part of, a failed write). These tests drive each hand-over on the wire and check that
the client sees exactly what the Python path gives (c_loop = false is the reference), that
the statistics count what C served, and that every pool byte comes back.
"""

from __future__ import annotations

import os
import time
import random
import socket
import struct
import subprocess
import threading

import pytest

from netswap.nbd import constants as C
from support.daemon import start_daemon
from support.metrics import metric
from support.nbd_raw import recv_exact, request, simple_reply, transmission
from support.wait import wait_until

KiB, MiB = 1 << 10, 1 << 20
DISK = 64 * MiB


@pytest.fixture(params=[True, False], ids=["c_loop", "python"])
def either(request, tmp_path):
    daemon = start_daemon(tmp_path, nbd_options=f"c_loop = {str(request.param).lower()}")
    daemon.c_loop = request.param
    yield daemon
    code = daemon.stop()
    log = daemon.log()
    assert "Traceback" not in log, log
    assert code == 0, log


@pytest.fixture
def daemon(tmp_path):
    running = start_daemon(tmp_path)
    yield running
    code = running.stop()
    assert "Traceback" not in running.log(), running.log()
    assert code == 0, running.log()


def test_plain_requests_are_served_in_c_and_counted_while_the_connection_lives(daemon):
    sock = transmission(daemon)
    data = os.urandom(4 * KiB)
    for cookie in range(50):  # pipelined: the loop takes several headers per recv
        request(sock, C.CMD_WRITE, cookie * 4 * KiB, len(data), cookie=cookie, payload=data)
    for cookie in range(50, 100):
        request(sock, C.CMD_READ, (cookie - 50) * 4 * KiB, 4 * KiB, cookie=cookie)
    replies = {}
    for _ in range(100):
        error, cookie = simple_reply(sock)
        replies[cookie] = error
        if cookie >= 50:
            assert recv_exact(sock, 4 * KiB) == data
    assert replies == {cookie: 0 for cookie in range(100)}
    # Counted without the connection ending (a scrape reads the C loop's statistics live),
    # and no request needed Python.
    assert metric(daemon, "netswap_requests_total", export="disk", op="write") == 50
    assert metric(daemon, "netswap_requests_total", export="disk", op="read") == 50
    assert metric(daemon, "netswap_request_bytes_total", export="disk", op="read") == 200 * KiB
    assert metric(daemon, "netswap_c_loop_handoffs_total", reason="python") == 0

    request(sock, C.CMD_FLUSH, cookie=500)  # Python's: FLUSH is not the loop's
    assert simple_reply(sock) == (0, 500)
    request(sock, C.CMD_READ, 0, 4 * KiB, cookie=501)  # and back in C
    assert simple_reply(sock) == (0, 501)
    assert recv_exact(sock, 4 * KiB) == data
    assert metric(daemon, "netswap_c_loop_handoffs_total", reason="python") == 1
    assert metric(daemon, "netswap_requests_total", export="disk", op="flush") == 1
    sock.close()
    # A closed connection's statistics are folded into the totals, not lost.
    wait_until(lambda: metric(daemon, "netswap_connections") == 0, what="the connection closed")
    assert metric(daemon, "netswap_requests_total", export="disk", op="read") == 51
    assert metric(daemon, "netswap_requests_total", export="disk", op="write") == 50


def _mixed_stream(seed: int) -> list[tuple]:
    """Requests of every kind the two paths divide between them, pipelined."""
    rng = random.Random(seed)
    stream = []
    for cookie in range(400):
        offset = rng.randrange(0, DISK // (4 * KiB)) * 4 * KiB
        length = rng.choice([512, 4 * KiB, 64 * KiB, 1 * MiB])
        kind = rng.choices(
            ["write", "read", "flush", "fua_write", "trim", "zeroes", "past_end", "unknown",
             "zero_length", "df_read"],
            weights=[30, 30, 3, 5, 3, 3, 2, 1, 1, 2])[0]
        if kind in ("write", "fua_write"):
            payload = rng.randbytes(length)
            flags = C.CMD_FLAG_FUA if kind == "fua_write" else 0
            stream.append((C.CMD_WRITE, flags, cookie, offset, length, payload))
        elif kind == "read":
            stream.append((C.CMD_READ, 0, cookie, offset, length, b""))
        elif kind == "df_read":  # DF without structured replies: EINVAL
            stream.append((C.CMD_READ, C.CMD_FLAG_DF, cookie, offset, length, b""))
        elif kind == "flush":
            stream.append((C.CMD_FLUSH, 0, cookie, 0, 0, b""))
        elif kind == "trim":
            stream.append((C.CMD_TRIM, 0, cookie, offset, length, b""))
        elif kind == "zeroes":
            stream.append((C.CMD_WRITE_ZEROES, 0, cookie, offset, length, b""))
        elif kind == "past_end":
            command = rng.choice([C.CMD_READ, C.CMD_WRITE])
            payload = rng.randbytes(length + 512) if command == C.CMD_WRITE else b""
            stream.append((command, 0, cookie, DISK - 512, length + 512, payload))
        elif kind == "unknown":
            stream.append((42, 0, cookie, 0, 0, b""))
        else:
            stream.append((C.CMD_READ, 0, cookie, offset, 0, b""))
    return stream


def _run_sequentially(daemon, stream) -> dict:
    """Each request's reply (error, READ data), one request at a time so that the result
    does not depend on how the server orders concurrent ones."""
    sock = transmission(daemon)
    results = {}
    for command, flags, cookie, offset, length, payload in stream:
        request(sock, command, offset, length, cookie=cookie, flags=flags, payload=payload)
        error, got = simple_reply(sock)
        assert got == cookie
        data = recv_exact(sock, length) if command == C.CMD_READ and not error else b""
        results[cookie] = (error, data)
    request(sock, C.CMD_DISC)
    sock.close()
    return results


def test_mixed_stream_gets_the_same_replies_on_both_paths(tmp_path):
    """The reference is the Python path (c_loop = false) run on the same stream."""
    stream = _mixed_stream(seed=6)
    results = {}
    for c_loop in (True, False):
        (tmp_path / str(c_loop)).mkdir()
        daemon = start_daemon(tmp_path / str(c_loop), nbd_options=f"c_loop = {str(c_loop).lower()}")
        try:
            results[c_loop] = _run_sequentially(daemon, stream)
            if c_loop:
                assert metric(daemon, "netswap_c_loop_handoffs_total", reason="python") > 0
            else:
                assert metric(daemon, "netswap_c_loop_handoffs_total", reason="python") == 0
        finally:
            assert daemon.stop() == 0
        assert "Traceback" not in daemon.log()
    assert results[True] == results[False]
    errors = {error for error, _ in results[True].values()}
    assert {0, C.EINVAL, C.ENOSPC} <= errors  # the stream did reach the refusals


def test_pipelined_mixed_stream_keeps_every_reply(either):
    """All 400 requests in flight at once (max_inflight is 128: the rest wait in TCP):
    every cookie answered once, WRITEs before a READ of the same range visible to it only
    as the spec allows, pool bytes all back."""
    free_before = metric(either, "netswap_pool_free_bytes")
    stream = _mixed_stream(seed=7)
    sock = transmission(either)
    sent = b"".join(struct.pack(">IHHQQI", C.REQUEST_MAGIC, flags, command, cookie, offset, length)
                    + payload for command, flags, cookie, offset, length, payload in stream)
    lengths = {cookie: length for command, _, cookie, _, length, _ in stream
               if command == C.CMD_READ}
    sender = threading.Thread(target=sock.sendall, args=(sent,))
    sender.start()
    answered = {}
    for _ in stream:
        error, cookie = simple_reply(sock)
        assert cookie not in answered
        if cookie in lengths and not error:
            recv_exact(sock, lengths[cookie])
        answered[cookie] = error
    sender.join()
    assert set(answered) == {cookie for _, _, cookie, _, _, _ in stream}
    sock.close()
    wait_until(lambda: metric(either, "netswap_pool_free_bytes") == free_before,
               what="every pool byte free again")


def test_a_reply_the_socket_takes_only_in_part_is_finished_by_the_sender(daemon):
    """READ replies larger than the socket buffers: the C loop's sendmsg takes part of one,
    hands it over, and the Python sender finishes it once the client reads."""
    free_before = metric(daemon, "netswap_pool_free_bytes")
    sock = transmission(daemon)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    pattern = os.urandom(1 * MiB)
    request(sock, C.CMD_WRITE, 0, len(pattern), cookie=1, payload=pattern)
    assert simple_reply(sock) == (0, 1)
    for cookie in range(2, 18):
        request(sock, C.CMD_READ, 0, len(pattern), cookie=cookie)
    # The loop fills the socket and hands the rest over.
    wait_until(lambda: metric(daemon, "netswap_c_loop_handoffs_total", reason="queued_reply") >= 1,
               what="a reply handed over to the sender")
    answered = set()
    for _ in range(2, 18):  # whole replies, never interleaved, in whatever order they finished
        error, cookie = simple_reply(sock)
        assert error == 0 and cookie not in answered
        answered.add(cookie)
        assert recv_exact(sock, len(pattern)) == pattern
    assert answered == set(range(2, 18))
    request(sock, C.CMD_READ, 4096, 4096, cookie=99)  # the loop takes over again
    assert simple_reply(sock) == (0, 99)
    assert recv_exact(sock, 4096) == pattern[4096:8192]
    sock.close()
    wait_until(lambda: metric(daemon, "netswap_pool_free_bytes") == free_before,
               what="every pool byte free again")


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB file system holding a 16 MiB sparse file: writes into it fail with ENOSPC."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        with open(mount / "full.img", "wb") as image:
            image.truncate(16 * MiB)
        yield mount / "full.img"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_write_that_fails_in_c_gets_the_python_paths_error_reply(tmp_path, tiny_tmpfs):
    daemon = start_daemon(tmp_path, exports=f"""
        [[exports]]
        name = "full"
        backend = "file"
        path = "{tiny_tmpfs}"
        size = "16MiB"
        """)
    try:
        sock = transmission(daemon, b"full")
        block = os.urandom(64 * KiB)
        errors = []
        for cookie in range(64):  # 4 MiB into a 1 MiB file system
            request(sock, C.CMD_WRITE, cookie * len(block), len(block), cookie=cookie, payload=block)
            error, got = simple_reply(sock)
            assert got == cookie
            errors.append(error)
        assert errors[0] == 0 and errors[-1] == C.ENOSPC
        assert metric(daemon, "netswap_c_loop_handoffs_total", reason="write_error") >= 1
        assert metric(daemon, "netswap_backend_errors_total", request="write:28") >= 1
        request(sock, C.CMD_READ, 0, len(block), cookie=100)  # the connection carries on
        assert simple_reply(sock) == (0, 100)
        assert recv_exact(sock, len(block)) == block
        sock.close()
    finally:
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()


def test_a_lone_read_of_data_not_in_the_page_cache_is_read_in_c(daemon):
    """RWF_NOWAIT finds the data on disk only; with no other request queued the loop reads
    it itself (a worker would only add a hand-over to a page fault that waits anyway)."""
    sock = transmission(daemon)
    data = os.urandom(64 * KiB)
    request(sock, C.CMD_WRITE, 1 * MiB, len(data), cookie=1, payload=data)
    assert simple_reply(sock) == (0, 1)
    request(sock, C.CMD_FLUSH, cookie=2)  # clean pages, so that the kernel may drop them
    assert simple_reply(sock) == (0, 2)
    image = daemon.state_dir / "disk.img"
    fd = os.open(image, os.O_RDONLY)
    try:
        # DONTNEED is advice: a page still under writeback or being read in stays. Asked
        # until RWF_NOWAIT says the data is on disk only; a kernel that keeps it cached
        # whatever we ask cannot show what this test is about.
        for _ in range(50):
            os.fsync(fd)
            os.posix_fadvise(fd, 1 * MiB, len(data), os.POSIX_FADV_DONTNEED)
            try:
                os.preadv(fd, [bytearray(len(data))], 1 * MiB, os.RWF_NOWAIT)
            except BlockingIOError:
                break  # not in the page cache any more
            time.sleep(0.1)
        else:
            pytest.skip("the kernel kept the written pages in its page cache")
    finally:
        os.close(fd)
    handoffs = metric(daemon, "netswap_c_loop_handoffs_total", reason="python")
    request(sock, C.CMD_READ, 1 * MiB, len(data), cookie=3)
    assert simple_reply(sock) == (0, 3)
    assert recv_exact(sock, len(data)) == data
    assert metric(daemon, "netswap_c_loop_handoffs_total", reason="python") == handoffs
    sock.close()
