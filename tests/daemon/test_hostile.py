"""The attack matrix of issue 5 ("Bad input"), each case against one real netswapd.

Every case is one row of CASES: what a hostile client sends, and what must follow. For each,
the test checks all of:

  (a) the spec's reply (the option reply type, the NBD error) or a clean close by the server;
  (b) a line in the daemon log naming the problem, at info or above (and no traceback);
  (c) the counter for it in /metrics, incremented by exactly one;
  (d) a well-behaved libnbd client, attached to another export (a node's swap, over IPv6)
      before the attack, keeps doing verified I/O during it and after it;
  (e) data written to the attacked export before the attack reads back intact, and no
      file appears in the state directory (no export name reaches the filesystem).

One daemon serves the whole module (a short handshake timeout, so stalled clients cost a
second each); the cases run in order on it, so each also shows the daemon carrying on after
all the cases before it.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

import pytest

from netswap.nbd import constants as C
from support.daemon import start_daemon
from support.libnbd import import_libnbd
from support.metrics import samples
from support.nbd_raw import read_option_reply, recv_exact, request, send_option, simple_reply
from support.process import rss_kib
from support.wait import wait_until

nbd = import_libnbd()

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
HANDSHAKE_TIMEOUT = 1  # seconds; the daemon's handshake_timeout in this module
# Written to the attacked export before any case; every case must leave it intact.
KEEP_OFFSET, KEEP = 8 * MiB, os.urandom(MiB)
STEADY_EXPORT = "swap/steady-node"
STEADY_SLOTS = 32

_REPLY_NAMES = {value: name for name, value in vars(C).items()
                if name.startswith("REP_") and name != "REP_FLAG_ERROR"}
_ERROR_NAMES = {C.EPERM: "EPERM", C.EIO: "EIO", C.ENOMEM: "ENOMEM", C.EINVAL: "EINVAL",
                C.ENOSPC: "ENOSPC", C.EOVERFLOW: "EOVERFLOW", C.ENOTSUP: "ENOTSUP",
                C.ESHUTDOWN: "ESHUTDOWN"}


# The well-behaved client ------------------------------------------------------------------


class SteadyClient:
    """A node swapping on its own export: writes a page, reads it back, compares; forever."""

    def __init__(self, uri: str) -> None:
        self.handle = nbd.NBD()
        self.handle.connect_uri(uri)
        self.rounds = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="steady client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                slot = self.rounds % STEADY_SLOTS
                page = os.urandom(64 * KiB)
                self.handle.pwrite(page, slot * 64 * KiB)
                if self.handle.pread(len(page), slot * 64 * KiB) != page:
                    raise AssertionError(f"steady client read back other data in slot {slot}")
                with self._progress:
                    self.rounds += 1
                    self._progress.notify_all()
        except BaseException as exc:  # reported by the test that observes it
            self.errors.append(exc)
            with self._progress:
                self._progress.notify_all()

    def progresses(self, rounds: int = 3, timeout: float = 20) -> bool:
        """Did the client complete `rounds` more verified rounds (without an error)?"""
        with self._progress:
            target = self.rounds + rounds
            self._progress.wait_for(lambda: self.rounds >= target or self.errors, timeout)
            return self.rounds >= target and not self.errors

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.handle.shutdown()


# Raw helpers --------------------------------------------------------------------------------


def connect(daemon) -> socket.socket:
    """A TCP connection that has read the greeting and sent nothing."""
    sock = socket.create_connection(("127.0.0.1", daemon.port))
    sock.settimeout(30)
    recv_exact(sock, 18)
    return sock


def server_closed(sock: socket.socket, timeout: float = 10) -> str:
    """'close' once the server has closed (reading whatever it still sent), else it raises."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    sock.close()
    return "close"


def option_reply_name(sock: socket.socket) -> str:
    _, reply_type, _ = read_option_reply(sock)
    return _REPLY_NAMES.get(reply_type, hex(reply_type))


