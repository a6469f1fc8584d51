"""NFSv3 and MOUNT for tests: the one raw RPC client, XDR for arguments, the calls a node
makes, a daemon serving NFS to nodes alpha (127.0.0.1) and beta (127.0.0.2), and libnfs's
command-line clients."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from typing import Optional

import pytest

from netswap.rpc import constants as RC
from netswap.rpc import message as rpc
from netswap.rpc.xdr import Packer, Unpacker
from support.daemon import free_port, start_daemon

MiB = 1 << 20
SWAP_SIZE = 4 * MiB
ALPHA, BETA, STRANGER = "127.0.0.1", "127.0.0.2", "127.0.0.3"
ALPHA_PATTERN = bytes(range(256)) * 16  # 4 KiB alpha writes at offset 0 and checks after

NFS_PROG, NFS_VERS, MOUNT_PROG, MOUNT_VERS = 100003, 3, 100005, 3
NULL, GETATTR, SETATTR, LOOKUP, READ, WRITE, CREATE = 0, 1, 2, 3, 6, 7, 8
REMOVE, RENAME, READDIR, COMMIT = 12, 14, 16, 21
MNT = 1
UNSTABLE, FILE_SYNC = 0, 2
UNCHECKED, GUARDED = 0, 1  # createmode3
NFS3_OK, NFS3ERR_NOENT, NFS3ERR_ACCES, NFS3ERR_FBIG, NFS3ERR_NOSPC = 0, 2, 13, 27, 28
NFS3ERR_INVAL, NFS3ERR_NAMETOOLONG = 22, 63
NFS3ERR_BADHANDLE, NFS3ERR_NOTSUPP = 10001, 10004
MNT3_OK, MNT3ERR_ACCES = 0, 13
FATTR3_SIZE = 5 * 4 + 8  # type, mode, nlink, uid, gid precede size
FATTR3_BYTES = 84
CRED = rpc.AuthSys(stamp=1, machine="hostile", uid=0, gid=0)


class Closed(Exception):
    """The server closed the connection instead of replying."""


class RpcClient:
    """One TCP connection speaking ONC RPC with record marking; calls matched by xid."""

    def __init__(self, port: int, source: str = ALPHA, privileged: bool = False) -> None:
        self.sock = socket.socket()
        if privileged:  # a source port below 1024, as root may bind (nfs.node_ports)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for source_port in range(1023, 600, -1):
                try:
                    self.sock.bind((source, source_port))
                    break
                except OSError:
                    continue
            else:
                raise OSError("no free source port below 1024")
        else:
            self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        # A hang guard, not a timing check: fdatasync on a disk shared with other tests can
        # take many seconds.
        self.sock.settimeout(120)
        self._xid = int.from_bytes(os.urandom(4), "big") & 0x7FFF_FFFF

    def close(self) -> None:
        self.sock.close()

    def next_xid(self) -> int:
        self._xid = (self._xid + 1) & 0xFFFF_FFFF
        return self._xid

    def send_record(self, record: bytes) -> None:
        self.sock.sendall(rpc.fragment_header(len(record)) + record)

    def receive_record(self) -> bytes:
        record = b""
        while True:
            last, length = rpc.parse_fragment_header(self._exact(4))
            record += self._exact(length)
            if last:
                return record

    def _exact(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            try:
                chunk = self.sock.recv(count - len(data))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed(f"closed after {len(data)} of {count} bytes")
            data += chunk
        return data

    def raw_call(self, record: bytes, xid: int) -> rpc.Reply:
        self.send_record(record)
        return self.reply(xid)

    def send_call(self, prog: int, vers: int, proc: int, args: bytes = b"",
                  cred: Optional[rpc.AuthSys] = CRED) -> int:
        """Send a call without waiting for its reply (reply(xid) reads it); its xid."""
        xid = self.next_xid()
        self.send_record(rpc.call_header(xid, prog, vers, proc, cred) + args)
        return xid

    def reply(self, xid: int) -> rpc.Reply:
        reply = rpc.parse_reply(self.receive_record())
        assert reply.xid == xid, (reply.xid, xid)
        return reply

    def call(self, prog: int, vers: int, proc: int, args: bytes = b"",
             cred: Optional[rpc.AuthSys] = CRED) -> rpc.Reply:
        return self.reply(self.send_call(prog, vers, proc, args, cred))

    def expect_close(self) -> None:
        """The server closes the connection without sending anything."""
        with pytest.raises(Closed):
            self.receive_record()


def xdr(*items) -> bytes:
    """XDR of ('u', n) uint, ('h', n) uhyper, ('o', b) opaque, ('f', b) fixed opaque,
    ('b', v) bool items."""
    packer = Packer()
    for kind, value in items:
        {"u": packer.uint, "h": packer.uhyper, "o": packer.opaque, "f": packer.fixed_opaque,
         "b": packer.bool}[kind](value)
    return packer.bytes()


class Nfs:
    """NFSv3 and MOUNT calls over two RpcClients, as one node (by source address)."""

    def __init__(self, daemon, source: str = ALPHA, privileged: bool = False) -> None:
        self.nfs = RpcClient(daemon.nfs_port, source, privileged)
        self.mount_client = RpcClient(daemon.mount_port, source, privileged)

    def close(self) -> None:
        self.nfs.close()
        self.mount_client.close()

    def mnt(self, path: str) -> tuple[int, Optional[bytes]]:
        reply = self.mount_client.call(MOUNT_PROG, MOUNT_VERS, MNT, xdr(("o", path.encode())))
        assert reply.accepted and reply.stat == RC.SUCCESS, reply
        u = Unpacker(reply.results)
        status = u.uint()
        return status, bytes(u.opaque(64)) if status == MNT3_OK else None

    def root(self, path: str) -> bytes:
        status, handle = self.mnt(path)
        assert status == MNT3_OK, (path, status)
        return handle

    def proc(self, proc: int, args: bytes) -> Unpacker:
        """A served NFS procedure's results (status first), as an Unpacker."""
        reply = self.nfs.call(NFS_PROG, NFS_VERS, proc, args)
        assert reply.accepted and reply.stat == RC.SUCCESS, reply
        return Unpacker(reply.results)

    def lookup(self, directory: bytes, name: str) -> tuple[int, Optional[bytes]]:
        u = self.proc(LOOKUP, xdr(("o", directory), ("o", name.encode())))
        status = u.uint()
        return status, bytes(u.opaque(64)) if status == NFS3_OK else None

    def swap_handle(self, node: str) -> bytes:
        status, handle = self.lookup(self.root("/swap"), node)
        assert status == NFS3_OK, status
        return handle

    def getattr(self, handle: bytes) -> tuple[int, Optional[int]]:
        """(status, size)."""
        u = self.proc(GETATTR, xdr(("o", handle)))
        status = u.uint()
        if status != NFS3_OK:
            return status, None
        attributes = bytes(u.fixed_opaque(FATTR3_BYTES))
        return status, struct.unpack_from(">Q", attributes, FATTR3_SIZE - 8)[0]

    def read(self, handle: bytes, offset: int, count: int) -> tuple[int, bytes, Optional[bool]]:
        """(status, data, eof)."""
        u = self.proc(READ, xdr(("o", handle), ("h", offset), ("u", count)))
        status = u.uint()
        if u.bool():
            u.fixed_opaque(FATTR3_BYTES)
        if status != NFS3_OK:
            return status, b"", None
        got, eof, data = u.uint(), u.bool(), bytes(u.opaque())
        assert got == len(data)
        u.done()
        return status, data, eof

    def write(self, handle: bytes, offset: int, data: bytes,
              stable: int = FILE_SYNC) -> tuple[int, Optional[bytes]]:
        """(status, verifier)."""
        u = self.proc(WRITE, xdr(("o", handle), ("h", offset), ("u", len(data)), ("u", stable),
                                 ("o", data)))
        status = u.uint()
        skip_wcc(u)
        if status != NFS3_OK:
            u.done()
            return status, None
        count = u.uint()
        u.uint()  # committed
        verifier = bytes(u.fixed_opaque(8))
        assert count == len(data)
        u.done()
        return status, verifier

    def commit(self, handle: bytes) -> tuple[int, Optional[bytes]]:
        u = self.proc(COMMIT, xdr(("o", handle), ("h", 0), ("u", 0)))
        status = u.uint()
        skip_wcc(u)
        verifier = bytes(u.fixed_opaque(8)) if status == NFS3_OK else None
        u.done()
        return status, verifier

    def readdir(self, directory: bytes) -> tuple[int, list[str]]:
        u = self.proc(READDIR, xdr(("o", directory), ("h", 0), ("f", bytes(8)), ("u", 8192)))
        status = u.uint()
        if u.bool():
            u.fixed_opaque(FATTR3_BYTES)
        if status != NFS3_OK:
            return status, []
        u.fixed_opaque(8)
        names = []
        while u.bool():
            u.uhyper()
            names.append(u.string().decode())
            u.uhyper()
        assert u.bool()  # eof
        u.done()
        return status, names


