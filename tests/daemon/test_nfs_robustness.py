"""What a client cannot do to the NFS side by timing (issue 17, "Robustness left from earlier
work"), against a live netswapd: hold a pool buffer by trickling a record, park a worker in a
READ's wait for pool memory past the daemon's stop, land a WRITE after its swap file was
wiped, or reach a new scratch file through the handle of a removed one."""

from __future__ import annotations

import threading

import pytest

from netswap.nbd import constants as NBD
from netswap.rpc import message as rpc
from netswap.rpc.xdr import Unpacker
from support.daemon import stop_clean
from support.metrics import metric
from support.nbd_raw import request as nbd_request, transmission
from support.nfs import (
    ALPHA, FILE_SYNC, MOUNT_PROG, MOUNT_VERS, NULL, READ, STRANGER, WRITE, Nfs, NFS3_OK, create,
    header, scratch_path, start_nfs, start_nfs_daemon, xdr,
)
from support.wait import wait_until

KiB, MiB = 1 << 10, 1 << 20
NFS3ERR_STALE = 70
UMNT = 3


def normal_free(daemon) -> float:
    """Pool bytes a normal (non-reserve) allocation may still take."""
    return (metric(daemon, "netswap_pool_free_bytes")
            - metric(daemon, "netswap_pool_watermark_bytes"))


def hold_normal_memory_below(daemon, limit: int) -> list:
    """NBD clients of a non-swap export take normal memory until less than `limit` bytes of
    it are free (but at least 128 KiB): each is given its receive window, then stalls in the
    middle of a WRITE whose buffer the daemon holds while it waits for the rest. NBD
    connections, so that the NFS side's stop does not give the memory back. Returns them
    (closing them gives it back)."""
    holders = []
    while (free := normal_free(daemon)) >= limit:
        hold = transmission(daemon)
        holders.append(hold)
        wait_until(lambda: normal_free(daemon) < free, what="an NBD window taken")
        free = normal_free(daemon)
        # A buddy block at most what leaves 128 KiB: whatever the pool's size, the loop ends
        # between 128 KiB and `limit`.
        size = min(MiB, 1 << (int(free - 128 * KiB).bit_length() - 1))
        nbd_request(hold, NBD.CMD_WRITE, (len(holders) - 1) * MiB, size, cookie=1,
                    payload=bytes(4 * KiB))
        wait_until(lambda: normal_free(daemon) <= free - size, what="a WRITE buffer taken")
    assert normal_free(daemon) >= 128 * KiB
    return holders


# --------------------------------------------------------------------------- record deadline


def write_record(client: Nfs, handle: bytes, data: bytes) -> bytes:
    """A WRITE call of `data` at offset 0, framed as one record."""
    record = header(client.nfs.next_xid(), proc=WRITE) + xdr(
        ("o", handle), ("h", 0), ("u", len(data)), ("u", FILE_SYNC), ("o", data))
    return rpc.fragment_header(len(record)) + record