def go_data(name: bytes, infos=()) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def option_bytes(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", C.IHAVEOPT, option, len(data)) + data


def abort_is_acked(sock: socket.socket) -> bool:
    """Haggling carries on after an error reply: ABORT still gets its ACK and a close."""
    send_option(sock, C.OPT_ABORT)
    ok = option_reply_name(sock) == "REP_ACK"
    server_closed(sock)
    return ok


def go_until_ack(sock: socket.socket, name: bytes) -> str:
    """Send GO; return the name of the final reply (REP_ACK on success)."""
    send_option(sock, C.OPT_GO, go_data(name))
    while True:
        name_ = option_reply_name(sock)
        if name_ != "REP_INFO":
            return name_


def transmission(daemon, export: bytes = b"disk") -> socket.socket:
    sock = connect(daemon)
    sock.sendall(struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE))
    assert go_until_ack(sock, export) == "REP_ACK"
    return sock


def in_sync(sock: socket.socket) -> bool:
    """The request stream is still in step after a refused request: a FLUSH is answered."""
    request(sock, C.CMD_FLUSH, cookie=0xF1)
    return simple_reply(sock) == (0, 0xF1)


def error_name(error: int) -> str:
    return _ERROR_NAMES.get(error, str(error)) if error else "OK"


# Attacks --------------------------------------------------------------------------------
# Each takes the daemon and `during` (called once the hostile state is live, before the
# server's reaction is awaited: the well-behaved client must progress then) and returns the
# outcome it saw: "close", an option reply name, or an NBD error name.

FLAGS = struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE)


def send_then_close_expected(payload: bytes):
    def attack(daemon, during):
        sock = connect(daemon)
        sock.sendall(payload)
        during()
        return server_closed(sock)
    return attack


def truncated(payload: bytes):
    """Send part of a handshake, then EOF (our write side shut)."""
    def attack(daemon, during):
        sock = connect(daemon)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        during()
        return server_closed(sock)
    return attack


def stall(payload: bytes):
    """Send part of a handshake and then nothing: only the handshake timeout ends it."""
    def attack(daemon, during):
        sock = connect(daemon)
        sock.sendall(payload)
        during()
        started = time.monotonic()
        outcome = server_closed(sock, timeout=HANDSHAKE_TIMEOUT + 20)
        # Closed by the timeout, not at once (a close at once would be another reason).
        assert time.monotonic() - started > HANDSHAKE_TIMEOUT / 2
        return outcome
    return attack


def option_refused(option: int, data: bytes):
    """An option that gets an error reply; the handshake must go on (ABORT is acked)."""
    def attack(daemon, during):
        sock = connect(daemon)
        sock.sendall(FLAGS + option_bytes(option, data))
        during()
        outcome = option_reply_name(sock)
        assert abort_is_acked(sock)
        return outcome
    return attack


def structured_then_refused(option: int, data: bytes):
    """As option_refused, after STRUCTURED_REPLY (which metadata contexts need)."""
    def attack(daemon, during):
        sock = connect(daemon)
        sock.sendall(FLAGS + option_bytes(C.OPT_STRUCTURED_REPLY) + option_bytes(option, data))
        assert option_reply_name(sock) == "REP_ACK"
        during()
        outcome = option_reply_name(sock)
        assert abort_is_acked(sock)
        return outcome
    return attack


def meta_data(name: bytes, *queries: bytes) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def go_refused(name: bytes):
    return option_refused(C.OPT_GO, go_data(name))


def go_after_failed_go(daemon, during):
    sock = connect(daemon)
    sock.sendall(FLAGS)
    first = go_until_ack(sock, b"swap/../disk")
    during()
    second = go_until_ack(sock, b"disk")  # the same connection may still GO
    assert second == "REP_ACK", second
    assert in_sync(sock)
    request(sock, C.CMD_DISC)
    server_closed(sock)
    return first


def info_then_go(daemon, during):
    sock = connect(daemon)
    sock.sendall(FLAGS + option_bytes(C.OPT_INFO, go_data(b"disk", [C.INFO_BLOCK_SIZE])))
    while (reply := option_reply_name(sock)) == "REP_INFO":
        pass
    assert reply == "REP_ACK", reply
    during()
    assert go_until_ack(sock, b"disk") == "REP_ACK"
    request(sock, C.CMD_READ, KEEP_OFFSET, 4096, cookie=7)
    error, cookie = simple_reply(sock)
    assert cookie == 7 and recv_exact(sock, 4096) == KEEP[:4096]
    request(sock, C.CMD_DISC)
    server_closed(sock)
    return error_name(error)


