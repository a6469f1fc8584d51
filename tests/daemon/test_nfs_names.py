"""File names on the scratch export, against a live netswapd with the raw RPC client: names
are bytes on the wire and on disk, whatever their encoding, and have a length limit."""

from __future__ import annotations

import os

import pytest

from netswap.rpc import constants as RC
from support.nfs import (
    CREATE, GETATTR, GUARDED, LOOKUP, NFS3_OK, NFS3ERR_NAMETOOLONG, NFS_PROG, NFS_VERS, READDIR,
    UNCHECKED, create, sattr3, scratch_path, xdr,
)


def test_listed_names_that_are_not_utf8_can_be_looked_up(nfs_scratch):
    """Names are bytes on the wire and on disk: READDIR lists a file by its name's bytes,
    and LOOKUP of exactly those bytes must find that file (not NOENT, not another one)."""
    daemon, client, scratch = nfs_scratch
    raw = b"caf\xe9.bin"
    with open(os.path.join(os.fsencode(scratch_path(daemon)), raw), "wb") as f:
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


def test_distinct_byte_names_make_distinct_files(nfs_scratch):
    """Two names that differ only in bytes that are not UTF-8 are two files: a GUARDED
    CREATE of the second must not find the first."""
    daemon, client, scratch = nfs_scratch
    assert create(client, scratch, b"odd-\xff", GUARDED)[0] == NFS3_OK
    assert create(client, scratch, b"odd-\xfe", GUARDED)[0] == NFS3_OK
    on_disk = set(os.listdir(os.fsencode(scratch_path(daemon))))
    assert {b"odd-\xff", b"odd-\xfe"} <= on_disk


@pytest.mark.parametrize("proc", [LOOKUP, CREATE])
def test_long_name_is_nametoolong_not_garbage(nfs_scratch, proc):
    """filename3 is an unbounded string: a name over NAME_MAX is a well-formed call that
    gets NFS3ERR_NAMETOOLONG (with its failure body), not GARBAGE_ARGS."""
    daemon, client, scratch = nfs_scratch
    args = xdr(("o", scratch), ("o", b"n" * 300))
    if proc == CREATE:
        args += xdr(("u", UNCHECKED)) + sattr3()
    reply = client.nfs.call(NFS_PROG, NFS_VERS, proc, args)
    assert reply.accepted and reply.stat == RC.SUCCESS, reply
    assert int.from_bytes(bytes(reply.results[:4]), "big") == NFS3ERR_NAMETOOLONG
