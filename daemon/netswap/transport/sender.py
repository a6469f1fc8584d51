"""Reply sending that never blocks a worker on a slow or hostile client.

Workers are shared by every connection, so a worker must not wait for one client's socket:
a client that stops reading its READ replies would otherwise hold workers in sendall until
every other client stalls behind it. Instead each connection has a `ReplySender`. A reply
is first tried with a non-blocking sendmsg (the common case: the socket buffer has room, and
the reply leaves in one syscall from the worker that made it). Whatever does not fit waits in
the connection's backlog, in order, and the daemon's one `SendPoller` thread finishes it when
epoll says the socket is writable again.

The backlog is bounded without a limit of its own: a reply holds its request's in-flight
slot and pool buffer until it has been sent, so a client that never drains has at most
`nbd.max_inflight` replies queued, and then its reader stops reading requests (TCP
backpressure). It throttles only itself. One that makes no progress for `nbd.send_timeout`
is cut off, which gives its buffers and slots back.

Each reply comes with a completion callback (release the buffer and the slot, account the
request); it runs exactly once, when the reply has been sent or can never be (the client
is gone), outside the sender's lock.

The connection's C request loop sends its own replies on the same socket. The sender's lock
is therefore a gate in C (cext/sendgate.h) that the loop takes too: the loop sends only when
nothing is queued here, and when the socket takes part of one of its replies it holds the
gate shut until the reader has put the rest at the head of this queue (`resume`).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections import deque
from typing import Callable, Iterator, Optional, Sequence

from netswap._pool import ffi, lib

from ..counters import declare

SEND_TIMEOUTS = declare(
    "transport", "send_timeouts", "netswap_send_timeouts_total",
    "Clients disconnected for taking no replies for nbd.send_timeout (NBD) or nfs.send_timeout "
    "(NFS).")

log = logging.getLogger("netswap.nbd")

Completion = Callable[[], None]
# Turns plaintext reply parts into the ciphertext chunks that go on the wire, in order (TLS);
# None sends the parts as they are.
Sealer = Callable[[Sequence], Iterator[bytes]]

# How often the poller looks for stalled connections when no socket is writable.
_STALL_CHECK = 1.0
# As a plain int: or-ing the enum members costs several Python calls per reply.
_SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)


class ReplySender:
    def __init__(self, sock: socket.socket, poller: "SendPoller", peer: str,
                 seal: Optional[Sealer] = None) -> None:
        self._sock = sock
        self.peer = peer  # for log lines
        self._fd = sock.fileno()
        self._poller = poller
        self.seal = seal
        self.gate = ffi.gc(lib.send_gate_new(), lib.send_gate_free)  # see the module docstring
        if self.gate == ffi.NULL:
            raise MemoryError("no memory for a send gate")
        # Replies not fully sent yet, in order; the head may be partly sent.
        self._backlog: deque[_Reply] = deque()
        self._stalled_since = 0.0  # monotonic time the head last made progress
        self.broken = False  # the client is gone: replies are completed without sending

    def send(self, parts: Sequence, done: Completion) -> None:
        """Send `parts` (bytes-likes) as one reply, after every reply sent before it."""
        # With TLS the reply is sealed chunk by chunk as the socket takes it, so a queued
        # 32 MiB READ reply waits as plaintext in its pool buffer, never as a heap copy.
        reply = _Reply([], self.seal(parts), done) if self.seal else _Reply(list(parts), None, done)
        finished = None
        c_partial = lib.send_gate_acquire(self.gate)
        try:
            if self.broken:
                finished = done
            elif self._backlog or c_partial:
                self._backlog.append(reply)
            elif self._send_now(reply) or self.broken:
                finished = done
            else:
                self._queue_first(reply)
        finally:
            self._release()
        if finished is not None:
            finished()

    def resume(self, parts: Sequence, done: Completion) -> None:
        """Finish the C loop's reply the socket took only part of: `parts` is its rest, which
        goes out before anything queued (the gate has let no one send since)."""
        reply = _Reply(list(parts), None, done)
        finished = None
        lib.send_gate_acquire(self.gate)
        try:
            if self.broken:
                finished = done
            else:
                self._queue_first(reply)
        finally:
            self._release(took_partial=True)
        if finished is not None:
            finished()

    def _queue_first(self, reply: "_Reply") -> None:
        self._backlog.appendleft(reply)
        self._stalled_since = time.monotonic()
        self._poller.watch(self)

    def _release(self, took_partial: bool = False) -> None:
        lib.send_gate_release(self.gate, 1 if self._backlog else 0, 1 if took_partial else 0)

    def flush(self) -> None:
        """Send what the backlog holds, as far as the socket takes it (the poller's call)."""
        completed: list[Completion] = []
        c_partial = lib.send_gate_acquire(self.gate)
        try:
            # A partial reply of the C loop not taken over yet comes before the queue: wait
            # for resume(), which watches the socket again.
            while (self._backlog and not self.broken and not c_partial
                   and self._send_now(self._backlog[0])):
                completed.append(self._backlog.popleft().done)
            if self.broken:
                completed.extend(reply.done for reply in self._backlog)
                self._backlog.clear()
            elif self._backlog and not c_partial:
                self._poller.watch(self)
        finally:
            self._release()
        for done in completed:
            done()

    def stalled_for(self, now: float) -> float:
        """Seconds the oldest unsent reply has made no progress (0 with nothing queued)."""
        lib.send_gate_acquire(self.gate)
        try:
            return now - self._stalled_since if self._backlog else 0.0
        finally:
            self._release()

    def abandon(self) -> None:
        """The client is gone or cut off: complete every queued reply unsent."""
        lib.send_gate_acquire(self.gate)
        try:
            self.broken = True
            pending = [reply.done for reply in self._backlog]
            self._backlog.clear()
        finally:
            self._release()
        self._poller.forget(self)
        for done in pending:
            done()

    def cut_off(self) -> None:
        """Disconnect a client that takes no replies: its reader wakes up to a closed
        socket, and its queued replies are given up so their buffers and slots return."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.abandon()

    @property
    def fileno(self) -> int:
        return self._fd

    def _send_now(self, reply: "_Reply") -> bool:
        """Send as much of `reply` as the socket takes without blocking; True when all of it
        went. A send error marks the sender broken (the caller completes what is queued)."""
        while True:
            if not reply.parts:
                chunk = next(reply.chunks, None) if reply.chunks is not None else None
                if chunk is None:
                    return True
                reply.parts = [chunk] if chunk else []
                continue
            try:
                sent = self._sock.sendmsg(reply.parts, [], _SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                self.broken = True
                log.info("%s: reply not sent, client gone: %s", self.peer, exc)
                return False
            if sent:
                self._stalled_since = time.monotonic()
            reply.parts = skip_sent(reply.parts, sent)


class _Reply:
    """One reply on its way out: the parts still to send, and with TLS the ciphertext chunks
    still to make."""

    __slots__ = ("parts", "chunks", "done")

    def __init__(self, parts: list, chunks: Optional[Iterator[bytes]], done: Completion) -> None:
        self.parts = parts
        self.chunks = chunks
        self.done = done


def skip_sent(parts: list, count: int) -> list:
    """`parts` without its first `count` bytes (views, no copies). Empty parts at the front
    go too: left in place, one would be "sent" as 0 bytes forever."""
    while parts:
        first = memoryview(parts[0]).cast("B")
        if count >= len(first):
            count -= len(first)
            parts.pop(0)
        else:
            if count:
                parts[0] = first[count:]
            break
    return parts


class SendPoller:
    """The daemon's one thread that finishes replies clients were not ready to take, and cuts
    off clients that take nothing for `send_timeout` seconds."""

    def __init__(self, send_timeout: float, on_timeout: Callable[[ReplySender], None]) -> None:
        self.send_timeout = send_timeout
        self._on_timeout = on_timeout
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._senders: dict[int, ReplySender] = {}  # fd -> sender, while it has a backlog
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="send-poller", daemon=True)
        self._thread.start()

    def watch(self, sender: ReplySender) -> None:
        """Wake `sender` once when its socket is writable (or has failed)."""
        # One-shot: a writable socket would otherwise wake us until its backlog is empty,
        # while the next flush may already have emptied it.
        events = select.EPOLLOUT | select.EPOLLONESHOT
        with self._lock:
            fd = sender.fileno
            if self._senders.get(fd) is sender:
                self._epoll.modify(fd, events)
            else:
                if fd in self._senders:  # a closed connection's fd, reused
                    self._epoll.unregister(fd)
                self._senders[fd] = sender
                self._epoll.register(fd, events)

    def forget(self, sender: ReplySender) -> None:
        """Stop watching `sender` (before its socket is closed: fds are reused)."""
        with self._lock:
            if self._senders.get(sender.fileno) is sender:
                del self._senders[sender.fileno]
                try:
                    self._epoll.unregister(sender.fileno)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        next_check = time.monotonic() + _STALL_CHECK
        while not self._stopping:
            events = self._epoll.poll(_STALL_CHECK)
            for fd, _ in events:
                if fd == self._wake_r:
                    continue
                with self._lock:
                    sender = self._senders.get(fd)
                if sender is not None:
                    try:
                        sender.flush()
                    except Exception:  # never let one connection end the poller
                        log.exception("finishing replies on fd %d failed", fd)
                        sender.abandon()
            now = time.monotonic()
            if now >= next_check:
                next_check = now + _STALL_CHECK
                self._cut_stalled(now)

    def _cut_stalled(self, now: float) -> None:
        with self._lock:
            senders = list(self._senders.values())
        for sender in senders:
            if sender.stalled_for(now) >= self.send_timeout:
                self.forget(sender)
                self._on_timeout(sender)
