"""Backing-store faults: the client gets the error, the daemon and its other clients carry on."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import import_libnbd, start_daemon

nbd = import_libnbd()
MiB = 1 << 20
EIO, EPERM = errno.errorcode[errno.EIO], errno.errorcode[errno.EPERM]


def metric(daemon, name, **labels) -> float:
    for family in text_string_to_metric_families(daemon.metrics()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0


def nbd_errno(call, *args, **kwargs) -> str | None:
    """The errno name an NBD call failed with, or None if it succeeded."""
    try:
        call(*args, **kwargs)
    except nbd.Error as exc:
        return exc.errno
    return None


def assert_other_exports_serve(daemon) -> None:
    other = nbd.NBD()
    other.connect_uri(daemon.uri("ram"))
    other.pwrite(b"unaffected", 0)
    other.flush()
    assert other.pread(10, 0) == b"unaffected"
    other.shutdown()


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


# -- the backing file deleted or moved under the daemon ---------------------------------------
#
# Our descriptor keeps working after unlink/rename on Linux, so nothing fails by itself; but the
# next start opens (or creates, empty) whatever is at the path, and every write acknowledged
# since would be gone.  The daemon must notice and refuse to acknowledge from then on.

def _delete(path: Path) -> None:
    path.unlink()


def _rename_away(path: Path) -> None:
    path.rename(path.with_suffix(".moved"))


def _replace(path: Path) -> None:
    """Moved aside and an empty file of the same size put in its place (over it, the old inode
    would be gone: that is _delete)."""
    size = path.stat().st_size
    path.rename(path.with_suffix(".old"))
    path.write_bytes(b"")
    os.truncate(path, size)


@pytest.mark.parametrize("move, why", [(_delete, "deleted"), (_rename_away, "renamed away"),
                                       (_replace, "replaced")])
def test_backing_file_gone_under_the_daemon_fails_flushes_with_eio(tmp_path, move, why):
    daemon = start_daemon(tmp_path)
    try:
        h = nbd.NBD()
        h.connect_uri(daemon.uri("disk"))
        h.pwrite(b"durable" * 100, 0)
        h.flush()
        move(daemon.state_dir / "disk.img")
        # A write may still be taken before the next check (it promises nothing durable),
        # but the FLUSH that would promise it is refused, and so is everything after.
        h.pwrite(b"late" * 100, 4096)
        assert nbd_errno(h.flush) == EIO
        assert nbd_errno(h.pwrite, b"after" * 100, 8192) == EIO
        assert nbd_errno(h.pwrite, b"fua" * 100, 8192, nbd.CMD_FLAG_FUA) == EIO
        assert nbd_errno(h.zero, 4096, 0) == EIO
        # Reads still work: the data is reachable through the open descriptor until a restart.
        assert h.pread(700, 0) == b"durable" * 100
        assert metric(daemon, "netswap_export_failed", export="disk") == 1
        assert metric(daemon, "netswap_export_failed", export="ram") == 0
        assert metric(daemon, "netswap_backend_errors_total", request="flush:5") >= 1
        assert metric(daemon, "netswap_backend_errors_total", request="write:5") >= 2
        assert_other_exports_serve(daemon)
        h.shutdown()
    finally:
        daemon.stop()
    log = daemon.log()
    assert f"the backing file was {why}" in log, log
    assert log.count("acknowledged writes may not survive") == 1, "one error line, at the failure"
    assert "Traceback" not in log


def test_swap_image_deleted_under_plain_writes_fails_them_with_eio(tmp_path):
    """Swap over NBD never flushes, so plain writes must find out on their own (the periodic
    check), or a node would swap into a file that no longer exists for as long as it runs."""
    daemon = start_daemon(tmp_path)
    try:
        h = nbd.NBD()
        h.connect_uri(daemon.uri("swap/gone"))
        h.pwrite(b"page" * 1024, 0)
        (daemon.state_dir / "swap" / "gone.img").unlink()
        deadline = time.monotonic() + 30
        error = None
        while error is None and time.monotonic() < deadline:
            error = nbd_errno(h.pwrite, b"page" * 1024, 4096)
            time.sleep(0.05)
        assert error == EIO
        assert nbd_errno(h.pwrite, b"page" * 1024, 8192) == EIO
        assert metric(daemon, "netswap_export_failed", export="swap/gone") == 1
        h.shutdown()
    finally:
        daemon.stop()
    assert "gone.img: the backing file was deleted" in daemon.log()


# -- storage that refuses writes under the running daemon --------------------------------------

@pytest.fixture
def ext4_state_dir(tmp_path):
    """A 64 MiB ext4 on a loop device as the state directory, mounted errors=remount-ro so a
    file system error turns it read-only, as a failing disk would."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a loop device")
    image = tmp_path / "ext4.img"
    image.write_bytes(b"")
    os.truncate(image, 64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    state = tmp_path / "state"
    state.mkdir()
    try:
        subprocess.run(["mount", "-o", "errors=remount-ro", loop, str(state)], check=True)
        try:
            yield state, Path(loop).name
        finally:
            subprocess.run(["chattr", "-R", "-i", str(state)], capture_output=True)
            subprocess.run(["umount", "-l", str(state)], capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_immutable_backing_file_gives_eperm_per_request_and_recovers(tmp_path, ext4_state_dir):
    state, _ = ext4_state_dir
    daemon = start_daemon(tmp_path)
    try:
        h = nbd.NBD()
        h.connect_uri(daemon.uri("disk"))
        h.pwrite(b"kept" * 256, 0, nbd.CMD_FLAG_FUA)
        subprocess.run(["chattr", "+i", str(state / "disk.img")], check=True)
        try:
            assert nbd_errno(h.pwrite, b"refused" * 100, 0) == EPERM
            assert nbd_errno(h.pwrite, b"refused" * 100, 0, nbd.CMD_FLAG_FUA) == EPERM
            assert nbd_errno(h.zero, 4096, 0) == EPERM
            assert h.pread(1024, 0) == b"kept" * 256  # nothing refused reached the file
            h.flush()  # nothing acknowledged is at risk: flushing still succeeds
            assert_other_exports_serve(daemon)
            assert metric(daemon, "netswap_backend_errors_total", request="write:1") >= 2
        finally:
            subprocess.run(["chattr", "-i", str(state / "disk.img")], check=True)
        # A refusal is not a failure: once the operator undoes it, the export takes writes.
        h.pwrite(b"again" * 100, 0, nbd.CMD_FLAG_FUA)
        assert h.pread(500, 0) == b"again" * 100
        assert metric(daemon, "netswap_export_failed", export="disk") == 0
        h.shutdown()
    finally:
        assert daemon.stop() == 0, daemon.log()
    log = daemon.log()
    assert "Operation not permitted" in log and "Traceback" not in log


def test_file_system_turned_read_only_fails_writes_and_flushes(tmp_path, ext4_state_dir):
    state, device = ext4_state_dir
    trigger = Path(f"/sys/fs/ext4/{device}/trigger_fs_error")
    if not trigger.exists():
        pytest.skip("this kernel has no ext4 trigger_fs_error")
    daemon = start_daemon(tmp_path)
    try:
        h = nbd.NBD()
        h.connect_uri(daemon.uri("disk"))
        h.pwrite(b"durable" * 100, 0)
        h.flush()
        h.pwrite(b"unflushed" * 100, 4096)
        trigger.write_text("1")  # an ext4 error: the journal aborts, the fs goes read-only
        assert nbd_errno(h.pwrite, b"late" * 100, 8192) in (EPERM, EIO)  # EROFS -> EPERM
        # The flush cannot make the write before it durable: refused, and from then on the
        # export refuses every write and flush, whatever the kernel says to a retry.
        assert nbd_errno(h.flush) in (EPERM, EIO)
        assert nbd_errno(h.flush) == EIO
        assert nbd_errno(h.pwrite, b"late" * 100, 8192, nbd.CMD_FLAG_FUA) == EIO
        assert h.pread(700, 0) == b"durable" * 100
        assert metric(daemon, "netswap_export_failed", export="disk") == 1
        assert_other_exports_serve(daemon)
        h.shutdown()
    finally:
        daemon.stop()
    log = daemon.log()
    assert "fdatasync failed: Read-only file system" in log, log
    assert "Traceback" not in log