@pytest.mark.parametrize("path", ["python", "c_loop"])
def test_a_client_trickling_a_record_is_disconnected_at_its_deadline(tmp_path, path):
    """A byte every 0.2 s keeps the connection busy but never finishes the record: after
    nfs.record_timeout the connection is closed, logged and counted, and the record's pool
    buffer is back. A scratch WRITE from a client that is no node takes the Python path; a
    node's WRITE of its own swap file, once Python served the handle, is the C loop's."""
    daemon = start_nfs_daemon(tmp_path, 'record_timeout = "1s"')
    stop = threading.Event()
    trickle = None
    try:
        free = metric(daemon, "netswap_pool_free_bytes")
        if path == "python":
            client = Nfs(daemon, STRANGER)
            status, handle = create(client, client.root("/scratch"), b"slow")
        else:
            client = Nfs(daemon, ALPHA)
            handle = client.swap_handle("alpha")
            status = client.write(handle, 0, bytes(4096))[0]  # Python's: registers the handle
        assert status == NFS3_OK
        fallbacks = metric(daemon, "netswap_c_loop_handoffs_total", reason="nfs_python")
        record = write_record(client, handle, bytes(64 * KiB))
        sock = client.nfs.sock
        sock.sendall(record[:1024])  # enough for the C loop to take it on

        def send_slowly() -> None:
            for index in range(1024, len(record)):
                try:
                    sock.send(record[index:index + 1])
                except OSError:
                    return  # closed by the server: what the test waits for
                if stop.wait(0.2):
                    return

        trickle = threading.Thread(target=send_slowly, daemon=True)
        trickle.start()
        wait_until(lambda: metric(daemon, "netswap_rpc_record_timeouts_total", service="nfs") == 1,
                   timeout=15, what=daemon.log)
        client.nfs.expect_close()
        assert "nfs.record_timeout" in daemon.log()
        if path == "c_loop":  # the loop held the record, and timed it out itself
            assert metric(daemon, "netswap_c_loop_handoffs_total",
                          reason="nfs_python") == fallbacks
        wait_until(lambda: metric(daemon, "netswap_pool_free_bytes") >= free,
                   what="the record's buffer still held")
        client.close()
        # Others, and this client again, are served as before.
        again = Nfs(daemon, STRANGER if path == "python" else ALPHA)
        assert again.write(handle, 0, b"w" * 4096)[0] == NFS3_OK
        again.close()
    finally:
        stop.set()
        if trickle is not None:
            trickle.join(10)
        stop_clean(daemon)


# --------------------------------------------------------------------------- wipe


def test_a_write_the_c_loop_took_on_before_a_wipe_does_not_land_after_it(tmp_path):
    """The C loop takes a WRITE on from its first bytes (its handle is good then) and
    receives the rest as the client sends it. The node's swap is wiped meanwhile (it
    unmounted, swap.wipe); the rest comes after: the write must not land on the zeroed file
    (it would hand the node's next swapon stale pages, or outlive a wipe asked for). It is
    handed to Python, which answers NFS3ERR_STALE."""
    daemon = start_nfs_daemon(tmp_path, swap_options='wipe = true\ndetach_grace = "0.2s"')
    try:
        alpha = Nfs(daemon, ALPHA)
        handle = alpha.swap_handle("alpha")
        assert alpha.write(handle, 0, b"a" * 4096)[0] == NFS3_OK  # Python's: registers it
        fallbacks = metric(daemon, "netswap_c_loop_handoffs_total", reason="nfs_python")
        assert alpha.write(handle, 0, b"b" * 4096)[0] == NFS3_OK  # the loop's
        assert metric(daemon, "netswap_c_loop_handoffs_total",
                      reason="nfs_python") == fallbacks
        free = metric(daemon, "netswap_pool_free_bytes")
        xid = alpha.nfs.next_xid()
        call = header(xid, proc=WRITE) + xdr(("o", handle), ("h", 0), ("u", 64 * KiB),
                                             ("u", FILE_SYNC), ("o", b"late" * (16 * KiB)))
        record = rpc.fragment_header(len(call)) + call
        alpha.nfs.sock.sendall(record[:1024])
        # The loop took it on: it allocated the record's block (Python would have counted a
        # hand-over first).
        wait_until(lambda: metric(daemon, "netswap_pool_free_bytes") < free,
                   what="the WRITE's block taken")
        assert metric(daemon, "netswap_c_loop_handoffs_total",
                      reason="nfs_python") == fallbacks
        reply = alpha.mount_client.call(MOUNT_PROG, MOUNT_VERS, UMNT, xdr(("o", b"/swap")))
        assert reply.accepted
        wait_until(lambda: metric(daemon, "netswap_wipes_total", export="nfs:alpha") >= 1,
                   timeout=15, what=daemon.log)
        alpha.nfs.sock.sendall(record[1024:])
        reply = alpha.nfs.reply(xid)
        assert reply.accepted and reply.stat == 0
        assert Unpacker(reply.results).uint() == NFS3ERR_STALE
        assert metric(daemon, "netswap_c_loop_handoffs_total", reason="nfs_scrubbed") == 1
        on_disk = (daemon.state_dir / "nfs-swap" / "alpha").read_bytes()
        assert on_disk == bytes(len(on_disk)), "a write landed after the wipe"
        alpha.close()
    finally:
        stop_clean(daemon)


