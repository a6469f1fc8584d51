"""The C request loop (cext/nbdfast.c, nbd/fastloop.py) against a real netswapd.

Plain READs and WRITEs on file exports are served in C; everything else is handed to the
Python path, as are requests the C loop began but cannot finish (a reply the socket took
only part of, a failed write). These tests drive each hand-over on the wire and check that
the client sees exactly what the Python path gives (c_loop = false is the reference), that
the statistics count what C served, and that every pool byte comes back.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import threading
import time

import pytest

from netswap.nbd import constants as C
from support.daemon import start_daemon, stop_clean
from support.metrics import metric
from support.nbd_raw import (block_status, recv_exact, request, simple_reply,
                             structured_reply, structured_transmission, transmission)
from support.wait import wait_until

KiB, MiB = 1 << 10, 1 << 20
DISK = 64 * MiB


@pytest.fixture(params=[True, False], ids=["c_loop", "python"])
def either(request, tmp_path):
    daemon = start_daemon(tmp_path, nbd_options=f"c_loop = {str(request.param).lower()}")
    daemon.c_loop = request.param
    yield daemon
    stop_clean(daemon)


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

    # A plain FLUSH (and one with FUA, which means nothing on it) is the loop's too: one
    # sync for the 50 writes, none for the second FLUSH, nothing handed to Python.
    syncs = metric(daemon, "netswap_export_flush_syncs_total", export="disk")
    request(sock, C.CMD_FLUSH, cookie=500)
    assert simple_reply(sock) == (0, 500)
    request(sock, C.CMD_FLUSH, cookie=501, flags=C.CMD_FLAG_FUA)
    assert simple_reply(sock) == (0, 501)
    assert metric(daemon, "netswap_c_loop_handoffs_total", reason="python") == 0
    assert metric(daemon, "netswap_requests_total", export="disk", op="flush") == 2
    assert metric(daemon, "netswap_export_flush_syncs_total", export="disk") == syncs + 1
    request(sock, C.CMD_FLUSH, cookie=502, flags=C.CMD_FLAG_DF)  # Python's: it refuses the flag
    assert simple_reply(sock) == (C.EINVAL, 502)
    request(sock, C.CMD_READ, 0, 4 * KiB, cookie=503)  # and back in C
    assert simple_reply(sock) == (0, 503)
    assert recv_exact(sock, 4 * KiB) == data
    assert metric(daemon, "netswap_c_loop_handoffs_total", reason="python") == 1
    assert metric(daemon, "netswap_requests_total", export="disk", op="flush") == 3
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
             "zero_length", "df_read", "fast_zeroes", "block_status"],
            weights=[30, 30, 3, 5, 3, 3, 2, 1, 1, 2, 2, 2])[0]
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
        elif kind == "fast_zeroes":
            flags = C.CMD_FLAG_FAST_ZERO | rng.choice([0, C.CMD_FLAG_NO_HOLE])
            stream.append((C.CMD_WRITE_ZEROES, flags, cookie, offset, length, b""))
        elif kind == "block_status":  # simple replies, so no context: EINVAL
            stream.append((C.CMD_BLOCK_STATUS, rng.choice([0, C.CMD_FLAG_REQ_ONE]), cookie,
                           offset, length, b""))
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


def test_block_status_and_fast_zero_are_handed_to_python(daemon):
    """The loop serves plain READ and WRITE only: BLOCK_STATUS and WRITE_ZEROES with
    FAST_ZERO (no payload, flags the loop does not take) go to Python, one hand-over each,
    whether they come alone or pipelined between requests the loop serves, and the loop
    takes over again after them."""
    hole, data = C.STATE_HOLE | C.STATE_ZERO, 0
    sock, contexts = structured_transmission(daemon, b"disk")
    sock.settimeout(30)  # a request the loop took for a WRITE would wait for its payload
    ident = contexts["base:allocation"]
    handoffs = 0

    def handed_over(count=1):
        nonlocal handoffs
        handoffs += count
        return metric(daemon, "netswap_c_loop_handoffs_total", reason="python") == handoffs

    def read(offset, length, cookie):
        flags, rtype, got, payload = structured_reply(sock)
        assert (flags & C.REPLY_FLAG_DONE, rtype, got) == (C.REPLY_FLAG_DONE,
                                                          C.REPLY_TYPE_OFFSET_DATA, cookie)
        assert struct.unpack_from(">Q", payload)[0] == offset and len(payload) == 8 + length
        return payload[8:]

    def done(cookie):
        assert structured_reply(sock)[:3] == (C.REPLY_FLAG_DONE, C.REPLY_TYPE_NONE, cookie)

    blob = os.urandom(MiB)
    request(sock, C.CMD_WRITE, MiB, MiB, cookie=1, payload=blob)  # in C
    done(1)
    assert handed_over(0)
    assert block_status(sock, 0, DISK, cookie=2) == (
        ident, [(MiB, hole), (MiB, data), (DISK - 2 * MiB, hole)])
    assert handed_over()
    request(sock, C.CMD_READ, MiB, 4 * KiB, cookie=3)  # in C again
    assert read(MiB, 4 * KiB, 3) == blob[: 4 * KiB]
    assert handed_over(0)
    request(sock, C.CMD_WRITE_ZEROES, MiB + 256 * KiB, 256 * KiB, cookie=4,
            flags=C.CMD_FLAG_FAST_ZERO)  # a punched hole: fast on any file system here
    done(4)
    assert handed_over()
    assert block_status(sock, MiB + 256 * KiB, 8 * MiB, cookie=5, flags=C.CMD_FLAG_REQ_ONE) == (
        ident, [(256 * KiB, hole)])
    assert handed_over()

    # Pipelined: the loop's window holds the next headers when it meets one of these; it
    # must hand it over without taking it (or anything after it) for a READ or a WRITE.
    # Replies come in completion order, and no two requests after the WRITE overlap.
    blob2 = os.urandom(64 * KiB)
    sock.sendall(
        struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_WRITE, 10, 4 * MiB, len(blob2)) + blob2
        + struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_BLOCK_STATUS, 11, 4 * MiB - 64 * KiB,
                      96 * KiB)
        + struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, 12, 4 * MiB, 32 * KiB)
        + struct.pack(">IHHQQI", C.REQUEST_MAGIC, C.CMD_FLAG_FAST_ZERO | C.CMD_FLAG_NO_HOLE,
                      C.CMD_WRITE_ZEROES, 13, 4 * MiB + 60 * KiB, 4 * KiB)
        + struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, 14, 4 * MiB + 32 * KiB, 8 * KiB))
    done(10)  # the others wait for it: nothing else was sent before its payload ended
    replies = {}
    for _ in range(4):
        flags, rtype, cookie, payload = structured_reply(sock)
        assert flags & C.REPLY_FLAG_DONE and cookie not in replies
        replies[cookie] = rtype, payload
    assert set(replies) == {11, 12, 13, 14}
    assert replies[11][0] == C.REPLY_TYPE_BLOCK_STATUS
    assert struct.unpack(">IIIII", replies[11][1]) == (ident, 64 * KiB, hole, 32 * KiB, data)
    assert replies[12] == (C.REPLY_TYPE_OFFSET_DATA,
                           struct.pack(">Q", 4 * MiB) + blob2[: 32 * KiB])
    assert replies[13] == (C.REPLY_TYPE_NONE, b"")
    assert replies[14] == (C.REPLY_TYPE_OFFSET_DATA,
                           struct.pack(">Q", 4 * MiB + 32 * KiB) + blob2[32 * KiB : 40 * KiB])
    assert handed_over(2)
    request(sock, C.CMD_READ, 4 * MiB + 56 * KiB, 8 * KiB, cookie=16)
    assert read(4 * MiB + 56 * KiB, 8 * KiB, 16) == blob2[56 * KiB : 60 * KiB] + bytes(4 * KiB)
    request(sock, C.CMD_READ, MiB, 512 * KiB, cookie=15)
    assert read(MiB, 512 * KiB, 15) == blob[: 256 * KiB] + bytes(256 * KiB)
    assert handed_over(0)
    sock.close()
    wait_until(lambda: metric(daemon, "netswap_connections") == 0, what="the connection closed")
    assert metric(daemon, "netswap_requests_total", export="disk", op="block_status") == 3
    assert metric(daemon, "netswap_requests_total", export="disk", op="write_zeroes") == 2
    assert metric(daemon, "netswap_request_errors_total", export="disk", op="write_zeroes",
                  errno="ENOTSUP") == 0


def test_a_client_that_leaves_with_flushes_pending_costs_nothing(daemon):
    """FLUSHes served in C, pipelined behind writes, and the client resets the connection
    while the loop syncs for them: the reply to the gone socket fails and ends that
    connection alone; every pool byte comes back, the export stays healthy, no traceback
    (the fixture checks the log), and the next client's FLUSH syncs its write."""
    free_before = metric(daemon, "netswap_pool_free_bytes")
    sock = transmission(daemon)
    request(sock, C.CMD_FLUSH, cookie=1)  # the loop's, not Python's
    assert simple_reply(sock) == (0, 1)
    payload = os.urandom(128 * KiB)
    for cookie in range(2, 66):
        if cookie % 4 == 0:
            request(sock, C.CMD_FLUSH, cookie=cookie)
        else:
            request(sock, C.CMD_WRITE, cookie * 128 * KiB, len(payload), cookie=cookie,
                    payload=payload)
    wait_until(lambda: metric(daemon, "netswap_requests_total", export="disk", op="flush") >= 2,
               what="a pipelined FLUSH served")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST: whatever the loop replies next goes to a dead socket
    wait_until(lambda: metric(daemon, "netswap_connections") == 0, what="the connection closed")
    wait_until(lambda: metric(daemon, "netswap_pool_free_bytes") == free_before,
               what="every pool byte free again")
    assert metric(daemon, "netswap_c_loop_handoffs_total", reason="python") == 0
    assert metric(daemon, "netswap_export_failed", export="disk") == 0

    again = transmission(daemon)
    syncs = metric(daemon, "netswap_export_flush_syncs_total", export="disk")
    request(again, C.CMD_WRITE, 0, len(payload), cookie=1, payload=payload)
    assert simple_reply(again) == (0, 1)
    request(again, C.CMD_FLUSH, cookie=2)
    assert simple_reply(again) == (0, 2)
    assert metric(daemon, "netswap_export_flush_syncs_total", export="disk") == syncs + 1
    request(again, C.CMD_READ, 0, len(payload), cookie=3)
    assert simple_reply(again) == (0, 3)
    assert recv_exact(again, len(payload)) == payload
    again.close()


