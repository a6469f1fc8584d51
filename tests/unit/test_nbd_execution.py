"""Executing NBD requests on a backend, replying and accounting, with no socket: a recording
backend and a sender that completes each reply at once."""

import errno
import struct
import threading

import pytest

from netswap.counters import Counters
from netswap.nbd import constants as C
from netswap.nbd.execution import Execution, run_on_backend
from netswap.nbd.transmission import BLOCK_STATUS_BUFFER, MAX_EXTENTS, Request


class RecordingBackend:
    def __init__(self, fail=None):
        self.calls = []
        self.fail = fail  # an exception every call raises

    def _record(self, *call):
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail

    def read_into(self, offset, view):
        self._record("read_into", offset, len(view))
        view[:] = b"r" * len(view)

    def write_from(self, offset, view, fua):
        self._record("write_from", offset, bytes(view), fua)

    def flush(self):
        self._record("flush")

    def trim(self, offset, length, fua):
        self._record("trim", offset, length, fua)

    def write_zeroes(self, offset, length, may_trim, fua, fast=False):
        self._record("write_zeroes", offset, length, may_trim, fua, fast)

    def cache(self, offset, length):
        self._record("cache", offset, length)

    def allocation(self, offset, length, limit):
        self._record("allocation", offset, length, limit)
        return [(4096, True), (4096, False), (1 << 30, True)]


class Export:
    name = "disk"

    def __init__(self, backend):
        self.backend = backend


class Buffer:
    def __init__(self, data: bytes):
        self.view = memoryview(bytearray(data))
        self.released = 0

    def release(self):
        self.released += 1


class InstantSender:
    """Sends every reply at once and completes it."""

    def __init__(self):
        self.replies = []

    def send(self, parts, done):
        self.replies.append(b"".join(bytes(part) for part in parts))
        done()


def request(command, offset=4096, length=8, flags=0, cookie=7):
    return Request(flags, command, cookie, offset, length)


@pytest.mark.parametrize("command, flags, expected", [
    (C.CMD_WRITE, C.CMD_FLAG_FUA, ("write_from", 4096, b"payload!", True)),
    (C.CMD_WRITE, 0, ("write_from", 4096, b"payload!", False)),
    (C.CMD_FLUSH, 0, ("flush",)),
    (C.CMD_TRIM, C.CMD_FLAG_FUA, ("trim", 4096, 8, True)),
    (C.CMD_WRITE_ZEROES, 0, ("write_zeroes", 4096, 8, True, False, False)),
    (C.CMD_WRITE_ZEROES, C.CMD_FLAG_NO_HOLE, ("write_zeroes", 4096, 8, False, False, False)),
    (C.CMD_WRITE_ZEROES, C.CMD_FLAG_FAST_ZERO, ("write_zeroes", 4096, 8, True, False, True)),
    (C.CMD_CACHE, 0, ("cache", 4096, 8)),
    (C.CMD_BLOCK_STATUS, 0, ("allocation", 4096, 8, MAX_EXTENTS)),
    (C.CMD_BLOCK_STATUS, C.CMD_FLAG_REQ_ONE, ("allocation", 4096, 8, 1)),
])
def test_each_command_maps_onto_its_backend_call(command, flags, expected):
    backend = RecordingBackend()
    run_on_backend(backend, request(command, flags=flags), memoryview(bytearray(b"payload!")))
    assert backend.calls == [expected]


def make(backend, max_inflight=4, structured=False, allocation_context=None):
    counters = Counters()
    inflight = threading.BoundedSemaphore(max_inflight)
    sender = InstantSender()
    execution = Execution(counters, "peer", Export(backend), sender, structured, inflight,
                          allocation_context)
    return execution, counters, inflight, sender


def free_slots(inflight):
    count = 0
    while inflight.acquire(blocking=False):
        count += 1
    return count