def go_after_go(daemon, during):
    """A second GO once in transmission is a request with a bad magic (IHAVEOPT's bytes)."""
    sock = transmission(daemon)
    sock.sendall(option_bytes(C.OPT_GO, go_data(b"disk", [C.INFO_BLOCK_SIZE])))  # 28 bytes
    during()
    return server_closed(sock)


def export_name_closes(name: bytes):
    """EXPORT_NAME has no error reply: an unknown name can only be a close."""
    return send_then_close_expected(FLAGS + option_bytes(C.OPT_EXPORT_NAME, name))


def refused_request(command: int, offset: int = 0, length: int = 4096, flags: int = 0,
                    payload: bytes = b"", structured: bool = False):
    """A transmission request that must get an error reply and leave the stream in step."""
    def attack(daemon, during):
        sock = transmission(daemon)
        request(sock, command, offset, length, cookie=0xBAD, flags=flags, payload=payload)
        during()
        error, cookie = simple_reply(sock)
        assert cookie == 0xBAD
        assert in_sync(sock)
        request(sock, C.CMD_DISC)
        server_closed(sock)
        return error_name(error)
    return attack


def closing_request(header: bytes):
    def attack(daemon, during):
        sock = transmission(daemon)
        sock.sendall(header)
        during()
        return server_closed(sock)
    return attack


def header(command: int, offset: int = 0, length: int = 0, flags: int = 0,
           magic: int = C.REQUEST_MAGIC, cookie: int = 1) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, command, cookie, offset, length)


def gigantic(command: int, length: int):
    """A request for gigabytes: the daemon must answer or close without allocating them."""
    def attack(daemon, during):
        high_water = ("netswap_pool_high_water_bytes", ())
        high_before = samples(daemon.metrics())[high_water]
        rss_before = rss_kib(daemon.process.pid)
        sock = transmission(daemon)
        sock.sendall(header(command, 0, length, cookie=0xB16))
        during()
        if command == C.CMD_WRITE:
            outcome = server_closed(sock)  # without our sending (or its reading) the payload
        else:
            error, cookie = simple_reply(sock)
            assert cookie == 0xB16
            assert in_sync(sock)
            outcome = error_name(error)
            request(sock, C.CMD_DISC)
            server_closed(sock)
        # Neither the pool nor the heap took the length asked for (the pool's high-water
        # mark may grow by this connection's 64 KiB receive window, not by gigabytes).
        high_after = samples(daemon.metrics())[high_water]
        assert high_after - high_before < MiB, (high_before, high_after)
        growth = rss_kib(daemon.process.pid) - rss_before
        assert growth < 16 * 1024, f"RSS grew by {growth} KiB"
        print(f"pool high water {high_before} -> {high_after} B, RSS +{growth} KiB")
        return outcome
    return attack


def requests_after_disc(daemon, during):
    """Requests sent behind DISC (in the same segment) are not served: the server closes."""
    sock = transmission(daemon)
    sock.sendall(header(C.CMD_DISC) + header(C.CMD_READ, 0, 4096, cookie=2)
                 + header(C.CMD_WRITE, 0, 4, cookie=3) + b"evil")
    during()
    sock.settimeout(10)
    try:
        leftover = sock.recv(65536)
    except ConnectionResetError:
        leftover = b""
    assert leftover == b"", f"a request after DISC was answered: {leftover[:32]!r}"
    return server_closed(sock)


# The matrix -------------------------------------------------------------------------------


def metric(name: str, **labels) -> tuple:
    return (name, tuple(sorted(labels.items())))


def handshake_failed(reason: str) -> tuple:
    return metric("netswap_handshakes_failed_total", reason=reason)


def protocol_error(reason: str) -> tuple:
    return metric("netswap_protocol_errors_total", reason=reason)


