"""Backing-store faults: the client gets the error, the daemon and its other clients carry on."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from conftest import import_libnbd, start_daemon

nbd = import_libnbd()
MiB = 1 << 20


@pytest.fixture
def small_state_dir(tmp_path):
    """A 4 MiB tmpfs as the state directory: a full filesystem on demand."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(state)], check=True)
    yield state
    subprocess.run(["umount", "-l", str(state)], capture_output=True)


def test_full_filesystem_gives_enospc_not_a_dead_daemon(tmp_path, small_state_dir):
    daemon = start_daemon(tmp_path)  # disk.img: 64 MiB sparse on a 4 MiB filesystem
    try:
        h = nbd.NBD()
        h.connect_uri(daemon.uri("disk"))
        first = os.urandom(MiB)
        h.pwrite(first, 0)
        with pytest.raises(nbd.Error) as err:
            for i in range(1, 8):
                h.pwrite(os.urandom(MiB), i * MiB)
        assert err.value.errno == errno.errorcode[errno.ENOSPC], err.value
        # What was acknowledged is intact, and the connection and the daemon still serve.
        assert h.pread(MiB, 0) == first
        h.trim(MiB, 0)  # freeing space makes writes possible again
        h.pwrite(b"again" * 100, 0)
        assert h.pread(500, 0) == b"again" * 100
        other = nbd.NBD()
        other.connect_uri(daemon.uri("ram"))
        other.pwrite(b"unaffected", 0)
        assert other.pread(10, 0) == b"unaffected"
        other.shutdown()
        h.shutdown()
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert "No space left on device" in daemon.log() and "Traceback" not in daemon.log()
