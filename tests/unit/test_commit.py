"""cext/commit.c: the group-commit record the C loop's FLUSHes and Python's flushers share.

Real fdatasyncs on a temporary file; a failure is an fdatasync the kernel refuses (a pipe:
EINVAL), which latches the record as an EIO from the disk would."""

from __future__ import annotations

import errno
import os

import pytest
from netswap._pool import ffi, lib


@pytest.fixture
def record(tmp_path):
    dirty, gate = ffi.new("int *", 1), ffi.new("int *", 1)
    commit = ffi.gc(lib.commit_new(dirty, gate), lib.commit_free)
    fd = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT, 0o600)
    yield commit, dirty, gate, fd
    os.close(fd)


def test_a_sync_runs_when_written_and_none_when_nothing_was(record):
    commit, dirty, gate, fd = record
    assert lib.commit_sync(commit, fd) == 1
    assert dirty[0] == 0  # cleared when the sync began
    assert lib.commit_sync(commit, fd) == 0  # nothing written since: the last one covers it
    assert (lib.commit_syncs(commit), lib.commit_skipped(commit)) == (1, 1)
    dirty[0] = 1  # a write completed
    assert lib.commit_sync(commit, fd) == 1
    assert lib.commit_syncs(commit) == 2


def test_without_a_dirty_flag_every_call_syncs(tmp_path):
    gate = ffi.new("int *", 1)
    commit = ffi.gc(lib.commit_new(ffi.NULL, gate), lib.commit_free)
    fd = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert [lib.commit_sync(commit, fd) for _ in range(3)] == [1, 1, 1]
    finally:
        os.close(fd)


def test_a_failed_sync_latches_the_record_and_closes_the_write_gate(record):
    commit, dirty, gate, fd = record
    read_end, write_end = os.pipe()
    try:
        assert lib.commit_sync(commit, write_end) == -1
        assert ffi.errno == errno.EINVAL
    finally:
        os.close(read_end)
        os.close(write_end)
    assert gate[0] == 0 and lib.commit_failed(commit) == errno.EINVAL
    # From now on every flush fails, written or not, whatever a retry would say.
    for written in (1, 0):
        dirty[0] = written
        assert lib.commit_sync(commit, fd) == -1 and ffi.errno == errno.EIO
    assert lib.commit_syncs(commit) == 1


def test_a_gate_python_closed_fails_the_next_flush(record):
    commit, dirty, gate, fd = record
    gate[0] = 0  # Backend._fail (an identity check, a failed write)
    dirty[0] = 0
    assert lib.commit_sync(commit, fd) == -1 and ffi.errno == errno.EIO
    assert lib.commit_syncs(commit) == 0