def option_refusal(reason: str) -> tuple:
    return metric("netswap_options_refused_total", reason=reason)


def request_error(op: str, error: str) -> tuple:
    return metric("netswap_request_errors_total", export="disk", op=op, errno=error)


@dataclass(frozen=True)
class Case:
    name: str
    attack: Callable
    outcome: str  # "close", an option reply type name, or an NBD error name
    log: str  # a fragment of the daemon's log line about it
    counter: tuple  # the /metrics sample that counts it (must grow by exactly 1)


GO_DISK = option_bytes(C.OPT_GO, go_data(b"disk"))
LONG_NAME = b"a" * 5000
END = 64 * MiB  # the size of the attacked export
TOP = (1 << 64) - 4096  # offset + length past 2**64

CASES = [
    # -- Handshake: magics and flags
    Case("option magic is the server's NBDMAGIC",
         send_then_close_expected(FLAGS + struct.pack(">QII", C.NBDMAGIC, C.OPT_GO, 0)),
         "close", "bad option magic", protocol_error("bad_option_magic")),
    Case("option magic is garbage",
         send_then_close_expected(FLAGS + struct.pack(">QII", 0xDEADBEEF, C.OPT_LIST, 0)),
         "close", "bad option magic", protocol_error("bad_option_magic")),
    Case("option magic is IHAVEOPT with one bit flipped",
         send_then_close_expected(FLAGS + struct.pack(">QII", C.IHAVEOPT ^ 1, C.OPT_LIST, 0)),
         "close", "bad option magic", protocol_error("bad_option_magic")),
    Case("client flags with unknown bits",
         send_then_close_expected(struct.pack(">I", 0x80000001)),
         "close", "unknown client flags", handshake_failed("bad_client_flags")),
    Case("client flags without FIXED_NEWSTYLE",
         send_then_close_expected(struct.pack(">I", C.CLIENT_FLAG_NO_ZEROES)),
         "close", "does not speak fixed newstyle", handshake_failed("not_fixed_newstyle")),
    # -- Handshake: truncated at each field boundary, then EOF
    *[Case(f"EOF after {cut} bytes of flags+GO",
           truncated((FLAGS + GO_DISK)[:cut]),
           "close", "in the middle of a handshake message" if cut not in (0, 4)
           else "closed during the handshake",
           handshake_failed("truncated" if cut not in (0, 4) else "closed"))
      for cut in (0, 2, 4, 4 + 8, 4 + 12, 4 + 16, 4 + 16 + 4, 4 + 16 + 4 + 4)],
    # -- Handshake: option lengths
    Case("option length larger than the data, then stall",
         stall(FLAGS + struct.pack(">QII", C.IHAVEOPT, C.OPT_GO, 100) + go_data(b"disk")),
         "close", "handshake timed out", handshake_failed("handshake_timeout")),
    Case("option length 2**32-1 (never allocated)",
         send_then_close_expected(FLAGS + struct.pack(">QII", C.IHAVEOPT, C.OPT_GO, 0xFFFFFFFF)),
         "close", "declares 4294967295 bytes", protocol_error("option_too_long")),
    Case("option length 64 KiB + 1",
         send_then_close_expected(FLAGS + struct.pack(">QII", C.IHAVEOPT, C.OPT_INFO, 65537)),
         "close", "declares 65537 bytes", protocol_error("option_too_long")),
    Case("GO name length larger than the option data",
         option_refused(C.OPT_GO, struct.pack(">I", 1000) + b"disk" + struct.pack(">H", 0)),
         "REP_ERR_INVALID", "exceeds the option data", option_refusal("malformed_option")),
    Case("GO info count not matching the option length",
         option_refused(C.OPT_GO, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 3)),
         "REP_ERR_INVALID", "do not match the option length", option_refusal("malformed_option")),
    # -- Handshake: unknown options
    Case("unknown option 0x7654321", option_refused(0x7654321, b"junk"),
         "REP_ERR_UNSUP", "not supported", option_refusal("unsupported_option")),
    Case("unknown option 0xFFFFFFFF", option_refused(0xFFFFFFFF, b""),
         "REP_ERR_UNSUP", "not supported", option_refusal("unsupported_option")),
    Case("STARTTLS (TLS off on this listener)", option_refused(C.OPT_STARTTLS, b""),
         "REP_ERR_POLICY", "TLS is off on this listener", option_refusal("tls_off")),
    Case("LIST with data", option_refused(C.OPT_LIST, b"x"),
         "REP_ERR_INVALID", "LIST takes no data", option_refusal("malformed_option")),
    # -- Handshake: metadata contexts
    Case("SET_META_CONTEXT before STRUCTURED_REPLY",
         option_refused(C.OPT_SET_META_CONTEXT, meta_data(b"disk", b"base:allocation")),
         "REP_ERR_INVALID", "needs structured replies",
         option_refusal("needs_structured_replies")),
    Case("SET_META_CONTEXT with 2**32-1 queries",
         structured_then_refused(C.OPT_SET_META_CONTEXT,
                                 struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0xFFFFFFFF)),
         "REP_ERR_INVALID", "do not fit", option_refusal("malformed_option")),
    Case("LIST_META_CONTEXT query length past the option",
         structured_then_refused(C.OPT_LIST_META_CONTEXT,
                                 meta_data(b"disk", b"base:allocation")[:-4]),
         "REP_ERR_INVALID", "exceeds the option data", option_refusal("malformed_option")),
    Case("LIST_META_CONTEXT query without a namespace",
         structured_then_refused(C.OPT_LIST_META_CONTEXT, meta_data(b"disk", b"allocation")),
         "REP_ERR_INVALID", "namespace and a colon", option_refusal("malformed_option")),
    Case("SET_META_CONTEXT on a name outside the exports",
         structured_then_refused(C.OPT_SET_META_CONTEXT,
                                 meta_data(b"swap/../disk", b"base:allocation")),
         "REP_ERR_UNKNOWN", "no export named", option_refusal("unknown_export")),
    # -- Handshake: export names
    *[Case(f"GO export name {name!r}", go_refused(name),
           "REP_ERR_UNKNOWN", "no export named", option_refusal("unknown_export"))
      for name in (b"disk/", b"/disk", b"swap/a/b", b"swap/../disk", b"../disk", b"swap/..",
                   b"disk\x00", b"swap/node\x00x", b"swap/", b"swap/Node", b"swap/-node",
                   b"swap/node-", b"swap/no_de", b"swap/n.de", b"swap/" + b"n" * 64)],
    Case("GO export name that is not UTF-8", go_refused(b"swap/\xff\xfe"),
         "REP_ERR_UNKNOWN", "no export named", option_refusal("unknown_export")),
    Case("GO export name of 5000 bytes", go_refused(LONG_NAME),
         "REP_ERR_INVALID", "exceeds 4096", option_refusal("malformed_option")),
    Case("EXPORT_NAME with '..'", export_name_closes(b"swap/../../etc/passwd"),
         "close", "EXPORT_NAME for unknown export", protocol_error("unknown_export")),
    Case("EXPORT_NAME with NUL", export_name_closes(b"disk\x00"),
         "close", "EXPORT_NAME for unknown export", protocol_error("unknown_export")),
    Case("EXPORT_NAME of 5000 bytes", export_name_closes(LONG_NAME),
         "close", "EXPORT_NAME for unknown export", protocol_error("unknown_export")),
    # -- Handshake: repeated GO
    Case("GO again after a failed GO", go_after_failed_go,
         "REP_ERR_UNKNOWN", "no export named", option_refusal("unknown_export")),
    Case("INFO then GO", info_then_go,
         "OK", "attached to export 'disk'", metric("netswap_requests_total", export="disk", op="read")),
    Case("GO again once in transmission", go_after_go,
         "close", "bad request magic", protocol_error("bad_request_magic")),
    # -- Handshake: clients that stop
    Case("stop right after the greeting", stall(b""),
         "close", "handshake timed out", handshake_failed("handshake_timeout")),
    Case("stop after the client flags", stall(FLAGS),
         "close", "handshake timed out", handshake_failed("handshake_timeout")),
    Case("stop in an option header", stall(FLAGS + GO_DISK[:10]),
         "close", "handshake timed out", handshake_failed("handshake_timeout")),
    # -- Transmission: framing
    Case("bad request magic", closing_request(header(C.CMD_READ, 0, 512, magic=0x12345678)),
         "close", "bad request magic", protocol_error("bad_request_magic")),
    Case("reply magic sent as a request",
         closing_request(header(C.CMD_READ, 0, 512, magic=C.SIMPLE_REPLY_MAGIC)),
         "close", "bad request magic", protocol_error("bad_request_magic")),
    # -- Transmission: commands and flags
    *[Case(f"unknown command {command}", refused_request(command),
           "EINVAL", "unknown command", request_error(C.COMMAND_NAMES.get(command, "unknown"), "EINVAL"))
      for command in (C.CMD_RESIZE, 42, 0xFFFF)],
    Case("BLOCK_STATUS without a metadata context", refused_request(C.CMD_BLOCK_STATUS),
         "EINVAL", "without a metadata context", request_error("block_status", "EINVAL")),
    Case("READ with an unknown flag (0x8000)", refused_request(C.CMD_READ, flags=0x8000),
         "EINVAL", "flags 0x8000 not allowed", request_error("read", "EINVAL")),
    Case("READ with DF, no structured replies", refused_request(C.CMD_READ, flags=C.CMD_FLAG_DF),
         "EINVAL", "flags 0x4 not allowed", request_error("read", "EINVAL")),
    Case("WRITE with NO_HOLE",
         refused_request(C.CMD_WRITE, flags=C.CMD_FLAG_NO_HOLE, length=4, payload=b"evil"),
         "EINVAL", "flags 0x2 not allowed", request_error("write", "EINVAL")),
    Case("READ with FAST_ZERO", refused_request(C.CMD_READ, flags=C.CMD_FLAG_FAST_ZERO),
         "EINVAL", "flags 0x10 not allowed", request_error("read", "EINVAL")),
    Case("WRITE_ZEROES with REQ_ONE",
         refused_request(C.CMD_WRITE_ZEROES, flags=C.CMD_FLAG_REQ_ONE),
         "EINVAL", "flags 0x8 not allowed", request_error("write_zeroes", "EINVAL")),
    Case("FLUSH with NO_HOLE", refused_request(C.CMD_FLUSH, flags=C.CMD_FLAG_NO_HOLE, length=0),
         "EINVAL", "flags 0x2 not allowed", request_error("flush", "EINVAL")),
    # -- Transmission: ranges
    Case("READ at the end", refused_request(C.CMD_READ, END, 4096),
         "EINVAL", "past the end", request_error("read", "EINVAL")),
    Case("WRITE across the end",
         refused_request(C.CMD_WRITE, END - 2, 4, payload=b"evil"),
         "ENOSPC", "past the end", request_error("write", "ENOSPC")),
    Case("TRIM across the end", refused_request(C.CMD_TRIM, END - 4096, 8192),
         "EINVAL", "past the end", request_error("trim", "EINVAL")),
    Case("CACHE far past the end", refused_request(C.CMD_CACHE, 1 << 62, 4096),
         "EINVAL", "past the end", request_error("cache", "EINVAL")),
    Case("READ with offset+length past 2**64", refused_request(C.CMD_READ, TOP, 8192),
         "EINVAL", "past the end", request_error("read", "EINVAL")),
    Case("WRITE with offset+length past 2**64",
         refused_request(C.CMD_WRITE, TOP, 8192, payload=os.urandom(8192)),
         "ENOSPC", "past the end", request_error("write", "ENOSPC")),
    Case("WRITE_ZEROES with offset+length past 2**64",
         refused_request(C.CMD_WRITE_ZEROES, TOP, 0xFFFFFFFF),
         "ENOSPC", "past the end", request_error("write_zeroes", "ENOSPC")),
    Case("TRIM with offset 2**64-1 and length 2**32-1",
         refused_request(C.CMD_TRIM, (1 << 64) - 1, 0xFFFFFFFF),
         "EINVAL", "past the end", request_error("trim", "EINVAL")),
    # -- Transmission: zero lengths
    *[Case(f"zero-length {C.COMMAND_NAMES[command].upper()}", refused_request(command, 0, 0),
           "EINVAL", "zero length", request_error(C.COMMAND_NAMES[command], "EINVAL"))
      for command in (C.CMD_READ, C.CMD_WRITE, C.CMD_TRIM, C.CMD_WRITE_ZEROES)],
    # -- Transmission: gigabytes
    Case("WRITE of 3 GiB (header only)", gigantic(C.CMD_WRITE, 3 * GiB),
         "close", "exceeds the drain limit", protocol_error("write_too_large")),
    Case("WRITE of 4 GiB - 1 (header only)", gigantic(C.CMD_WRITE, 0xFFFFFFFF),
         "close", "exceeds the drain limit", protocol_error("write_too_large")),
    Case("READ of 3 GiB", gigantic(C.CMD_READ, 3 * GiB),
         "EINVAL", "exceeds the maximum payload", request_error("read", "EINVAL")),
    Case("READ of 4 GiB - 1", gigantic(C.CMD_READ, 0xFFFFFFFF),
         "EINVAL", "exceeds the maximum payload", request_error("read", "EINVAL")),
    # -- Transmission: after DISC
    Case("requests after DISC", requests_after_disc,
         "close", "after DISC", protocol_error("requests_after_disc")),
]


