"""Backing-store faults: the client gets the error, the daemon and its other clients carry on."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from support.daemon import start_daemon
from support.libnbd import import_libnbd
from support.metrics import metric, samples
from support.wait import wait_until

nbd = import_libnbd()
MiB = 1 << 20
EIO, EPERM = errno.errorcode[errno.EIO], errno.errorcode[errno.EPERM]


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
        error = wait_until(lambda: nbd_errno(h.pwrite, b"page" * 1024, 4096), timeout=30,
                           what="a plain write failing")
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
        # The failed sync was the C loop's (it serves plain FLUSHes): it handed that FLUSH
        # back, Python's backend learnt of the failure and answered it.
        assert metric(daemon, "netswap_c_loop_handoffs_total", reason="sync_error") == 1
        assert_other_exports_serve(daemon)
        h.shutdown()
    finally:
        daemon.stop()
    log = daemon.log()
    assert "fdatasync failed: Read-only file system" in log, log
    assert "Traceback" not in log


# -- clients that vanish mid-request ----------------------------------------------------------
#
# Whatever a client leaves behind (a half-received WRITE, READ replies nobody will read, a
# half-closed socket), its pool buffers and its receive window go back to the pool, and a swap
# node's reserve is released once detach_grace has passed with no connection left.

REQUEST = 256 * 1024


def _raw(daemon, name: bytes):
    from support.nbd_raw import transmission

    return transmission(daemon, name)


def _rst(sock) -> None:
    """Close with SO_LINGER 0: the kernel sends RST, as a node that crashed or rebooted would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _settled(daemon, baseline_free: float, timeout: float = 30) -> dict:
    """The pool and group metrics once no connection is left and the pool is back to
    `baseline_free`, or as they are at `timeout` (the assertions then say what is missing)."""
    deadline = time.monotonic() + timeout
    while True:
        values = samples(daemon.metrics())
        done = (values[("netswap_connections", ())] == 0
                and values[("netswap_pool_free_bytes", ())] == baseline_free)
        if done or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


@pytest.mark.parametrize("export", [b"swap/vanishing", b"disk"])
def test_vanishing_clients_give_back_buffers_and_reserve(tmp_path, export):
    from support.nbd_raw import recv_exact, request, simple_reply

    from netswap.nbd import constants as C

    daemon = start_daemon(tmp_path, swap_options='detach_grace = "1s"')
    try:
        baseline = _settled(daemon, -1, timeout=0)
        free = baseline[("netswap_pool_free_bytes", ())]
        watermark = baseline[("netswap_pool_watermark_bytes", ())]

        # 1. RST while a WRITE payload is half sent: the reader holds a request buffer.
        sock = _raw(daemon, export)
        request(sock, C.CMD_WRITE, 0, REQUEST, cookie=1, payload=b"w" * (REQUEST // 2))
        wait_until(lambda: metric(daemon, "netswap_pool_free_bytes") <= free - REQUEST,
                   what="the reader holding the WRITE's buffer")
        _rst(sock)

        # 2. RST with READ replies outstanding: workers hold buffers and block in send.
        sock = _raw(daemon, export)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for cookie in range(1, 33):  # 8 MiB of replies, far more than the socket buffers hold
            request(sock, C.CMD_READ, cookie * REQUEST, REQUEST, cookie=cookie)
        # More than the first case's buffer: workers hold READ replies they cannot send.
        wait_until(lambda: metric(daemon, "netswap_pool_free_bytes") <= free - 4 * REQUEST,
                   what="workers holding READ replies")
        _rst(sock)

        # 3. Half-close with requests in flight: the server finishes them and replies (the
        # spec: a client may shut its write side after its last request and still read).
        sock = _raw(daemon, export)
        payload = os.urandom(REQUEST)
        cookies = set(range(1, 17))
        for cookie in cookies:
            if cookie % 2:
                request(sock, C.CMD_WRITE, cookie * REQUEST, REQUEST, cookie=cookie, payload=payload)
            else:
                request(sock, C.CMD_READ, cookie * REQUEST, REQUEST, cookie=cookie)
        request(sock, C.CMD_FLUSH, cookie=99)
        sock.shutdown(socket.SHUT_WR)
        replied = set()
        sock.settimeout(30)
        for _ in range(len(cookies) + 1):
            error, cookie = simple_reply(sock)
            assert error == 0, (cookie, error)
            if cookie % 2 == 0:
                assert recv_exact(sock, REQUEST) == bytes(REQUEST), cookie  # never written
            replied.add(cookie)
        assert replied == cookies | {99}
        assert sock.recv(1) == b"", "the server closes once everything is answered"
        sock.close()

        values = _settled(daemon, free)
        assert values[("netswap_pool_free_bytes", ())] == free
        usage = {key: v for key, v in values.items()
                 if key[0] == "netswap_reserve_group_usage_bytes" and v}
        assert not usage, usage
        assert values[("netswap_pool_reserve_in_use_bytes", ())] == 0

        if export.startswith(b"swap/"):
            # The node's reserve stays for detach_grace after its last connection, then goes.
            wait_until(lambda: metric(daemon, "netswap_node_detaches_total") >= 1, timeout=30,
                       what="the node detached")
            assert metric(daemon, "netswap_node_detaches_total") == 1
            assert metric(daemon, "netswap_node_attaches_total") == 1  # one attach, shared
            assert metric(daemon, "netswap_pool_watermark_bytes") == watermark
        still = nbd.NBD()
        still.connect_uri(daemon.uri(export.decode()))
        assert still.pread(REQUEST, 3 * REQUEST) == payload
        still.shutdown()
    finally:
        assert daemon.stop() == 0, daemon.log()
    log = daemon.log()
    assert "Traceback" not in log
    assert "client closed in the middle of a WRITE payload" in log or "Connection reset" in log


def test_identity_check_follows_a_symlinked_static_export(tmp_path):
    """A static export named by a symlink (as /dev/disk/by-id/... are) is not "replaced": the
    check resolves the path the way it was opened.  Retargeting the symlink is a replacement."""
    from netswap.exports.backends import FileBackend

    target = tmp_path / "target.img"
    other = tmp_path / "other.img"
    for path in (target, other):
        path.write_bytes(bytes(MiB))
    link = tmp_path / "by-id"
    link.symlink_to(target)
    backend = FileBackend(link, MiB, read_only=False)
    try:
        backend.write_from(0, memoryview(b"x" * 4096), fua=True)
        backend.flush()
        assert backend.failure is None
        link.unlink()
        link.symlink_to(other)
        with pytest.raises(OSError) as err:
            backend.flush()
        assert err.value.errno == errno.EIO and backend.failure == "the backing file was replaced"
    finally:
        backend.close()