# --------------------------------------------------------------------------- stop


def test_a_worker_waiting_for_a_reads_pool_memory_is_woken_by_the_stop(tmp_path):
    """A READ whose data buffer the pool cannot give (its record could be received) waits on
    a worker; SIGTERM must end that wait, not sit out the shutdown timeout behind it."""
    daemon = start_nfs(
        tmp_path, 'max_io = "1MiB"\nswap_export = ""',
        nbd_options='max_request = "1MiB"', pool_options='normal_budget = "2MiB"\nheadroom = 0',
        swap_options='max_nodes = 1\nreserve_inflight = 4\nreserve_request = "64KiB"')
    holders: list = []
    client = Nfs(daemon, STRANGER)  # no node: its calls wait for normal memory
    try:
        status, handle = create(client, client.root("/scratch"), b"big")
        assert status == NFS3_OK
        (scratch_path(daemon) / "big").write_bytes(bytes(MiB))
        holders = hold_normal_memory_below(daemon, MiB)  # no 1 MiB block left for the READ
        waits = metric(daemon, "netswap_pool_waits_total")
        # Two calls at once, so the READ goes to a worker (a call alone runs on the
        # connection's thread); the NULL behind it is answered meanwhile.
        read = header(client.nfs.next_xid(), proc=READ) + xdr(("o", handle), ("h", 0), ("u", MiB))
        null_xid = client.nfs.next_xid()
        null = header(null_xid, proc=NULL)
        client.nfs.sock.sendall(rpc.fragment_header(len(read)) + read
                                + rpc.fragment_header(len(null)) + null)
        assert client.nfs.reply(null_xid).accepted
        wait_until(lambda: metric(daemon, "netswap_pool_waits_total") > waits,
                   what="the READ waiting for its buffer")
    finally:
        code = daemon.stop()  # SIGTERM with that worker still waiting
        for hold in holders:
            hold.close()
        client.close()
    log = daemon.log()
    assert "did not finish" not in log, log
    assert "Traceback" not in log, log
    assert code == 0, log


# --------------------------------------------------------------------------- scratch generations


def test_the_handle_of_a_removed_scratch_file_is_stale_not_the_file_made_after_it(tmp_path):
    """REMOVE is not served: a scratch file is removed on the server. The next file made,
    under any name, may get its inode number (ext4 hands it out again at once); a client
    still holding the old handle must get NFS3ERR_STALE, not the new file's data."""
    daemon = start_nfs_daemon(tmp_path)
    try:
        client = Nfs(daemon, STRANGER)
        root = client.root("/scratch")
        status, old = create(client, root, b"report")
        assert status == NFS3_OK and client.write(old, 0, b"old data")[0] == NFS3_OK
        path = scratch_path(daemon) / "report"
        inode = path.stat().st_ino
        path.unlink()
        # Used once removed, as a client would: the daemon keeps a file it served open,
        # holding its inode (and number) until a call finds it gone.
        assert client.getattr(old) == (NFS3ERR_STALE, None)
        status, new = create(client, root, b"report")
        assert status == NFS3_OK and client.write(new, 0, b"new data")[0] == NFS3_OK
        if path.stat().st_ino != inode:
            pytest.skip("this file system did not reuse the inode number")
        stale = metric(daemon, "netswap_nfs_errors_total", status=str(NFS3ERR_STALE))
        assert client.getattr(old) == (NFS3ERR_STALE, None)
        assert client.read(old, 0, 100)[0] == NFS3ERR_STALE
        assert client.write(old, 0, b"overwritten")[0] == NFS3ERR_STALE
        assert metric(daemon, "netswap_nfs_errors_total", status=str(NFS3ERR_STALE)) == stale + 3
        assert client.read(new, 0, 100)[:2] == (NFS3_OK, b"new data")
        assert path.read_bytes() == b"new data"
        client.close()
    finally:
        stop_clean(daemon)