# The harness --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """The daemon, the well-behaved client on another export, and the data to keep."""
    daemon = start_daemon(tmp_path_factory.mktemp("hostile"),
                          nbd_options=f'handshake_timeout = "{HANDSHAKE_TIMEOUT}s"')
    steady = None
    try:
        writer = nbd.NBD()
        writer.connect_uri(daemon.uri("disk"))
        writer.pwrite(KEEP, KEEP_OFFSET)
        writer.flush()
        writer.shutdown()
        steady = SteadyClient(f"nbd://[::1]:{daemon.port}/{STEADY_EXPORT}")
        assert steady.progresses(), steady.errors
        yield daemon, steady
    finally:
        if steady is not None:
            steady.stop()
        code = daemon.stop()
        log = daemon.log()
        assert "Traceback" not in log, log
        assert code == 0, log
    assert not steady.errors, steady.errors


def state_files(daemon) -> list[str]:
    return sorted(str(path.relative_to(daemon.state_dir)) for path in daemon.state_dir.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_attack(target, case: Case):
    daemon, steady = target
    log_start = daemon.log_path.stat().st_size
    files_before = state_files(daemon)
    before = samples(daemon.metrics())
    progressed_during = []

    def during() -> None:
        progressed_during.append(steady.progresses())

    outcome = case.attack(daemon, during)

    # (a) the spec's reply, or a clean close
    assert outcome == case.outcome
    # (c) counted once, in the Prometheus exposition
    after = samples(daemon.metrics())
    assert after.get(case.counter, 0) - before.get(case.counter, 0) == 1, (
        case.counter, {k: v for k, v in after.items() if k[0] == case.counter[0]})
    assert after[("netswap_internal_errors_total", ())] == before[("netswap_internal_errors_total", ())]
    # (b) a log line that names it, and no traceback (written once the connection ended)
    wait_until(lambda: case.log in daemon.log()[log_start:], interval=0.02,
               what=lambda: daemon.log()[log_start:])
    new_log = daemon.log()[log_start:]
    assert "Traceback" not in new_log, new_log
    # ... and at a level the default configuration (info) shows
    line = next(line for line in new_log.splitlines() if case.log in line)
    assert " DEBUG " not in line, line
    # (d) the node on the other export progressed during the attack and after it
    assert progressed_during == [True], steady.errors
    assert steady.progresses(), steady.errors
    # (e) what was written before is intact, and the attack made no file
    reader = nbd.NBD()
    reader.connect_uri(daemon.uri("disk"))
    assert reader.pread(len(KEEP), KEEP_OFFSET) == KEEP
    reader.shutdown()
    assert state_files(daemon) == files_before
    assert daemon.process.poll() is None
