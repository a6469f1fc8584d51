"""Wire-level behaviour no library client will produce: a hand-written client speaking raw
bytes to a real netswapd (EXPORT_NAME fallback, malformed input, oversized payloads,
unknown commands, stalled handshakes, shutdown with requests in flight)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import time

import pytest

from netswap.nbd import constants as C
from support.daemon import start_daemon
from support.libnbd import import_libnbd
from support.nbd_raw import (
    closed_by_server, connect_raw, read_option_reply, recv_exact, request, send_option,
    simple_reply, still_serving, transmission,
)

MiB = 1 << 20


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name_fallback(daemon, no_zeroes):
    flags = C.CLIENT_FLAG_FIXED_NEWSTYLE | (C.CLIENT_FLAG_NO_ZEROES if no_zeroes else 0)
    sock = connect_raw(daemon, flags)
    send_option(sock, C.OPT_EXPORT_NAME, b"disk")
    size, tflags = struct.unpack(">QH", recv_exact(sock, 10))
    assert size == 64 * MiB and tflags & C.TFLAG_HAS_FLAGS
    if not no_zeroes:
        assert recv_exact(sock, 124) == bytes(124)
    request(sock, C.CMD_WRITE, 4096, 4, cookie=3, payload=b"abcd")
    assert simple_reply(sock) == (0, 3)
    request(sock, C.CMD_READ, 4096, 4, cookie=4)
    assert simple_reply(sock) == (0, 4) and recv_exact(sock, 4) == b"abcd"
    request(sock, C.CMD_DISC)
    assert closed_by_server(sock)


def test_export_name_unknown_closes(daemon):
    sock = connect_raw(daemon)
    send_option(sock, C.OPT_EXPORT_NAME, b"swap/../../etc/passwd")
    assert closed_by_server(sock)
    still_serving(daemon)


def test_bad_option_magic_closes_only_that_connection(daemon):
    sock = connect_raw(daemon)
    sock.sendall(struct.pack(">QII", 0xBADBADBAD, C.OPT_GO, 0))
    assert closed_by_server(sock)
    still_serving(daemon)
    assert "bad option magic" in daemon.log()


def test_bad_request_magic_closes_only_that_connection(daemon):
    other = transmission(daemon)
    sock = transmission(daemon)
    sock.sendall(struct.pack(">IHHQQI", 0x12345678, 0, C.CMD_READ, 1, 0, 512))
    assert closed_by_server(sock)
    request(other, C.CMD_FLUSH, cookie=5)
    assert simple_reply(other) == (0, 5)
    still_serving(daemon)


def test_unknown_command_gets_einval(daemon):
    sock = transmission(daemon)
    request(sock, 42, 0, 512, cookie=77)
    assert simple_reply(sock) == (C.EINVAL, 77)
    request(sock, C.CMD_BLOCK_STATUS, 0, 512, cookie=78)  # not negotiated
    assert simple_reply(sock) == (C.EINVAL, 78)
    request(sock, C.CMD_FLUSH, cookie=79)
    assert simple_reply(sock) == (0, 79)


def test_rejected_write_of_32mib_is_drained(daemon):
    sock = transmission(daemon)
    payload = os.urandom(32 * MiB)
    # Past the end of the 64 MiB export: ENOSPC, after the whole payload was consumed.
    request(sock, C.CMD_WRITE, 48 * MiB, len(payload), cookie=1, payload=payload)
    assert simple_reply(sock) == (C.ENOSPC, 1)
    request(sock, C.CMD_READ, 0, 8, cookie=2)
    assert simple_reply(sock) == (0, 2)
    recv_exact(sock, 8)


def test_gigantic_write_closes_without_allocating(daemon):
    sock = transmission(daemon)
    # 3 GiB declared; only the header is sent. The server must not wait for, buffer or
    # allocate the payload: it closes.
    request(sock, C.CMD_WRITE, 0, 3 << 30, cookie=1)
    assert closed_by_server(sock)
    assert "exceeds the drain limit" in daemon.log()
    still_serving(daemon)


def test_stalled_handshake_times_out(tmp_path):
    daemon = start_daemon(tmp_path, nbd_options='handshake_timeout = "1s"')
    try:
        sock = socket.create_connection(("127.0.0.1", daemon.port))
        recv_exact(sock, 18)
        start = time.monotonic()
        assert closed_by_server(sock, timeout=10)
        assert time.monotonic() - start < 5
        assert "handshake timed out" in daemon.log()
        still_serving(daemon)
    finally:
        assert daemon.stop() == 0


def test_unknown_option_reply_and_continue(daemon):
    sock = connect_raw(daemon)
    send_option(sock, 0x7654321, b"junk")
    assert read_option_reply(sock)[1] == C.REP_ERR_UNSUP
    send_option(sock, C.OPT_ABORT)
    assert read_option_reply(sock)[1] == C.REP_ACK
    assert closed_by_server(sock)


def test_sigterm_finishes_in_flight_requests_and_flushes(tmp_path):
    nbd = import_libnbd()
    daemon = start_daemon(tmp_path)
    h = nbd.NBD()
    h.connect_uri(daemon.uri("disk"))
    blocks = [os.urandom(MiB) for _ in range(32)]
    cookies = [h.aio_pwrite(block, i * MiB) for i, block in enumerate(blocks)]
    # Once the first reply is in, the rest are in flight or queued: stop the daemon now.
    while h.aio_in_flight() == len(blocks):
        h.poll(1000)
    daemon.process.send_signal(signal.SIGTERM)
    acked = set()
    while h.aio_in_flight():
        try:
            h.poll(1000)
        except nbd.Error:
            break  # the server closed once in-flight requests were done
    for i, cookie in enumerate(cookies):
        try:
            if h.aio_command_completed(cookie):
                acked.add(i)
        except nbd.Error:
            pass  # not replied: the client would resend it after reconnecting
    assert daemon.process.wait(30) == 0, daemon.log()
    # No acknowledged write is lost.
    image = (daemon.state_dir / "disk.img").read_bytes()
    assert acked
    for i in acked:
        assert image[i * MiB : (i + 1) * MiB] == blocks[i], i
    log = daemon.log()
    assert "received SIGTERM" in log and "stopped" in log and "Traceback" not in log


def test_request_pipelined_in_the_same_segment_as_go_is_served(daemon):
    sock = connect_raw(daemon)
    name = b"disk"
    go_option = struct.pack(">QII", C.IHAVEOPT, C.OPT_GO, 4 + len(name) + 2) + \
        struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    read = struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, 42, 0, 512)
    sock.sendall(go_option + read)  # one write: the request rides behind GO
    while True:
        _, rtype, _ = read_option_reply(sock)
        if rtype == C.REP_ACK:
            break
    assert simple_reply(sock) == (0, 42)
    assert len(recv_exact(sock, 512)) == 512
    sock.close()
