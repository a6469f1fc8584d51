"""Defects found in a review of the NFS side, each against a live netswapd with the raw RPC
client of test_nfs_hostile: what a call a client may send does to the server's files and log.
"""

from __future__ import annotations

import os
import stat

import pytest

from netswap.rpc import constants as RC
from test_nfs_hostile import (ALPHA, CREATE, GETATTR, LOOKUP, NFS3_OK, NFS_PROG, NFS_VERS,
                              READDIR, SETATTR, Nfs, sattr3, start_nfs_daemon, stop_clean, xdr)

NFS3ERR_ACCES, NFS3ERR_INVAL, NFS3ERR_NAMETOOLONG = 13, 22, 63
UNCHECKED, GUARDED = 0, 1


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    daemon = start_nfs_daemon(tmp_path_factory.mktemp("nfs-review"))
    client = None
    try:
        client = Nfs(daemon, ALPHA)
        yield daemon, client, client.root("/scratch")
    finally:
        if client is not None:
            client.close()
        stop_clean(daemon)


def scratch_dir(daemon):
    return daemon.state_dir / "nfs-scratch"


def create(client, directory: bytes, name: bytes, how: int = UNCHECKED,
           attributes: bytes = None) -> tuple[int, bytes]:
    u = client.proc(CREATE, xdr(("o", directory), ("o", name), ("u", how))
                    + (sattr3() if attributes is None else attributes))
    status = u.uint()
    return status, (bytes(u.opaque(64)) if status == NFS3_OK and u.bool() else None)


def sattr3_ids(uid=None, gid=None, size=None, mode=None) -> bytes:
    items = [("b", mode is not None), *([("u", mode)] if mode is not None else []),
             ("b", uid is not None), *([("u", uid)] if uid is not None else []),
             ("b", gid is not None), *([("u", gid)] if gid is not None else []),
             ("b", size is not None), *([("h", size)] if size is not None else []),
             ("u", 0), ("u", 0)]
    return xdr(*items)


def test_refused_setattr_changes_nothing(served):
    """A SETATTR refused for its uid (4294967295, chown's "leave it") must not have
    truncated the file first: an error reply means the call was not applied."""
    daemon, client, scratch = served
    status, handle = create(client, scratch, b"keep.bin")
    assert status == NFS3_OK
    path = scratch_dir(daemon) / "keep.bin"
    path.write_bytes(b"x" * 5000)
    u = client.proc(SETATTR, xdr(("o", handle)) + sattr3_ids(uid=0xFFFF_FFFF, size=0)
                    + xdr(("b", False)))
    assert u.uint() == NFS3ERR_INVAL
    assert path.stat().st_size == 5000


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o6777])
def test_no_setuid_or_setgid_file_on_the_server(served, mode):
    """The daemon runs as root and every client may write the scratch export: a file it lets
    a client mark set-user/group-ID would be a root-owned setuid program on the server."""
    daemon, client, scratch = served
    name = f"suid-{mode:o}".encode()
    status, handle = create(client, scratch, name, GUARDED, sattr3(mode=mode))
    path = scratch_dir(daemon) / name.decode()
    if status == NFS3_OK:
        assert not path.stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    else:
        assert status == NFS3ERR_ACCES
    status, handle = create(client, scratch, name + b".later")
    assert status == NFS3_OK
    u = client.proc(SETATTR, xdr(("o", handle)) + sattr3(mode=mode) + xdr(("b", False)))
    assert u.uint() == NFS3ERR_ACCES
    assert not (scratch_dir(daemon) / (name + b".later").decode()).stat().st_mode & (
        stat.S_ISUID | stat.S_ISGID)


def test_listed_names_that_are_not_utf8_can_be_looked_up(served):
    """Names are bytes on the wire and on disk: READDIR lists a file by its name's bytes,
    and LOOKUP of exactly those bytes must find that file (not NOENT, not another one)."""
    daemon, client, scratch = served
    raw = b"caf\xe9.bin"
    with open(os.path.join(os.fsencode(scratch_dir(daemon)), raw), "wb") as f:
        f.write(b"latin-1 named")
    u = client.proc(READDIR, xdr(("o", scratch), ("h", 0), ("f", bytes(8)), ("u", 65536)))
    assert u.uint() == NFS3_OK
    if u.bool():
        u.fixed_opaque(84)
    u.fixed_opaque(8)
    names = []
    while u.bool():
        u.uhyper()
        names.append(u.string())
        u.uhyper()
    assert raw in names
    u = client.proc(LOOKUP, xdr(("o", scratch), ("o", raw)))
    assert u.uint() == NFS3_OK
    handle = bytes(u.opaque(64))
    u = client.proc(GETATTR, xdr(("o", handle)))
    assert u.uint() == NFS3_OK
    attributes = bytes(u.fixed_opaque(84))
    assert int.from_bytes(attributes[20:28], "big") == len(b"latin-1 named")