def test_a_write_payload_that_arrives_in_pieces_is_received_whole_in_c(daemon):
    """The loop polls briefly for the rest of a payload before it sleeps (nbdfast.c,
    PAYLOAD_POLL_NS): pieces that come at once, and one that comes long after the poll gave
    up, make one write with every byte in place; a client that leaves in the middle of a
    payload costs nothing (its pool buffer comes back, nothing is written)."""
    free_before = metric(daemon, "netswap_pool_free_bytes")
    sock = transmission(daemon)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = os.urandom(256 * KiB)
    request(sock, C.CMD_WRITE, 0, len(payload), cookie=1)  # the header alone first
    pieces = [payload[:1000], payload[1000:5000], payload[5000:100 * KiB], payload[100 * KiB:]]
    for number, piece in enumerate(pieces):
        sock.sendall(piece)
        time.sleep(0.2 if number == 1 else 0)  # one gap far longer than the poll
    assert simple_reply(sock) == (0, 1)
    request(sock, C.CMD_READ, 0, len(payload), cookie=2)
    assert simple_reply(sock) == (0, 2)
    assert recv_exact(sock, len(payload)) == payload
    assert metric(daemon, "netswap_c_loop_handoffs_total", reason="python") == 0

    writes = metric(daemon, "netswap_requests_total", export="disk", op="write")
    request(sock, C.CMD_WRITE, 512 * KiB, 64 * KiB, cookie=3, payload=b"\xff" * 1000)
    time.sleep(0.1)  # the loop is asleep in the payload now
    sock.close()
    wait_until(lambda: metric(daemon, "netswap_connections") == 0, what="the connection closed")
    wait_until(lambda: metric(daemon, "netswap_pool_free_bytes") == free_before,
               what="every pool byte free again")
    assert metric(daemon, "netswap_requests_total", export="disk", op="write") == writes
    again = transmission(daemon)
    request(again, C.CMD_READ, 512 * KiB, 1000, cookie=4)
    assert simple_reply(again) == (0, 4)
    assert recv_exact(again, 1000) == bytes(1000)  # the cut write left nothing behind
    again.close()
