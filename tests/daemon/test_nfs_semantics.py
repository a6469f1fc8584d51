"""NFSv3 procedures as RFC 1813 defines them, beyond what swapon needs (issue 7): READDIR and
READDIRPLUS paging (§3.3.16, §3.3.17), CREATE modes (§3.3.8), SETATTR owner, times and guard
(§3.3.2); and the NFS side's connection limits, keepalive and stop.

Against a live netswapd: libnfs's nfs-ls where a real client shows the behaviour, else the
raw RPC client of support/nfs.py (127.0.0.1 is node alpha, 127.0.0.2 node beta).
"""

from __future__ import annotations

import os
import re
import signal
import stat
import struct
import subprocess
import threading
import time
from typing import Optional

import pytest

from netswap.rpc import constants as RC
from netswap.rpc import message as rpc
from netswap.rpc.xdr import Unpacker
from support.daemon import stop_clean
from support.metrics import metric
from support.nfs import (
    ALPHA, BETA, Closed, CREATE, CRED, FATTR3_BYTES, FILE_SYNC, GETATTR, MOUNT_PROG, MOUNT_VERS,
    Nfs, NFS3_OK, NFS_PROG, NFS_VERS, READDIR, RpcClient, SETATTR, STRANGER, WRITE, run, skip_wcc, start_nfs_daemon,
    url, xdr,
)
from support.wait import wait_until

READDIRPLUS = 17
UNCHECKED, GUARDED, EXCLUSIVE = 0, 1, 2
DONT_CHANGE, SET_TO_SERVER_TIME, SET_TO_CLIENT_TIME = 0, 1, 2
NFS3ERR_EXIST, NFS3ERR_ACCES = 17, 13
NFS3ERR_NOT_SYNC, NFS3ERR_BAD_COOKIE, NFS3ERR_TOOSMALL = 10002, 10003, 10005
HANDLE_BYTES = 31  # ours: see nfs/handles.py


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    running = start_nfs_daemon(tmp_path_factory.mktemp("nfs-semantics"))
    yield running
    stop_clean(running)


@pytest.fixture
def alpha(daemon):
    client = Nfs(daemon, ALPHA)
    yield client
    client.close()


@pytest.fixture
def scratch_dir(daemon):
    """The scratch export's directory, empty at the start of the test and after it."""
    directory = daemon.state_dir / "nfs-scratch"
    for old in directory.iterdir():
        old.unlink()
    yield directory
    for old in directory.iterdir():
        old.unlink()


# --------------------------------------------------------------------------- helpers


def fattr3(u: Unpacker) -> dict:
    fields = struct.unpack(">5I2Q2I2Q6I", bytes(u.fixed_opaque(FATTR3_BYTES)))
    kind, mode, nlink, uid, gid, size, used, _, _, fsid, fileid, *times = fields
    ns = [times[i] * 1_000_000_000 + times[i + 1] for i in (0, 2, 4)]
    return {"mode": mode, "uid": uid, "gid": gid, "size": size, "fileid": fileid,
            "atime": ns[0], "mtime": ns[1], "ctime": ns[2]}


def getattr_of(client: Nfs, handle: bytes) -> dict:
    u = client.proc(GETATTR, xdr(("o", handle)))
    assert u.uint() == NFS3_OK
    return fattr3(u)