def test_a_read_replies_with_its_data_then_releases_and_accounts():
    execution, counters, inflight, sender = make(RecordingBackend())
    buffer = Buffer(bytes(8))
    throttle = threading.Semaphore(0)
    inflight.acquire()  # the reader took the request's slot
    execution.execute(request(C.CMD_READ), buffer, throttle, started=0)
    assert sender.replies == [struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, 0, 7) + b"r" * 8]
    assert buffer.released == 1
    assert throttle.acquire(blocking=False)  # released once
    (stats,) = counters.requests.snapshot()
    assert (stats.export, stats.op, stats.requests, stats.bytes) == ("disk", "read", 1, 8)
    assert free_slots(inflight) == 4  # the request's slot is back


def test_a_failed_backend_call_replies_its_nbd_error_and_counts_it():
    execution, counters, inflight, sender = make(RecordingBackend(OSError(errno.ENOSPC, "full")))
    buffer = Buffer(b"payload!")
    inflight.acquire()
    execution.execute(request(C.CMD_WRITE), buffer, None, started=0)
    assert sender.replies == [struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, C.ENOSPC, 7)]
    assert counters.get("io_errors", f"write:{C.ENOSPC}") == 1
    (stats,) = counters.requests.snapshot()
    assert stats.errors == {C.ENOSPC: 1} and stats.bytes == 0
    assert buffer.released == 1
    assert free_slots(inflight) == 4


def test_a_bug_in_the_backend_is_an_eio_reply_not_a_dead_worker():
    execution, counters, inflight, sender = make(RecordingBackend(ValueError("a bug")))
    inflight.acquire()
    execution.execute(request(C.CMD_FLUSH, length=0), None, None, started=0)
    assert sender.replies == [struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, C.EIO, 7)]
    assert counters.get("io_errors", f"flush:{C.EIO}") == 1


def test_block_status_replies_one_chunk_of_descriptors_from_its_buffer():
    execution, counters, inflight, sender = make(RecordingBackend(), structured=True,
                                                 allocation_context=5)
    buffer = Buffer(bytes(BLOCK_STATUS_BUFFER))
    inflight.acquire()
    execution.execute(request(C.CMD_BLOCK_STATUS, offset=0, length=3 * 4096), buffer, None,
                      started=0)
    descriptors = struct.pack(">IIIIII", 4096, 0, 4096, C.STATE_HOLE | C.STATE_ZERO, 4096, 0)
    assert sender.replies == [struct.pack(">IHHQII", C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE,
                                          C.REPLY_TYPE_BLOCK_STATUS, 7, 4 + 24, 5) + descriptors]
    # ...written into the request's pool buffer, which is released once sent.
    assert bytes(buffer.view[:24]) == descriptors and buffer.released == 1
    (stats,) = counters.requests.snapshot()
    assert (stats.op, stats.requests, stats.errors) == ("block_status", 1, {})
    assert free_slots(inflight) == 4


def test_a_failed_block_status_is_an_error_chunk():
    execution, counters, inflight, sender = make(RecordingBackend(OSError(errno.EIO, "gone")),
                                                 structured=True, allocation_context=5)
    buffer = Buffer(bytes(BLOCK_STATUS_BUFFER))
    inflight.acquire()
    execution.execute(request(C.CMD_BLOCK_STATUS), buffer, None, started=0)
    [reply] = sender.replies
    assert struct.unpack_from(">IHHQIIH", reply)[2:6:3] == (C.REPLY_TYPE_ERROR, C.EIO)
    assert counters.get("io_errors", f"block_status:{C.EIO}") == 1
    assert buffer.released == 1


def test_fast_zero_refused_is_the_answer_asked_for_not_a_storage_error(caplog):
    backend = RecordingBackend(OSError(errno.EOPNOTSUPP, "would write"))
    execution, counters, inflight, sender = make(backend)
    inflight.acquire()
    with caplog.at_level("DEBUG", logger="netswap.nbd"):
        execution.execute(request(C.CMD_WRITE_ZEROES, flags=C.CMD_FLAG_FAST_ZERO), None, None,
                          started=0)
    assert sender.replies == [struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, C.ENOTSUP, 7)]
    assert counters.get("io_errors", f"write_zeroes:{C.ENOTSUP}") == 0
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    (stats,) = counters.requests.snapshot()
    assert stats.errors == {C.ENOTSUP: 1}  # counted as the reply it was
