"""exports/groupcommit.py: one sync answers every FLUSH waiting when it started, never one
that arrived after it started (syncs may overlap). Skipping a sync when nothing was written
is cext/commit.c's (tests/unit/test_commit.py).

The sync here is a function that counts its calls and can be held in the middle (a real
fdatasync cannot be held still), so each test sets up exactly the interleaving it names."""

from __future__ import annotations

import errno
import os
import threading

import pytest
from netswap.exports.backends import FileBackend
from netswap.exports.groupcommit import GroupCommit

WAIT = 10.0  # seconds: a bound for a hang, never a measurement


class HeldSync:
    """A sync that records each call and, while `hold` is clear, waits in the middle."""

    def __init__(self, fail: OSError | None = None) -> None:
        self.calls = 0
        self._count = threading.Lock()
        self.mine = threading.local()  # .call: the number of the call this thread is in
        self.started = threading.Event()  # set when a call begins
        self.hold = threading.Event()
        self.hold.set()
        self.fail = fail

    def __call__(self) -> None:
        with self._count:
            self.calls += 1
            self.mine.call = self.calls
        self.started.set()
        assert self.hold.wait(WAIT)
        if self.fail is not None:
            raise self.fail


class Answers:
    """Completions that record (in order) which sync had run when each came, and errors."""

    def __init__(self, sync: HeldSync) -> None:
        self.sync = sync
        self.got: list = []
        self.all_in = threading.Condition()

    def done(self, name):
        """A completion recording which sync answered it (the call its thread ran)."""
        def done(error):
            with self.all_in:
                self.got.append((name, getattr(self.sync.mine, "call", 0), error))
                self.all_in.notify_all()
        return done

    def wait_for(self, count: int) -> list:
        with self.all_in:
            assert self.all_in.wait_for(lambda: len(self.got) >= count, WAIT)
            return list(self.got)


def test_requests_arriving_during_a_sync_share_the_next_one():
    sync = HeldSync()
    commits = GroupCommit(sync, "test-flush")
    commits.CONCURRENT = 1
    answers = Answers(sync)
    sync.hold.clear()
    commits.request(answers.done("first"))
    assert sync.started.wait(WAIT)  # sync 1 runs, held
    for i in range(20):  # they arrive while it runs: sync 1 must not answer them
        commits.request(answers.done(i))
    sync.hold.set()
    got = answers.wait_for(21)
    assert got[0] == ("first", 1, None)
    assert sorted(calls for _, calls, _ in got[1:]) == [2] * 20  # all by sync 2, together
    assert sync.calls == commits.syncs == 2
    commits.close()


def test_a_request_arriving_during_a_sync_starts_another_at_once():
    sync = HeldSync()
    commits = GroupCommit(sync, "test-flush")
    commits.CONCURRENT = 2
    answers = Answers(sync)
    sync.hold.clear()
    commits.request(answers.done("first"))
    assert sync.started.wait(WAIT)
    sync.started.clear()
    commits.request(answers.done("second"))
    assert sync.started.wait(WAIT)  # sync 2 began while sync 1 is still held
    assert sync.calls == 2 and answers.got == []
    commits.request(answers.done("third"))  # both flushers busy: waits for one
    sync.hold.set()
    got = sorted(answers.wait_for(3))
    assert got == [("first", 1, None), ("second", 2, None), ("third", 3, None)]
    commits.close()


def test_many_threads_at_once_every_request_answered_after_a_sync_that_began_after_it():
    sync = HeldSync()
    commits = GroupCommit(sync, "test-flush")
    answers = Answers(sync)
    began = {}  # request -> sync calls made when it was requested

    def client(n):
        for i in range(50):
            began[(n, i)] = sync.calls
            commits.request(answers.done((n, i)))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = answers.wait_for(400)
    for name, calls, error in got:
        assert error is None
        # A sync begun before the request was made cannot answer it.
        assert calls > began[name], name
    assert sync.calls <= 400
    commits.close()


def test_a_flush_that_arrives_during_a_sync_gets_a_sync_of_its_own():
    sync = HeldSync()
    commits = GroupCommit(sync, "test-flush")
    answers = Answers(sync)
    sync.hold.clear()
    commits.request(answers.done("a"))
    assert sync.started.wait(WAIT)  # sync 1 runs, held: it may not answer "b"
    commits.request(answers.done("b"))
    sync.hold.set()
    got = {name: (calls, error) for name, calls, error in answers.wait_for(2)}
    assert got["b"] == (2, None)  # (the two syncs overlap: either may end first)
    commits.close()


def test_a_failed_sync_answers_its_whole_batch_with_the_error():
    sync = HeldSync(fail=OSError(errno.EIO, "disk gone"))
    commits = GroupCommit(sync, "test-flush")
    answers = Answers(sync)
    sync.hold.clear()
    commits.request(answers.done("first"))
    assert sync.started.wait(WAIT)
    for i in range(5):
        commits.request(answers.done(i))
    sync.hold.set()
    got = answers.wait_for(6)
    assert all(isinstance(error, OSError) and error.errno == errno.EIO for _, _, error in got)
    with pytest.raises(OSError) as raised:
        commits.sync()
    assert raised.value.errno == errno.EIO
    commits.close()


def test_the_flusher_thread_ends_when_idle_and_comes_back():
    sync = HeldSync()
    commits = GroupCommit(sync, "test-flush-idle")
    commits.IDLE_EXIT = 0.05
    commits.sync()
    (thread,) = commits._threads
    thread.join(WAIT)
    assert not thread.is_alive() and not commits._threads
    commits.sync()  # a new one starts
    assert sync.calls == 2
    commits.close()
    with pytest.raises(OSError):
        commits.request(lambda error: None)


def _file_backend(tmp_path, name="disk.img"):
    return FileBackend(tmp_path / name, 1 << 20, read_only=False, create=True)


def test_file_backend_flushes_sync_only_after_writes(tmp_path):
    with _file_backend(tmp_path) as backend:
        backend.flush()
        synced = backend.syncs
        backend.flush()
        assert backend.syncs == synced  # nothing written since
        view = memoryview(bytearray(4096))
        for write in (lambda: backend.write_from(0, view, False),
                      lambda: backend.write_zeroes(0, 4096, True, False),
                      lambda: backend.trim(0, 4096, False)):
            write()
            backend.flush()
            assert backend.syncs == synced + 1
            synced = backend.syncs


def test_an_adopted_file_written_by_others_syncs_on_every_flush(tmp_path):
    path = tmp_path / "nfs-swap"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 1 << 20)
    with FileBackend.adopt(fd, path) as backend:
        backend.flush()
        backend.flush()  # NFS writes through its own descriptors: no flag says "clean"
        assert backend.syncs == 2


def test_file_backend_flush_then_answers_on_the_flusher(tmp_path):
    with _file_backend(tmp_path) as backend:
        answered = threading.Event()
        got = []
        backend.write_from(0, memoryview(bytearray(4096)), False)
        backend.flush_then(lambda error: (got.append((error, threading.current_thread().name)),
                                          answered.set()))
        assert answered.wait(WAIT)
        assert got[0][0] is None and got[0][1].startswith("flush-")