def time_how(value) -> list:
    """A set_atime / set_mtime: None (leave it), "server", or nanoseconds."""
    if value is None:
        return [("u", DONT_CHANGE)]
    if value == "server":
        return [("u", SET_TO_SERVER_TIME)]
    return [("u", SET_TO_CLIENT_TIME), ("u", value // 1_000_000_000),
            ("u", value % 1_000_000_000)]


def sattr(mode=None, uid=None, gid=None, size=None, atime=None, mtime=None) -> bytes:
    items = []
    for value, kind in ((mode, "u"), (uid, "u"), (gid, "u"), (size, "h")):
        items.append(("b", value is not None))
        if value is not None:
            items.append((kind, value))
    return xdr(*items, *time_how(atime), *time_how(mtime))


def create(client: Nfs, directory: bytes, name: str, how: int = UNCHECKED,
           attributes: bytes = b"", verifier: bytes = b"") -> tuple[int, Optional[bytes]]:
    body = xdr(("f", verifier)) if how == EXCLUSIVE else (attributes or sattr())
    u = client.proc(CREATE, xdr(("o", directory), ("o", name.encode()), ("u", how)) + body)
    status = u.uint()
    if status != NFS3_OK:
        return status, None
    assert u.bool()
    return status, bytes(u.opaque(64))


def setattr_(client: Nfs, handle: bytes, attributes: bytes, guard: Optional[int] = None) -> int:
    guard_items = [("b", False)] if guard is None else [
        ("b", True), ("u", guard // 1_000_000_000), ("u", guard % 1_000_000_000)]
    u = client.proc(SETATTR, xdr(("o", handle)) + attributes + xdr(*guard_items))
    status = u.uint()
    skip_wcc(u)
    u.done()
    return status


def readdir_page(client: Nfs, directory: bytes, cookie: int, verifier: bytes, count: int,
                 plus: bool = False, dircount: Optional[int] = None):
    """One READDIR (or READDIRPLUS with `count` as maxcount): (status, verifier,
    [(name, cookie)], eof, size of the results)."""
    if plus:
        args = xdr(("o", directory), ("h", cookie), ("f", verifier),
                   ("u", count if dircount is None else dircount), ("u", count))
    else:
        args = xdr(("o", directory), ("h", cookie), ("f", verifier), ("u", count))
    reply = client.nfs.call(NFS_PROG, NFS_VERS, READDIRPLUS if plus else READDIR, args)
    assert reply.accepted and reply.stat == RC.SUCCESS, reply
    size = len(reply.results)
    u = Unpacker(reply.results)
    status = u.uint()
    if u.bool():
        u.fixed_opaque(FATTR3_BYTES)
    if status != NFS3_OK:
        u.done()
        return status, None, [], None, size
    cookieverf = bytes(u.fixed_opaque(8))
    entries = []
    while u.bool():
        u.uhyper()
        name = bytes(u.string()).decode()
        entries.append((name, u.uhyper()))
        if plus:
            assert u.bool()  # attributes
            u.fixed_opaque(FATTR3_BYTES)
            assert u.bool()  # handle
            assert len(u.opaque(64)) == HANDLE_BYTES
    eof = u.bool()
    u.done()
    return status, cookieverf, entries, eof, size


def walk(client: Nfs, directory: bytes, count: int, plus: bool = False, between=None):
    """Every page of a listing: (names in order, pages). `between(page_number)` runs after
    each page (to change the directory mid-listing)."""
    names, cookie, verifier, pages = [], 0, bytes(8), 0
    while True:
        status, verifier, entries, eof, size = readdir_page(client, directory, cookie,
                                                            verifier, count, plus)
        assert status == NFS3_OK, status
        assert size <= count, (size, count)  # within the client's limit
        pages += 1
        names += [name for name, _ in entries]
        if eof:
            return names, pages
        assert entries, "a page that is not the last holds an entry"
        cookie = entries[-1][1]
        if between is not None:
            between(pages)


def long_name(index: int) -> str:
    return f"{index:05d}-" + "n" * 240


# --------------------------------------------------------------------------- READDIR


def test_nfs_ls_lists_3000_long_named_files_completely(daemon, scratch_dir):
    names = {long_name(i) for i in range(3000)}
    for name in names:
        (scratch_dir / name).touch()
    listing = run("nfs-ls", url(daemon, "/scratch")).stdout.decode()
    listed = [line.split()[-1] for line in listing.splitlines() if line.strip()]
    listed = [name for name in listed if name not in (".", "..")]
    assert len(listed) == len(set(listed)) == 3000
    assert set(listed) == names
    # libnfs walked it in pages (each within its limit), not in one reply.
    assert metric(daemon, "netswap_nfs_calls_total", procedure="readdirplus") > 10


@pytest.mark.parametrize("plus", [False, True], ids=["readdir", "readdirplus"])
def test_small_pages_walk_every_entry_exactly_once(daemon, scratch_dir, alpha, plus):
    names = {long_name(i) for i in range(300)}
    for name in names:
        (scratch_dir / name).touch()
    listed, pages = walk(alpha, alpha.root("/scratch"), 2048, plus)
    assert len(listed) == len(set(listed)) == 300
    assert set(listed) == names
    assert pages > 10


def test_a_listing_changed_between_pages_skips_and_repeats_nothing_that_stayed(
        daemon, scratch_dir, alpha):
    names = [long_name(i) for i in range(200)]
    for name in names:
        (scratch_dir / name).touch()
    removed = set(names[::7])
    added = {f"added-{i}" for i in range(50)}

    def churn(page: int) -> None:
        if page == 2:
            for name in removed:
                (scratch_dir / name).unlink()
            for name in added:
                (scratch_dir / name).touch()

    listed, _ = walk(alpha, alpha.root("/scratch"), 2048, between=churn)
    assert len(listed) == len(set(listed))  # nothing twice
    stayed = set(names) - removed
    assert stayed <= set(listed)  # nothing that was there all along is missed
    assert set(listed) <= set(names) | added


def test_a_stale_cookie_verifier_is_bad_cookie(daemon, scratch_dir, alpha):
    for i in range(40):
        (scratch_dir / long_name(i)).touch()
    scratch = alpha.root("/scratch")
    status, verifier, entries, eof, _ = readdir_page(alpha, scratch, 0, bytes(8), 1024)
    assert status == NFS3_OK and entries and not eof
    cookie = entries[-1][1]
    stale = bytes(b ^ 0xFF for b in verifier)
    assert readdir_page(alpha, scratch, cookie, stale, 1024)[0] == NFS3ERR_BAD_COOKIE
    assert readdir_page(alpha, scratch, cookie, stale, 1024, plus=True)[0] == NFS3ERR_BAD_COOKIE
    # The verifier handed out resumes the listing where the page ended.
    status, _, more, _, _ = readdir_page(alpha, scratch, cookie, verifier, 1024)
    assert status == NFS3_OK and more and not {n for n, _ in more} & {n for n, _ in entries}


@pytest.mark.parametrize("plus", [False, True], ids=["readdir", "readdirplus"])
def test_a_count_too_small_for_one_entry_is_toosmall(daemon, scratch_dir, alpha, plus):
    (scratch_dir / long_name(0)).touch()
    scratch = alpha.root("/scratch")
    # Room for the reply's fixed part (status, attributes, verifier, list end, eof) and
    # less than one entry with a 246-byte name.
    status = readdir_page(alpha, scratch, 0, bytes(8), 200, plus)[0]
    assert status == NFS3ERR_TOOSMALL
    if plus:  # dircount alone too small: the entries' names do not fit in it
        status = readdir_page(alpha, scratch, 0, bytes(8), 8192, plus, dircount=64)[0]
        assert status == NFS3ERR_TOOSMALL


@pytest.mark.parametrize("plus", [False, True], ids=["readdir", "readdirplus"])
def test_swap_listing_pages_show_a_node_only_its_own_file(daemon, plus):
    for source, node in ((ALPHA, "alpha"), (BETA, "beta")):
        client = Nfs(daemon, source)
        try:
            client.swap_handle(node)  # the node's file exists
            listed, _ = walk(client, client.root("/swap"), 512, plus)
            assert listed == [node]
        finally:
            client.close()


# --------------------------------------------------------------------------- CREATE


def test_create_applies_the_requested_size_and_mode(daemon, scratch_dir, alpha):
    scratch = alpha.root("/scratch")
    status, handle = create(alpha, scratch, "sized", UNCHECKED, sattr(mode=0o666, size=12345))
    assert status == NFS3_OK
    st = (scratch_dir / "sized").stat()
    assert (st.st_size, stat.S_IMODE(st.st_mode)) == (12345, 0o666)
    assert getattr_of(alpha, handle)["size"] == 12345
    # UNCHECKED over an existing file: the size applies (open with O_TRUNC), the mode not.
    (scratch_dir / "sized").write_bytes(b"x" * 1000)
    assert create(alpha, scratch, "sized", UNCHECKED, sattr(mode=0o600, size=10))[0] == NFS3_OK
    st = (scratch_dir / "sized").stat()
    assert (st.st_size, stat.S_IMODE(st.st_mode)) == (10, 0o666)


def test_guarded_create_of_an_existing_name_is_exist(daemon, scratch_dir, alpha):
    scratch = alpha.root("/scratch")
    assert create(alpha, scratch, "once", GUARDED, sattr(size=5))[0] == NFS3_OK
    (scratch_dir / "once").write_bytes(b"kept")
    assert create(alpha, scratch, "once", GUARDED, sattr(size=0))[0] == NFS3ERR_EXIST
    assert (scratch_dir / "once").read_bytes() == b"kept"


def test_exclusive_create_is_idempotent_for_its_verifier_only(daemon, scratch_dir, alpha):
    scratch = alpha.root("/scratch")
    verifier, other = os.urandom(8), os.urandom(8)
    status, handle = create(alpha, scratch, "excl", EXCLUSIVE, verifier=verifier)
    assert status == NFS3_OK
    # The reply was lost, the client sends the same call again: the same file, success.
    assert create(alpha, scratch, "excl", EXCLUSIVE, verifier=verifier) == (NFS3_OK, handle)
    # Another client's exclusive create of the same name, or a plain file already there.
    assert create(alpha, scratch, "excl", EXCLUSIVE, verifier=other)[0] == NFS3ERR_EXIST
    (scratch_dir / "plain").touch()
    assert create(alpha, scratch, "plain", EXCLUSIVE, verifier=verifier)[0] == NFS3ERR_EXIST
    # The client then sets the real times (§3.3.8); the verifier is gone with them.
    assert setattr_(alpha, handle, sattr(atime="server", mtime="server")) == NFS3_OK
    assert create(alpha, scratch, "excl", EXCLUSIVE, verifier=verifier)[0] == NFS3ERR_EXIST


# --------------------------------------------------------------------------- SETATTR


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_setattr_applies_owner_and_times(daemon, scratch_dir, alpha):
    scratch = alpha.root("/scratch")
    _, handle = create(alpha, scratch, "owned", GUARDED)
    path = scratch_dir / "owned"
    assert setattr_(alpha, handle, sattr(uid=1234, gid=5678)) == NFS3_OK
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (getattr_of(alpha, handle)["uid"], getattr_of(alpha, handle)["gid"]) == (1234, 5678)

    given = 1_000_000_000 * 1_000_000_000 + 123_456_789  # 2001-09-09, and some nanoseconds
    assert setattr_(alpha, handle, sattr(mtime=given)) == NFS3_OK
    assert path.stat().st_mtime_ns == given
    os.utime(path, ns=(given, given))
    before = time.time_ns()
    assert setattr_(alpha, handle, sattr(atime="server")) == NFS3_OK
    st = path.stat()
    assert st.st_atime_ns >= before - 1_000_000_000  # the server's clock (coarse ticks)
    assert st.st_mtime_ns == given  # the time not asked for is left as it was


def test_setattr_guard_applies_only_on_the_ctime_the_client_saw(daemon, scratch_dir, alpha):
    scratch = alpha.root("/scratch")
    _, handle = create(alpha, scratch, "guarded", GUARDED)
    ctime = getattr_of(alpha, handle)["ctime"]
    assert setattr_(alpha, handle, sattr(mode=0o600), guard=ctime + 1) == NFS3ERR_NOT_SYNC
    assert stat.S_IMODE((scratch_dir / "guarded").stat().st_mode) != 0o600  # not applied
    assert setattr_(alpha, handle, sattr(mode=0o600), guard=ctime) == NFS3_OK
    assert stat.S_IMODE((scratch_dir / "guarded").stat().st_mode) == 0o600


@pytest.mark.parametrize("attributes, of_directory", [
    (sattr(uid=1234), True), (sattr(gid=1234), True), (sattr(mode=0o777), True),
    (sattr(size=0), False)], ids=["uid", "gid", "mode", "size"])
def test_a_swap_file_and_the_swap_directory_keep_their_owner_and_mode(daemon, alpha,
                                                                     attributes, of_directory):
    assert setattr_(alpha, alpha.swap_handle("alpha"), attributes) == NFS3ERR_ACCES
    path = daemon.state_dir / "nfs-swap" / "alpha"
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    if of_directory:  # the directory that holds every node's file
        assert setattr_(alpha, alpha.root("/swap"), attributes) == NFS3ERR_ACCES
        st = path.parent.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o700)


# --------------------------------------------------------------------------- connections


def serves(client: RpcClient, program: tuple[int, int] = (NFS_PROG, NFS_VERS)) -> bool:
    """Does the server answer a NULL call on this connection (False: it closed it)?"""
    try:
        return client.call(*program, 0).stat == RC.SUCCESS
    except (Closed, ConnectionError):
        return False


def test_connections_past_the_limits_are_closed_at_accept_logged_and_counted(tmp_path):
    daemon = start_nfs_daemon(tmp_path, "max_connections = 3\nmax_connections_per_client = 2")
    clients = []
    try:
        def connect(source: str, port: int = daemon.nfs_port) -> RpcClient:
            clients.append(RpcClient(port, source))
            return clients[-1]

        first = connect(ALPHA)
        mount = connect(ALPHA, daemon.mount_port)  # alpha's second, on the MOUNT port
        # Answered, so accepted and counted: the MOUNT port has an acceptor of its own, and
        # the third connection must not race it.
        assert serves(first) and serves(mount, (MOUNT_PROG, MOUNT_VERS))
        third = connect(ALPHA)  # alpha's third: over the per-client limit (NFS + MOUNT)
        assert not serves(third)
        beta = connect(BETA)
        assert serves(beta)
        stranger = connect(STRANGER)  # the fourth in all: over max_connections
        assert not serves(stranger)
        assert serves(first) and serves(beta)  # the admitted ones carry on
        first.close()
        # A closed connection gives its place back.
        wait_until(lambda: serves(connect(ALPHA)), timeout=10,
                   what="the limit did not free the closed place")
        refused = lambda reason: metric(daemon, "netswap_connections_refused_total",  # noqa
                                        reason=reason)
        assert refused("nfs.max_connections_per_client") >= 1
        assert refused("nfs.max_connections") >= 1
        log = daemon.log()
        assert "refusing connections from 127.0.0.1: nfs.max_connections_per_client" in log
        assert "refusing connections from 127.0.0.3: nfs.max_connections reached" in log
    finally:
        for client in clients:
            client.close()
        stop_clean(daemon)


def test_nfs_connections_have_tcp_keepalive(tmp_path):
    daemon = start_nfs_daemon(tmp_path, 'keepalive = "7s"')
    client = RpcClient(daemon.nfs_port, ALPHA)
    try:
        assert serves(client)
        port = client.sock.getsockname()[1]
        # The server's end of this connection: its keepalive timer, armed at 7 s idle.
        out = subprocess.run(["ss", "-tnoH", "state", "established",
                              f"( sport = :{daemon.nfs_port} and dport = :{port} )"],
                             capture_output=True, text=True, check=True).stdout
        assert re.search(r"timer:\(keepalive,", out), out
        assert not re.search(r"timer:\(keepalive,[0-9]{2,}", out), out  # below 10 s
    finally:
        client.close()
        stop_clean(daemon)


def test_stop_waits_for_calls_in_flight_before_closing_the_swap_files(tmp_path):
    """SIGTERM while nodes stream FILE_SYNC writes to their swap files: every call the
    daemon took finishes on open files before stop returns (no EBADF, no calls on closed
    swap files, no tracebacks), and the daemon says it stopped clean."""
    daemon = start_nfs_daemon(tmp_path, "")
    stop = threading.Event()
    errors: list[BaseException] = []
    block = os.urandom(64 * 1024)

    def stream(source: str, node: str) -> None:
        client = Nfs(daemon, source)
        try:
            handle = client.swap_handle(node)
            connection = client.nfs
            in_flight = 0
            offset = 0
            while not stop.is_set():
                # Several calls in flight, so the daemon's workers always hold some.
                while in_flight < 16:
                    args = xdr(("o", handle), ("h", offset), ("u", len(block)),
                               ("u", FILE_SYNC), ("o", block))
                    xid = connection.next_xid()
                    connection.send_record(
                        rpc.call_header(xid, NFS_PROG, NFS_VERS, WRITE, CRED) + args)
                    offset = (offset + len(block)) % (4 * 1024 * 1024)
                    in_flight += 1
                connection.receive_record()
                in_flight -= 1
        except (Closed, ConnectionError, OSError):
            pass  # the daemon stopped under us: expected
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=stream, args=(source, node))
               for source, node in ((ALPHA, "alpha"), (BETA, "beta"))]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: metric(daemon, "netswap_nfs_calls_total", procedure="write") >= 200,
                   timeout=30, what=daemon.log)
        daemon.process.send_signal(signal.SIGTERM)
        code = daemon.process.wait(60)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    log = daemon.log()
    assert not errors, errors
    assert "Traceback" not in log, log
    assert "Bad file descriptor" not in log, log
    final = log[log.rindex("final counters"):]
    assert "internal_errors" not in final and "nfs_errors" not in final, final
    assert code == 0, log
