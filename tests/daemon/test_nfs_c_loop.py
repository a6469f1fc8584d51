"""The NFS C call loop (cext/nfsfast.c, nfs/fastloop.py) against a real netswapd.

A swap node's READs and WRITEs of its own swap file are served in C once Python has served
a call on that handle for the node; everything else is left to the Python path. These tests
send the same mixed stream of calls with nfs.c_loop on and off (off is the reference) and
check that the replies are the same bytes, that the statistics count the same calls while
the connection is open, and the hand-overs the loop must make: a handle of another node, a
scrubbed (stale) handle, a daemon stopped or a client gone with calls in flight, and the
node's idle clock. Scratch files are served in C too, on any connection: the same replies
as Python's, and a file removed, renamed or replaced on the server is Python's again.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import time

import pytest

from netswap.rpc import constants as RC
from netswap.rpc import message as rpc
from support.daemon import stop_clean
from support.metrics import metric, samples
from support.nfs import (
    ALPHA, BETA, COMMIT, CREATE, FATTR3_BYTES, FILE_SYNC, GETATTR, MOUNT_PROG, MOUNT_VERS, Nfs,
    NFS3_OK, NFS_PROG, NFS_VERS, NULL, READ, RpcClient, STRANGER, UNSTABLE, WRITE, sattr3,
    start_nfs_daemon, xdr,
)
from support.wait import wait_until

KiB, MiB = 1 << 10, 1 << 20
SWAP_SIZE = 4 * MiB
MAX_IO = 64 * KiB
DATA_SYNC, ACCESS = 1, 4
NFS3ERR_STALE = 70
UMNT = 3
NOBODY = rpc.AuthSys(stamp=7, machine="c-loop", uid=65534, gid=65534, gids=(1, 2, 3))


def nfs_daemon(tmp_path, c_loop: bool, extra: str = "", swap_options: str = ""):
    return start_nfs_daemon(tmp_path, f"c_loop = {str(c_loop).lower()}\n{extra}",
                            swap_options=swap_options)


def call_record(xid, proc, args, cred=NOBODY, vers=NFS_VERS):
    return rpc.call_header(xid, NFS_PROG, vers, proc, cred) + args


def read_args(handle, offset, count):
    return xdr(("o", handle), ("h", offset), ("u", count))


def write_args(handle, offset, data, stable=FILE_SYNC, count=None):
    return xdr(("o", handle), ("h", offset), ("u", len(data) if count is None else count),
               ("u", stable), ("o", data))


# Where the fields that differ between two daemons lie (file ids, times, the write verifier):
# a reply's RPC header is 24 bytes, then the status.
def _fattr3_at(proc: int, reply: bytes):
    if len(reply) < 28 or struct.unpack_from(">I", reply, 20)[0] != RC.SUCCESS:
        return None, False
    status = struct.unpack_from(">I", reply, 24)[0]
    if proc == GETATTR:
        return (28 if status == NFS3_OK else None), False
    if proc in (READ, ACCESS):
        present = len(reply) >= 32 and struct.unpack_from(">I", reply, 28)[0] == 1
        return (32 if present else None), False
    if proc in (WRITE, COMMIT):  # wcc_data: pre_op FALSE, then post_op
        present = len(reply) >= 36 and struct.unpack_from(">I", reply, 32)[0] == 1
        return (36 if present else None), status == NFS3_OK
    return None, False


def masked(proc: int, reply: bytes) -> bytes:
    """The reply with fileid, the three times and the write verifier zeroed: each daemon
    has its own files and start time. Everything else must be equal byte for byte."""
    at, verifier = _fattr3_at(proc, reply)
    out = bytearray(reply)
    if at is not None:
        out[at + 52:at + FATTR3_BYTES] = bytes(FATTR3_BYTES - 52)
    if verifier:
        out[-8:] = bytes(8)
    return bytes(out)


def fattr3_of(proc: int, reply: bytes) -> bytes:
    at, _ = _fattr3_at(proc, reply)
    return reply[at:at + FATTR3_BYTES]


class Stream:
    """Setup of one daemon (handles are per daemon) and the calls compared."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.alpha = Nfs(daemon, ALPHA)
        self.beta = Nfs(daemon, BETA)
        self.swap = self.alpha.swap_handle("alpha")
        self.beta_swap = self.beta.swap_handle("beta")
        scratch = self.alpha.root("/scratch")
        u = self.alpha.proc(CREATE, xdr(("o", scratch), ("o", b"plain.bin"), ("u", 0)) + sattr3())
        assert u.uint() == NFS3_OK and u.bool()
        self.scratch = bytes(u.opaque(64))
        self.xid = 0x1000

    def close(self) -> None:
        self.alpha.close()
        self.beta.close()

    def calls(self):
        """(proc, record) of the stream, xids fixed, data from a fixed seed."""
        rng = random.Random(7)
        swap, scratch, other = self.swap, self.scratch, self.beta_swap
        items = [
            (READ, read_args(swap, 0, 4096)),  # the first call on the handle: Python's
            (WRITE, write_args(swap, 0, rng.randbytes(4096))),
            (WRITE, write_args(swap, 8192, rng.randbytes(1001), UNSTABLE)),
            (WRITE, write_args(swap, 12288, rng.randbytes(3000), DATA_SYNC)),
            (WRITE, write_args(swap, 16384, b"")),
            (WRITE, write_args(swap, 32 * KiB, rng.randbytes(MAX_IO), UNSTABLE)),
            (READ, read_args(swap, 0, 4096)),
            (READ, read_args(swap, 8192, 1001)),
            (READ, read_args(swap, 12288, 3000)),
            (READ, read_args(swap, 0, 200000)),  # capped at max_io
            (READ, read_args(swap, 16384, 0)),
            (READ, read_args(swap, SWAP_SIZE, 4096)),  # past the end: nothing, eof
            (READ, read_args(swap, SWAP_SIZE - 100, 4096)),  # across the end
            (READ, read_args(swap, 2**63, 4096)),
            (WRITE, write_args(swap, SWAP_SIZE - 100, rng.randbytes(4096))),  # NOSPC
            (WRITE, write_args(swap, 2**64 - 4096, rng.randbytes(4096))),
            (COMMIT, xdr(("o", swap), ("h", 0), ("u", 0))),
            (GETATTR, xdr(("o", swap))),
            (ACCESS, xdr(("o", swap), ("u", 0x3F))),
            (NULL, b""),
            (WRITE, write_args(scratch, 0, rng.randbytes(5000), UNSTABLE)),
            (READ, read_args(scratch, 0, 8192)),
            (READ, read_args(other, 0, 4096)),  # beta's file: ACCES
            (WRITE, write_args(other, 0, rng.randbytes(4096))),
            (READ, read_args(swap, 0, 4096)[:-4]),  # truncated: GARBAGE_ARGS
            (READ, read_args(swap, 0, 4096) + b"\0\0\0\0"),  # left over
            (WRITE, write_args(swap, 0, rng.randbytes(4096), count=4000)),
            (WRITE, write_args(swap, 0, rng.randbytes(4096), stable=3)),
            (WRITE, write_args(swap, 0, rng.randbytes(MAX_IO + 4))),  # over max_io
            (READ, read_args(swap[:-1] + bytes([swap[-1] ^ 1]), 0, 4096)),  # forged
        ]
        for proc, args in items:
            self.xid += 1
            yield proc, call_record(self.xid, proc, args)
        # The same calls with AUTH_NONE and with the test client's credential.
        for proc, args in items[6:9]:
            self.xid += 1
            yield proc, call_record(self.xid, proc, args, cred=None)
        # Odd call headers: a bad AUTH_SYS body, another flavor, another version.
        self.xid += 1
        bad = bytearray(call_record(self.xid, READ, read_args(swap, 0, 4096)))
        struct.pack_into(">I", bad, 36, 300)  # machine name length past the credential
        yield READ, bytes(bad)
        self.xid += 1
        other_flavor = bytearray(call_record(self.xid, READ, read_args(swap, 0, 4096)))
        struct.pack_into(">I", other_flavor, 24, RC.AUTH_SHORT)
        yield READ, bytes(other_flavor)
        self.xid += 1
        yield READ, call_record(self.xid, READ, read_args(swap, 0, 4096), vers=4)
        self.xid += 1
        yield 99, call_record(self.xid, 99, read_args(swap, 0, 4096))

    def one_by_one(self) -> list:
        replies = []
        for proc, record in self.calls():
            self.alpha.nfs.send_record(record)
            replies.append(masked(proc, self.alpha.nfs.receive_record()))
        # A READ in two fragments (Python's: the loop takes single-fragment records only).
        self.xid += 1
        record = call_record(self.xid, READ, read_args(self.swap, 0, 4096))
        self.alpha.nfs.sock.sendall(rpc.fragment_header(40, last=False) + record[:40]
                                    + rpc.fragment_header(len(record) - 40) + record[40:])
        replies.append(masked(READ, self.alpha.nfs.receive_record()))
        return replies

    def pipelined(self, count: int = 40) -> dict:
        """WRITEs and READs sent all at once, on a connection of its own with a small receive
        buffer (so that large replies go out in parts); replies by xid (they may come in any
        order). The connection's first call is Python's (it registers the handle)."""
        rng = random.Random(11)
        client = RpcClient.__new__(RpcClient)
        client.sock = socket.socket()
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)  # before connect
        client.sock.bind((ALPHA, 0))
        client.sock.connect(("127.0.0.1", self.daemon.nfs_port))
        client.sock.settimeout(120)
        records, procs = [], {}
        self.xid += 1
        procs[self.xid] = READ
        records.append(call_record(self.xid, READ, read_args(self.swap, 0, 4096)))
        for index in range(count):
            self.xid += 1
            # Disjoint ranges: calls in flight together may run in any order.
            if index < count // 2:
                proc, args = WRITE, write_args(self.swap, 256 * KiB + index * 4096,
                                               rng.randbytes(4096), UNSTABLE)
            else:
                proc, args = READ, read_args(self.swap, (index - count // 2) * 4096, 4096)
            procs[self.xid] = proc
            records.append(call_record(self.xid, proc, args))
        # Large READs with Python's calls between them: replies the socket takes only in
        # part, while the workers queue theirs (the loop finishes its own, then the sender).
        for index in range(120):  # ~6 MiB of replies: more than the socket's send buffer
            self.xid += 1
            if index % 6 == 5:
                proc, args = COMMIT, xdr(("o", self.swap), ("h", 0), ("u", 0))
            else:
                proc, args = READ, read_args(self.swap, (index % 4) * MAX_IO, MAX_IO)
            procs[self.xid] = proc
            records.append(call_record(self.xid, proc, args))
        records = [rpc.fragment_header(len(record)) + record for record in records]
        replies = {}
        # The first alone (its handle is registered before the rest arrive), then the rest.
        for chunk in (records[:1], records[1:]):
            client.sock.sendall(b"".join(chunk))
            for _ in range(len(chunk)):
                reply = client.receive_record()
                xid = struct.unpack_from(">I", reply)[0]
                replies[xid] = masked(procs[xid], reply)
        client.close()
        return replies


def counts(daemon) -> dict:
    """What the statistics say about the NFS calls, as a scrape reads them."""
    names = ("netswap_nfs_calls_total", "netswap_nfs_bytes_total", "netswap_nfs_errors_total",
             "netswap_rpc_protocol_errors_total", "netswap_rpc_call_duration_seconds_count")
    return {key: value for key, value in samples(daemon.metrics()).items() if key[0] in names}


def settled_counts(daemon) -> dict:
    """counts() once every answered call is in the latency histogram: a call is timed to
    its reply being sent, and the client may read that reply before the observation is
    made, so the last ones can trail the replies by a moment."""
    deadline = time.monotonic() + 10
    while True:
        seen = counts(daemon)
        calls = {labels: value for (name, labels), value in seen.items()
                 if name == "netswap_nfs_calls_total"}
        timed = {tuple(label for label in labels if label[0] == "procedure"): value
                 for (name, labels), value in seen.items()
                 if name == "netswap_rpc_call_duration_seconds_count"
                 and ("service", "nfs") in labels}
        if calls == timed or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def run_stream(tmp_path, c_loop: bool):
    tmp_path.mkdir()
    daemon = nfs_daemon(tmp_path, c_loop)
    try:
        free = metric(daemon, "netswap_pool_free_bytes")
        stream = Stream(daemon)
        try:
            one = stream.one_by_one()
            handoffs = metric(daemon, "netswap_c_loop_handoffs_total", reason="nfs_python")
            burst = stream.pipelined()
            burst_handoffs = metric(daemon, "netswap_c_loop_handoffs_total",
                                    reason="nfs_python") - handoffs
            data = [stream.alpha.read(stream.swap, offset, MAX_IO)
                    for offset in (0, MAX_IO, 256 * KiB)]
            live = settled_counts(daemon)  # the connections are still open
        finally:
            stream.close()
        wait_until(lambda: metric(daemon, "netswap_pool_free_bytes") == free, timeout=10,
                   what="pool bytes still held")
        return one, burst, data, live, handoffs, burst_handoffs
    finally:
        stop_clean(daemon)


def test_the_same_calls_get_the_same_replies_and_counts_with_the_c_loop_on_and_off(tmp_path):
    on = run_stream(tmp_path / "on", c_loop=True)
    off = run_stream(tmp_path / "off", c_loop=False)
    one_on, burst_on, data_on, live_on, handoffs_on, burst_handoffs_on = on
    one_off, burst_off, data_off, live_off, handoffs_off, _ = off
    assert len(one_on) == len(one_off)
    for index, (c, python) in enumerate(zip(one_on, one_off)):
        assert c == python, f"call {index}: {c.hex()} != {python.hex()}"
    assert burst_on == burst_off
    assert data_on == data_off
    assert live_on == live_off
    # The loop ran (it handed the calls it does not serve to Python), and served the burst's
    # swap-file calls itself; without it nothing is handed over.
    assert handoffs_on > 0 and burst_handoffs_on == 21  # the first READ, the COMMITs
    assert len(burst_on) == 161
    assert handoffs_off == 0


def test_c_replies_carry_the_files_attributes_and_the_daemons_verifier(tmp_path):
    # The fields the comparison above masks: a C-served WRITE's and READ's fattr3 is what
    # Python's GETATTR reports right after, and its verifier is COMMIT's.
    daemon = nfs_daemon(tmp_path, c_loop=True)
    try:
        alpha = Nfs(daemon, ALPHA)
        swap = alpha.swap_handle("alpha")
        client = alpha.nfs
        assert alpha.write(swap, 0, b"p" * 4096)[0] == NFS3_OK  # Python's; registers it
        before = metric(daemon, "netswap_c_loop_handoffs_total", reason="nfs_python")
        client.send_record(call_record(client.next_xid(), WRITE,
                                       write_args(swap, 4096, b"q" * 4096)))
        written = client.receive_record()
        client.send_record(call_record(client.next_xid(), GETATTR, xdr(("o", swap))))
        attributes = client.receive_record()
        # A READ's attributes are the file's before it (the read may move atime).
        client.send_record(call_record(client.next_xid(), READ, read_args(swap, 0, 100)))
        read = client.receive_record()
        assert metric(daemon, "netswap_c_loop_handoffs_total", reason="nfs_python") == before + 1
        assert fattr3_of(WRITE, written) == fattr3_of(GETATTR, attributes)
        assert fattr3_of(READ, read) == fattr3_of(GETATTR, attributes)
        st = os.stat(daemon.state_dir / "nfs-swap" / "alpha")
        assert struct.unpack_from(">Q", fattr3_of(READ, read), 52)[0] == st.st_ino
        assert alpha.commit(swap)[1] == written[-8:]
        alpha.close()
    finally:
        stop_clean(daemon)


def test_a_scrubbed_handle_is_stale_even_where_the_c_loop_had_it(tmp_path):
    daemon = nfs_daemon(tmp_path, c_loop=True, swap_options='wipe = true\ndetach_grace = "0.2s"')
    try:
        alpha = Nfs(daemon, ALPHA)
        old = alpha.swap_handle("alpha")
        for _ in range(3):  # the first call registers the handle, the others are C's
            assert alpha.write(old, 0, b"s" * 4096)[0] == NFS3_OK
        # The node unmounts: released for good, detached after the grace, and wiped.
        reply = alpha.mount_client.call(MOUNT_PROG, MOUNT_VERS, UMNT, xdr(("o", b"/swap")))
        assert reply.accepted
        wait_until(lambda: metric(daemon, "netswap_wipes_total", export="nfs:alpha") >= 1,
                   timeout=15, what=daemon.log)
        # Attached again through a new handle, on the same connection...
        new = alpha.swap_handle("alpha")
        assert new != old
        for _ in range(2):
            assert alpha.read(new, 0, 4096)[:2] == (NFS3_OK, bytes(4096))
        # ...the old one is stale, whoever serves the call.
        assert alpha.read(old, 0, 4096)[0] == NFS3ERR_STALE
        assert alpha.write(old, 0, b"x" * 4096)[0] == NFS3ERR_STALE
        assert alpha.read(new, 0, 4096)[:2] == (NFS3_OK, bytes(4096))
        alpha.close()
    finally:
        stop_clean(daemon)


def test_calls_served_in_c_keep_the_node_attached(tmp_path):
    # The idle clock sees the loop's calls: a node busy in C only is not released as idle.
    daemon = nfs_daemon(tmp_path, c_loop=True, extra='swap_idle_timeout = "1s"')
    try:
        alpha = Nfs(daemon, ALPHA)
        swap = alpha.swap_handle("alpha")
        assert alpha.write(swap, 0, b"i" * 4096)[0] == NFS3_OK
        handoffs = metric(daemon, "netswap_c_loop_handoffs_total", reason="nfs_python")
        end = time.monotonic() + 3
        while time.monotonic() < end:
            assert alpha.read(swap, 0, 4096)[0] == NFS3_OK
            time.sleep(0.05)
        assert metric(daemon, "netswap_c_loop_handoffs_total", reason="nfs_python") == handoffs
        assert metric(daemon, "netswap_nfs_node_releases_total", reason="idle") == 0
        # Quiet: released as idle, and the next call (Python's: not attached) attaches again.
        wait_until(lambda: metric(daemon, "netswap_nfs_node_releases_total", reason="idle") >= 1,
                   timeout=15, interval=0.1, what="the node released for idleness")
        assert alpha.read(swap, 0, 4096)[0] == NFS3_OK
        assert metric(daemon, "netswap_c_loop_handoffs_total", reason="nfs_python") > handoffs
        assert "node 'alpha' attached (swap-file activity)" in daemon.log().split(
            "released: no swap-file call")[-1]
        alpha.close()
    finally:
        stop_clean(daemon)


@pytest.mark.parametrize("how", ["stop", "client_gone"])
def test_calls_in_flight_end_cleanly_at_stop_or_when_the_client_goes(tmp_path, how):
    daemon = nfs_daemon(tmp_path, c_loop=True)
    stopped = False
    try:
        free = metric(daemon, "netswap_pool_free_bytes")
        alpha = Nfs(daemon, ALPHA)
        swap = alpha.swap_handle("alpha")
        assert alpha.write(swap, 0, b"f" * 4096)[0] == NFS3_OK
        # Many READs of max_io, replies never read: the socket fills, the loop's replies
        # queue behind Python's sender, then the reader stops at the in-flight limit.
        records = b"".join(
            rpc.fragment_header(len(record)) + record
            for record in (call_record(0x5000 + index, READ, read_args(swap, 0, MAX_IO))
                           for index in range(200)))
        alpha.nfs.sock.setblocking(False)
        try:
            alpha.nfs.sock.send(records)
        except BlockingIOError:
            pass
        record = call_record(0x6000, WRITE, write_args(swap, 0, b"h" * 8192))
        try:
            alpha.nfs.sock.send(rpc.fragment_header(len(record)) + record[:5000])  # half
        except BlockingIOError:
            pass
        time.sleep(0.5)
        if how == "stop":
            stopped = True
            stop_clean(daemon)
            return
        alpha.nfs.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        alpha.close()  # reset, with replies unread
        wait_until(lambda: metric(daemon, "netswap_pool_free_bytes") == free, timeout=10,
                   what="pool bytes still held")
        # Others carry on.
        other = Nfs(daemon, ALPHA)
        handle = other.swap_handle("alpha")
        for _ in range(3):
            assert other.read(handle, 0, 4096)[:2] == (NFS3_OK, b"f" * 4096)
        other.close()
    finally:
        if not stopped:
            stop_clean(daemon)


# Scratch files -----------------------------------------------------------------------------

SCRATCH_SERVED = "netswap_nfs_c_loop_scratch_calls_total"


def scratch_served(daemon) -> tuple:
    return tuple(metric(daemon, SCRATCH_SERVED, procedure=name) for name in ("read", "write"))


def create_scratch(client: Nfs, name: str) -> bytes:
    root = client.root("/scratch")
    u = client.proc(CREATE, xdr(("o", root), ("o", name.encode()), ("u", 0)) + sattr3())
    assert u.uint() == NFS3_OK and u.bool()
    return bytes(u.opaque(64))


def scratch_calls(handle: bytes) -> list:
    rng = random.Random(5)
    items = [
        (WRITE, write_args(handle, 0, rng.randbytes(4096))),  # the first: Python's
        (WRITE, write_args(handle, 4096, rng.randbytes(4096), UNSTABLE)),
        (WRITE, write_args(handle, 8192, rng.randbytes(1001), DATA_SYNC)),
        (WRITE, write_args(handle, 20000, rng.randbytes(3000), UNSTABLE)),  # past a hole
        (WRITE, write_args(handle, 16384, b"")),
        (WRITE, write_args(handle, MAX_IO, rng.randbytes(MAX_IO), UNSTABLE)),
        (READ, read_args(handle, 0, 4096)),
        (READ, read_args(handle, 8192, 1001)),
        (READ, read_args(handle, 12000, 10000)),  # through the hole
        (READ, read_args(handle, 0, 200000)),  # capped at max_io
        (READ, read_args(handle, 16384, 0)),
        (READ, read_args(handle, 2 * MAX_IO, 4096)),  # at the end: nothing, eof
        (READ, read_args(handle, 2 * MAX_IO - 100, 4096)),  # across the end
        (READ, read_args(handle, 2**63, 4096)),
        (WRITE, write_args(handle, 2**63 - 1000, rng.randbytes(4096))),  # FBIG
        (WRITE, write_args(handle, 2**64 - 4096, rng.randbytes(4096))),
        (WRITE, write_args(handle, 0, rng.randbytes(4096), count=4000)),  # GARBAGE_ARGS
        (WRITE, write_args(handle, 0, rng.randbytes(4096), stable=3)),
        (WRITE, write_args(handle, 0, rng.randbytes(MAX_IO + 4))),  # over max_io
        (COMMIT, xdr(("o", handle), ("h", 0), ("u", 0))),
        (GETATTR, xdr(("o", handle))),
        # Grows it.
        (WRITE, write_args(handle, 2 * MAX_IO, rng.randbytes(4096), FILE_SYNC)),
        (READ, read_args(handle, 2 * MAX_IO - 1000, 8192)),
    ]
    return items + [(proc, args, None) for proc, args in items[6:9]]  # AUTH_NONE too


def run_scratch_stream(tmp_path, c_loop: bool):
    """The scratch calls on a connection that is no node's and on node alpha's: (masked
    replies, scratch calls served in C, the statistics while the connections are open)."""
    tmp_path.mkdir()
    daemon = nfs_daemon(tmp_path, c_loop)
    try:
        replies, clients = [], []
        for source in (STRANGER, ALPHA):
            client = Nfs(daemon, source)
            clients.append(client)
            handle = create_scratch(client, f"file-{source}")
            for xid, item in enumerate(scratch_calls(handle), 0x2000):
                proc, args, *cred = item
                record = call_record(xid, proc, args, *(cred or [NOBODY]))
                client.nfs.send_record(record)
                reply = bytearray(masked(proc, client.nfs.receive_record()))
                at, _ = _fattr3_at(proc, reply)
                if at is not None:
                    # `used`: where ext4 puts a block of its extent tree depends on the
                    # disk's free space and on when writeback ran, not on who asked.
                    reply[at + 28:at + 36] = bytes(8)
                replies.append(bytes(reply))
        served = scratch_served(daemon)
        live = settled_counts(daemon)
        for client in clients:
            client.close()
        return replies, served, live
    finally:
        stop_clean(daemon)


def test_scratch_calls_are_served_in_c_with_the_replies_python_gives(tmp_path):
    replies_on, served_on, live_on = run_scratch_stream(tmp_path / "on", c_loop=True)
    replies_off, served_off, live_off = run_scratch_stream(tmp_path / "off", c_loop=False)
    assert len(replies_on) == len(replies_off)
    for index, (c, python) in enumerate(zip(replies_on, replies_off)):
        assert c == python, f"call {index}: {c.hex()} != {python.hex()}"
    assert live_on == live_off
    # Per connection: every READ (12, three with AUTH_NONE) and the six plain WRITEs after
    # the first (the FBIGs and the malformed ones are Python's answers).
    assert served_on == (24, 12), served_on
    assert served_off == (0, 0)


def test_a_scratch_file_that_leaves_its_path_is_pythons_again(tmp_path):
    daemon = nfs_daemon(tmp_path, c_loop=True)
    try:
        client = Nfs(daemon, STRANGER)
        handle = create_scratch(client, "kept.bin")
        scratch = daemon.state_dir / "nfs-scratch"
        data = os.urandom(8192)
        assert client.write(handle, 0, data)[0] == NFS3_OK  # Python's: registers it
        assert client.read(handle, 0, 8192)[:2] == (NFS3_OK, data)
        assert client.write(handle, 8192, data)[0] == NFS3_OK
        assert scratch_served(daemon) == (1, 1)
        # A WRITE the loop served carries the file's attributes, `used` and times included:
        # what Python's GETATTR reports right after.
        client.nfs.send_record(call_record(0x4000, WRITE, write_args(handle, 0, data)))
        written = client.nfs.receive_record()
        client.nfs.send_record(call_record(0x4001, GETATTR, xdr(("o", handle))))
        assert fattr3_of(WRITE, written) == fattr3_of(GETATTR, client.nfs.receive_record())
        assert scratch_served(daemon) == (1, 2)
        # Renamed: Python finds it by its inode (as without the loop), then the loop serves
        # it under its new path.
        os.rename(scratch / "kept.bin", scratch / "moved.bin")
        assert client.read(handle, 0, 8192)[:2] == (NFS3_OK, data)
        assert scratch_served(daemon) == (1, 2)
        assert client.read(handle, 8192, 8192)[:2] == (NFS3_OK, data)
        assert scratch_served(daemon) == (2, 2)
        # Removed: stale, through the loop's connection too, and its space is given back
        # (no descriptor of the daemon's keeps the removed file).
        os.unlink(scratch / "moved.bin")
        assert client.read(handle, 0, 4096)[0] == NFS3ERR_STALE
        assert client.write(handle, 0, data)[0] == NFS3ERR_STALE
        assert scratch_served(daemon) == (2, 2)
        fds = f"/proc/{daemon.process.pid}/fd"
        wait_until(lambda: not any("moved.bin" in os.readlink(f"{fds}/{fd}")
                                   for fd in os.listdir(fds)),
                   timeout=10, what="a descriptor of the removed file still open")
        # Replaced by another file under its name: stale.
        other = create_scratch(client, "swapped.bin")
        assert client.write(other, 0, data)[0] == NFS3_OK
        assert client.read(other, 0, 4096)[:2] == (NFS3_OK, data[:4096])
        assert scratch_served(daemon) == (3, 2)
        (scratch / "new.bin").write_bytes(b"other data")
        os.replace(scratch / "new.bin", scratch / "swapped.bin")
        assert client.read(other, 0, 4096)[0] == NFS3ERR_STALE
        assert scratch_served(daemon) == (3, 2)
        client.close()
    finally:
        stop_clean(daemon)


def test_a_scratch_file_open_read_only_has_its_writes_answered_by_python(tmp_path):
    # A program running from the export cannot be opened read-write (ETXTBSY): the loop
    # serves its READs through the read-only descriptor and leaves every WRITE to Python,
    # which gets the file system's answer (no write attempted in C, no hand-over for it).
    daemon = nfs_daemon(tmp_path, c_loop=True)
    program = daemon.state_dir / "nfs-scratch" / "sleeper"
    shutil.copy(shutil.which("sleep"), program)
    program.chmod(0o755)
    running = subprocess.Popen([str(program), "60"])
    try:
        client = Nfs(daemon, STRANGER)
        status, handle = client.lookup(client.root("/scratch"), "sleeper")
        assert status == NFS3_OK
        for _ in range(3):  # the first Python's, then the loop's
            status, data, _ = client.read(handle, 0, 4)
            assert (status, data) == (NFS3_OK, b"\x7fELF")
        assert scratch_served(daemon) == (2, 0)
        for _ in range(2):
            assert client.write(handle, 0, b"oops")[0] != NFS3_OK
        assert scratch_served(daemon) == (2, 0)
        assert metric(daemon, "netswap_c_loop_handoffs_total", reason="nfs_io_error") == 0
        assert program.read_bytes()[:4] == b"\x7fELF"
        client.close()
    finally:
        running.kill()
        running.wait()
        stop_clean(daemon)


def test_a_scratch_write_whose_file_leaves_while_its_body_comes_in_is_stale(tmp_path):
    # The loop checks the path when it peeks at a record; a WRITE whose body then comes in
    # slowly is checked again before it is written, as Python resolves a handle only once
    # the record is in: the file removed meanwhile, the client gets NFS3ERR_STALE.
    daemon = nfs_daemon(tmp_path, c_loop=True)
    try:
        client = Nfs(daemon, STRANGER)
        handle = create_scratch(client, "brief.bin")
        assert client.write(handle, 0, b"a" * 4096)[0] == NFS3_OK  # Python's
        assert client.write(handle, 0, b"b" * 4096)[0] == NFS3_OK  # the loop's
        assert scratch_served(daemon) == (0, 1)
        record = call_record(0x3000, WRITE, write_args(handle, 0, b"c" * 4096))
        framed = rpc.fragment_header(len(record)) + record
        client.nfs.sock.sendall(framed[:1024])  # enough for the loop to decide on it
        time.sleep(0.5)  # it has peeked and waits for the rest
        os.unlink(daemon.state_dir / "nfs-scratch" / "brief.bin")
        client.nfs.sock.sendall(framed[1024:])
        reply = client.nfs.receive_record()
        assert struct.unpack_from(">II", reply, 20) == (RC.SUCCESS, NFS3ERR_STALE)
        assert metric(daemon, "netswap_c_loop_handoffs_total", reason="nfs_scratch_moved") == 1
        assert scratch_served(daemon) == (0, 1)
        client.close()
    finally:
        stop_clean(daemon)
