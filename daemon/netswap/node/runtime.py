"""What keeps netswap-node itself off the swap it serves: its memory locked and grown at start,
log lines that never wait, and the kernel's memalloc reserve sized for its sockets.

The seed's point, on the node: the kernel serves SOCK_MEMALLOC sockets (every socket handed to
the nbd driver is one) from below vm.min_free_kbytes. The agent raises that watermark by what
its sockets can have in flight: connections x (the socket's send and receive buffers), the
memory TCP needs to carry a swap-out and its replies when nothing else is free. It never
lowers it, and says what it found and what it set.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
from pathlib import Path
from types import SimpleNamespace

from ..protect import ProtectError, protect_process

log = logging.getLogger("netswap.node")

MIN_FREE_KBYTES = Path("/proc/sys/vm/min_free_kbytes")
# glibc mallopt: keep freed heap (no trim) and serve allocations from the heap (not mmap), so
# the memory grown at start stays the agent's, locked, for the reconnect path to reuse.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
HEAP_GROWTH = 4 << 20


def protect_agent() -> None:
    """mlockall (required: an agent that can be swapped out can deadlock its own node),
    oom_score_adj -1000 and PR_SET_IO_FLUSHER (best effort), then the heap grown once."""
    try:
        protect_process(SimpleNamespace(mlockall="required", io_flusher="best-effort",
                                        oom_score_adj=-1000))
    except ProtectError as exc:
        raise SystemExit(f"netswap-node: {exc}") from None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    grown = [bytearray(64 << 10) for _ in range(HEAP_GROWTH // (64 << 10))]
    del grown  # freed into the heap, which keeps it (locked, since MCL_FUTURE)


def socket_reserve_kib(connections: int) -> int:
    """What `connections` swap sockets can hold in flight: their send and receive buffers."""
    probe = socket.socket()
    try:
        per_socket = (probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                      + probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    finally:
        probe.close()
    tcp_max = 0
    for name in ("tcp_wmem", "tcp_rmem"):
        try:
            tcp_max += int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        except (OSError, ValueError, IndexError):
            pass
    # Autotuning grows buffers up to tcp_[wr]mem's maximum: take the larger of the two views.
    return connections * max(per_socket, tcp_max) // 1024


def raise_min_free_kbytes(need_kib: int, baseline: int | None) -> int | None:
    """Set vm.min_free_kbytes to baseline + need (baseline: its value before any agent raised
    it); never lower. Returns the baseline to remember, None if it could not be read."""
    try:
        current = int(MIN_FREE_KBYTES.read_text())
    except (OSError, ValueError) as exc:
        log.warning("vm.min_free_kbytes not readable: %s", exc)
        return None
    baseline = current if baseline is None else baseline
    target = baseline + need_kib
    if target <= current:
        log.info("vm.min_free_kbytes = %d already covers the swap sockets' %d KiB", current,
                 need_kib)
        return baseline
    try:
        MIN_FREE_KBYTES.write_text(str(target))
    except OSError as exc:
        log.warning("vm.min_free_kbytes: could not raise %d -> %d: %s", current, target,
                    errno.errorcode.get(exc.errno, exc))
        return baseline
    log.info("vm.min_free_kbytes raised %d -> %d KiB: the swap sockets' reserve "
             "(connections x socket buffers = %d KiB) on top of %d", current, target, need_kib,
             baseline)
    return baseline


class NonBlockingHandler(logging.Handler):
    """Log lines written with one write(2) that never waits: to stderr reopened O_NONBLOCK (its
    own open file, so the shell's stderr keeps its mode) or to /dev/kmsg. A line the reader
    is not taking now is dropped and counted, never waited for: a logger that is itself
    swapped out must not hold the reconnect that would swap it in."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.dropped = 0
        self._kmsg = target == "kmsg"
        path = "/dev/kmsg" if self._kmsg else "/proc/self/fd/2"
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_APPEND | os.O_CLOEXEC)
        except OSError:
            self._fd = os.dup(2)  # a socket (journald's stream) cannot be reopened: keep it
            os.set_blocking(self._fd, False)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self._kmsg:
                level = 3 if record.levelno >= logging.ERROR else (
                    4 if record.levelno >= logging.WARNING else 6)
                data = f"<{level}>netswap-node: {line}\n".encode()
            else:
                data = f"netswap-node: {line}\n".encode()
            os.write(self._fd, data[:4000])
        except BlockingIOError:
            self.dropped += 1
        except Exception:  # a log line is never worth the agent
            self.dropped += 1