def skip_wcc(u: Unpacker) -> None:
    if u.bool():  # pre_op_attr: size, mtime, ctime
        u.fixed_opaque(24)
    if u.bool():
        u.fixed_opaque(FATTR3_BYTES)


def sattr3(mode: Optional[int] = None, size: Optional[int] = None, uid: Optional[int] = None,
           gid: Optional[int] = None) -> bytes:
    """A sattr3 setting what is given; times are left alone (DONT_CHANGE)."""
    return xdr(("b", mode is not None), *([("u", mode)] if mode is not None else []),
               ("b", uid is not None), *([("u", uid)] if uid is not None else []),
               ("b", gid is not None), *([("u", gid)] if gid is not None else []),
               ("b", size is not None), *([("h", size)] if size is not None else []),
               ("u", 0), ("u", 0))


def create(client: Nfs, directory: bytes, name: bytes, how: int = UNCHECKED,
           attributes: Optional[bytes] = None) -> tuple[int, Optional[bytes]]:
    """CREATE of a name given as bytes: (status, the new file's handle if the reply has one)."""
    u = client.proc(CREATE, xdr(("o", directory), ("o", name), ("u", how))
                    + (sattr3() if attributes is None else attributes))
    status = u.uint()
    return status, (bytes(u.opaque(64)) if status == NFS3_OK and u.bool() else None)


