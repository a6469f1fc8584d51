"""File attributes on the scratch export, against a live netswapd with the raw RPC client:
what SETATTR may and may not change, and times GETATTR cannot represent."""

from __future__ import annotations

import os
import stat

import pytest

from support.nfs import (
    GETATTR, GUARDED, LOOKUP, NFS3_OK, NFS3ERR_ACCES, NFS3ERR_INVAL, SETATTR, create, sattr3,
    scratch_path, xdr,
)


def test_refused_setattr_changes_nothing(nfs_scratch):
    """A SETATTR refused for its uid (4294967295, chown's "leave it") must not have
    truncated the file first: an error reply means the call was not applied."""
    daemon, client, scratch = nfs_scratch
    status, handle = create(client, scratch, b"keep.bin")
    assert status == NFS3_OK
    path = scratch_path(daemon) / "keep.bin"
    path.write_bytes(b"x" * 5000)
    u = client.proc(SETATTR, xdr(("o", handle)) + sattr3(uid=0xFFFF_FFFF, size=0)
                    + xdr(("b", False)))
    assert u.uint() == NFS3ERR_INVAL
    assert path.stat().st_size == 5000


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o6777])
def test_no_setuid_or_setgid_file_on_the_server(nfs_scratch, mode):
    """The daemon runs as root and every client may write the scratch export: a file it lets
    a client mark set-user/group-ID would be a root-owned setuid program on the server."""
    daemon, client, scratch = nfs_scratch
    name = f"suid-{mode:o}".encode()
    status, handle = create(client, scratch, name, GUARDED, sattr3(mode=mode))
    path = scratch_path(daemon) / name.decode()
    if status == NFS3_OK:
        assert not path.stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    else:
        assert status == NFS3ERR_ACCES
    status, handle = create(client, scratch, name + b".later")
    assert status == NFS3_OK
    u = client.proc(SETATTR, xdr(("o", handle)) + sattr3(mode=mode) + xdr(("b", False)))
    assert u.uint() == NFS3ERR_ACCES
    assert not (scratch_path(daemon) / (name + b".later").decode()).stat().st_mode & (
        stat.S_ISUID | stat.S_ISGID)


@pytest.mark.parametrize("seconds", [-86_400 * 365, 2**32 + 5])
def test_times_outside_nfstime3_do_not_break_getattr(nfs_scratch, seconds):
    """nfstime3 seconds are a uint32: a scratch file the server's side dated before 1970 or
    after 2106 still gets its attributes (a clamped time), not SYSTEM_ERR, and neither does
    a READDIRPLUS of the directory holding it (`ls -l` of the whole export)."""
    daemon, client, scratch = nfs_scratch
    name = f"dated{seconds}.bin"
    path = scratch_path(daemon) / name
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
