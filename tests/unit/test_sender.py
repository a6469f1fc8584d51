"""ReplySender and SendPoller on a real socket pair: replies in order and whole, each
completion exactly once, workers never blocked by a reader that does not read, a stalled
reader cut off, and TLS-style sealed chunks produced only as the socket takes them."""

from __future__ import annotations

import socket
import struct
import threading
import time

from netswap.transport.sender import ReplySender, SendPoller
from support.wait import wait_until

KiB = 1024


def pair(sndbuf: int = 16 * KiB):
    server, client = socket.socketpair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    return server, client


def receive(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, f"closed after {len(data)} of {count} bytes"
        data += chunk
    return bytes(data)


class Completions:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[int, int] = {}

    def make(self, index: int):
        def done():
            with self.lock:
                self.counts[index] = self.counts.get(index, 0) + 1
        return done


def test_replies_from_many_threads_arrive_whole_and_each_completes_once():
    server, client = pair()
    poller = SendPoller(send_timeout=60, on_timeout=lambda sender: None)
    sender = ReplySender(server, poller, "test")
    completions = Completions()
    threads, per_thread, payload = 8, 50, 12 * KiB

    def worker(t):
        for i in range(per_thread):
            index = t * per_thread + i
            header = struct.pack(">II", index, payload)
            body = memoryview(bytes([index % 251]) * payload)
            sender.send((header, body), completions.make(index))

    got = {}
    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    # The socket buffer holds ~16 KiB: most replies wait in the backlog until we read.
    for _ in range(threads * per_thread):
        index, length = struct.unpack(">II", receive(client, 8))
        assert length == payload
        assert receive(client, length) == bytes([index % 251]) * payload  # never interleaved
        got[index] = True
    for w in workers:
        w.join()
    wait_until(lambda: len(completions.counts) >= threads * per_thread, timeout=5,
               interval=0.01, what="every completion counted")
    assert sorted(got) == list(range(threads * per_thread))
    assert set(completions.counts.values()) == {1}
    assert len(completions.counts) == threads * per_thread
    poller.forget(sender)
    poller.stop()
    server.close()
    client.close()


def test_a_reader_that_does_not_read_never_blocks_the_sending_thread():
    server, client = pair()
    poller = SendPoller(send_timeout=60, on_timeout=lambda sender: None)
    sender = ReplySender(server, poller, "test")
    completions = Completions()
    big = memoryview(bytes(1024 * KiB))

    def worker():
        for index in range(8):  # 8 MiB into a ~16 KiB socket buffer nobody reads
            sender.send((b"h" * 16, big), completions.make(index))

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()  # a blocking send would wait for the reader forever
    assert not completions.counts  # nothing sent completely yet: buffers still held
    assert sender.stalled_for(time.monotonic() + 1) >= 1
    # The client reads: the poller finishes every reply, in order.
    for _ in range(8):
        receive(client, 16 + len(big))
    wait_until(lambda: len(completions.counts) >= 8, timeout=5,
               interval=0.01, what="every completion counted")
    assert completions.counts == {i: 1 for i in range(8)}
    assert sender.stalled_for(time.monotonic()) == 0
    poller.forget(sender)
    poller.stop()
    server.close()
    client.close()


def test_a_stalled_reader_is_cut_off_and_its_queued_replies_complete():
    server, client = pair()
    timed_out = []

    def on_timeout(sender):
        timed_out.append(sender.peer)
        sender.cut_off()

    poller = SendPoller(send_timeout=1.0, on_timeout=on_timeout)
    sender = ReplySender(server, poller, "stalled")
    completions = Completions()
    for index in range(4):
        sender.send((memoryview(bytes(512 * KiB)),), completions.make(index))
    wait_until(lambda: len(completions.counts) >= 4, timeout=10,
               interval=0.05, what="every completion counted")
    assert timed_out == ["stalled"]
    assert completions.counts == {i: 1 for i in range(4)}
    assert sender.broken
    sender.send((b"late",), completions.make(99))  # after the cut: completed, not sent
    assert completions.counts[99] == 1
    poller.stop()
    server.close()
    client.close()


def test_a_peer_that_closes_completes_what_was_queued():
    server, client = pair()
    poller = SendPoller(send_timeout=60, on_timeout=lambda sender: None)
    sender = ReplySender(server, poller, "gone")
    completions = Completions()
    for index in range(4):
        sender.send((memoryview(bytes(512 * KiB)),), completions.make(index))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    wait_until(lambda: len(completions.counts) >= 4, timeout=10,
               interval=0.05, what="every completion counted")
    assert completions.counts == {i: 1 for i in range(4)}
    assert sender.broken
    poller.stop()
    server.close()


def test_sealed_replies_are_made_chunk_by_chunk_as_the_socket_takes_them():
    server, client = pair()
    poller = SendPoller(send_timeout=60, on_timeout=lambda sender: None)
    made = []

    def seal(parts):
        # Stands in for TLS: one "record" per 64 KiB of plaintext, made on demand.
        data = b"".join(bytes(part) for part in parts)
        for start in range(0, len(data), 64 * KiB):
            made.append(start)
            yield data[start:start + 64 * KiB]

    sender = ReplySender(server, poller, "tls", seal=seal)
    completions = Completions()
    sender.send((b"A" * 16, memoryview(b"a" * (1024 * KiB))), completions.make(0))
    sender.send((b"B" * 16, memoryview(b"b" * (1024 * KiB))), completions.make(1))
    # The socket holds a few chunks; the rest of the first reply, and all of the second,
    # are not made yet (a queued reply is not a heap copy of its payload).
    assert len(made) < 17
    first = receive(client, 16 + 1024 * KiB)
    second = receive(client, 16 + 1024 * KiB)
    assert first == b"A" * 16 + b"a" * (1024 * KiB)
    assert second == b"B" * 16 + b"b" * (1024 * KiB)
    wait_until(lambda: len(completions.counts) >= 2, timeout=5,
               interval=0.01, what="every completion counted")
    assert completions.counts == {0: 1, 1: 1}
    poller.forget(sender)
    poller.stop()
    server.close()
    client.close()


def test_a_reply_with_empty_parts_is_sent_and_completed():
    """An empty part (a procedure with no results) must not leave the sender retrying a
    zero-byte send forever while it holds the connection's gate."""
    left, right = socket.socketpair()
    poller = SendPoller(send_timeout=5, on_timeout=lambda sender: None)
    try:
        sender = ReplySender(left, poller, "test")
        done = threading.Event()
        sender.send([b"", b"head", b"", memoryview(b"tail"), b""], done.set)
        assert done.wait(5)
        right.settimeout(5)
        assert right.recv(64) == b"headtail"
    finally:
        poller.stop()
        left.close()
        right.close()