def scratch_path(daemon):
    """Where the scratch export's files are on the server."""
    return daemon.state_dir / "nfs-scratch"


def start_nfs(tmp_path, nfs: str, nfs_port: int = 0, mount_port: int = 0, **config):
    """netswapd serving NFS and MOUNT on loopback ports (free ones unless given), then
    daemon.nfs_port and daemon.mount_port; `nfs` is the rest of its [nfs] section, `config`
    the rest of write_config's arguments."""
    nfs_port, mount_port = nfs_port or free_port(), mount_port or free_port()
    daemon = start_daemon(tmp_path, nfs_options=f"""
        enabled = true
        listen = ["127.0.0.1:{nfs_port}"]
        mount_listen = ["127.0.0.1:{mount_port}"]
        {nfs}
        """, **config)
    daemon.nfs_port, daemon.mount_port = nfs_port, mount_port
    return daemon


def start_nfs_daemon(tmp_path, extra: str = "", **config):
    """start_nfs with nodes alpha and beta, 4 MiB swap files and 64 KiB I/O; `extra` adds
    to the [nfs] section."""
    return start_nfs(tmp_path, f"""
        swap_size = "{SWAP_SIZE // MiB}MiB"
        max_io = "64KiB"
        nodes = {{ alpha = ["{ALPHA}/32"], beta = ["{BETA}/32"] }}
        {extra}
        """, **config)


def header(xid, prog=NFS_PROG, vers=NFS_VERS, proc=NULL):
    return rpc.call_header(xid, prog, vers, proc, CRED)


def url(daemon, path: str) -> str:
    return (f"nfs://127.0.0.1{path}?version=3&nfsport={daemon.nfs_port}"
            f"&mountport={daemon.mount_port}")


def run(*command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, timeout=120, check=True, **kwargs)