def test_distinct_byte_names_make_distinct_files(served):
    """Two names that differ only in bytes that are not UTF-8 are two files: a GUARDED
    CREATE of the second must not find the first."""
    daemon, client, scratch = served
    assert create(client, scratch, b"odd-\xff", GUARDED)[0] == NFS3_OK
    assert create(client, scratch, b"odd-\xfe", GUARDED)[0] == NFS3_OK
    on_disk = set(os.listdir(os.fsencode(scratch_dir(daemon))))
    assert {b"odd-\xff", b"odd-\xfe"} <= on_disk


@pytest.mark.parametrize("proc", [LOOKUP, CREATE])
def test_long_name_is_nametoolong_not_garbage(served, proc):
    """filename3 is an unbounded string: a name over NAME_MAX is a well-formed call that
    gets NFS3ERR_NAMETOOLONG (with its failure body), not GARBAGE_ARGS."""
    daemon, client, scratch = served
    args = xdr(("o", scratch), ("o", b"n" * 300))
    if proc == CREATE:
        args += xdr(("u", UNCHECKED)) + sattr3()
    reply = client.nfs.call(NFS_PROG, NFS_VERS, proc, args)
    assert reply.accepted and reply.stat == RC.SUCCESS, reply
    assert int.from_bytes(bytes(reply.results[:4]), "big") == NFS3ERR_NAMETOOLONG


def test_bad_calls_in_a_loop_do_not_flood_the_log(served):
    """A client repeating a malformed call gets every answer and counts every one, but the
    log at the default level (info) takes a bounded number of lines for it, as the NBD side
    does for refused requests."""
    daemon, client, scratch = served
    before = daemon.log().count("arguments malformed")
    for _ in range(200):
        reply = client.nfs.call(NFS_PROG, NFS_VERS, GETATTR, b"\0\0")  # truncated handle
        assert reply.accepted and reply.stat == RC.GARBAGE_ARGS
    for _ in range(200):
        # An unknown credential flavor: refused in the RPC header (AUTH_ERROR).
        xid = client.nfs.next_xid()
        record = xdr(("u", xid), ("u", 0), ("u", 2), ("u", NFS_PROG), ("u", NFS_VERS),
                      ("u", 0), ("u", 390003), ("o", b""), ("u", 0), ("o", b""))
        reply = client.nfs.raw_call(record, xid)
        assert not reply.accepted
    lines = daemon.log().splitlines()
    info_malformed = [line for line in lines
                      if " INFO " in line and "arguments malformed" in line]
    info_refused = [line for line in lines if " INFO " in line and "call refused" in line]
    assert daemon.log().count("arguments malformed") - before >= 1
    assert len(info_malformed) < 20, len(info_malformed)
    assert len(info_refused) < 20, len(info_refused)


@pytest.mark.parametrize("seconds", [-86_400 * 365, 2**32 + 5])
def test_times_outside_nfstime3_do_not_break_getattr(served, seconds):
    """nfstime3 seconds are a uint32: a scratch file the server's side dated before 1970 or
    after 2106 still gets its attributes (a clamped time), not SYSTEM_ERR, and neither does
    a READDIRPLUS of the directory holding it (`ls -l` of the whole export)."""
    daemon, client, scratch = served
    name = f"dated{seconds}.bin"
    path = scratch_dir(daemon) / name
    path.write_bytes(b"old")
    os.utime(path, ns=(seconds * 1_000_000_000, seconds * 1_000_000_000))
    u = client.proc(LOOKUP, xdr(("o", scratch), ("o", name.encode())))
    assert u.uint() == NFS3_OK
    handle = bytes(u.opaque(64))
    u = client.proc(GETATTR, xdr(("o", handle)))
    assert u.uint() == NFS3_OK
    attributes = bytes(u.fixed_opaque(84))
    mtime = int.from_bytes(attributes[68:72], "big")
    assert mtime == (0 if seconds < 0 else 0xFFFF_FFFF)
    u = client.proc(17, xdr(("o", scratch), ("h", 0), ("f", bytes(8)), ("u", 8192),
                            ("u", 65536)))
    assert u.uint() == NFS3_OK
    assert "Traceback" not in daemon.log()
