"""NFSv3 file handles: what the client holds for a file, and why it cannot forge one.

An ``nfs_fh3`` is ``opaque<64>`` to the client (RFC 1813 section 2.5).  It must survive a
daemon restart (a node's kernel keeps using the handle of its swap file across our restarts;
ESTALE there kills every process with a page out), and it must never name a different object
later.  Ours is 31 bytes, fixed::

    version u8 | export_id u16 | fileid u64 | generation u32 | HMAC-SHA256(key, the 15 bytes)[:16]

* ``fileid`` is the file's inode number (also fattr3.fileid), ``generation`` is bumped whenever
  the object behind a fileid is scrubbed or re-created, so an old handle goes stale instead of
  reaching the new contents.  The export root directory has a handle too: its own inode,
  generation 0.
* knfsd-style handles (fsid + inode + generation) are guessable; the MAC makes them
  unforgeable by anyone without the key (research/nfs.md section 4).  It is checked with
  ``hmac.compare_digest``, so the time a check takes says nothing about how many bytes matched.
  16 bytes of HMAC-SHA256 leave 2**128 guesses, far beyond what a network can carry.
* The MAC proves *we* issued the handle, not *to whom*: a handle is a capability that a sniffer
  could replay.  The server still checks, on every call, that the file's owner node is the
  caller (SwapFiles.by_fileid gives it the owner).

The key lives at ``<state_dir>/nfs-handle.key``: 32 random bytes, mode 0600, created once.
**Rotating or losing the key makes every handle stale, which is dead swap for every node
that has its swap file active** (the kernel cannot re-LOOKUP a swap file).  Only do it with
every node's swap off.  So the key is loaded, never silently regenerated: a file of the wrong
size, or one group/others can read (anyone who reads it can forge handles), is an error at
start-up, not a reason to make a new one.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import secrets
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HANDLE_SIZE",
    "KEY_FILE_NAME",
    "KEY_SIZE",
    "BadHandle",
    "FileHandle",
    "HandleKey",
    "HandleKeyError",
    "decode",
    "encode",
]

KEY_FILE_NAME = "nfs-handle.key"
KEY_SIZE = 32

HANDLE_VERSION = 1
_BODY = struct.Struct(">BHQI")  # version, export_id, fileid, generation
MAC_SIZE = 16
HANDLE_SIZE = _BODY.size + MAC_SIZE  # 31, within NFS3_FHSIZE (64)


class HandleKeyError(OSError):
    """The handle key file exists but cannot be used (wrong size, too open, not a file).

    An OSError, so the daemon's start-up path reports it and exits like other environment
    failures.  The message names the path and what is expected.
    """


class BadHandle(ValueError):
    """A handle we did not issue: wrong length, unknown version or a MAC that does not match.

    The server answers NFS3ERR_BADHANDLE.  Deliberately one exception for all three: the reply
    is the same, and a forger learns nothing from which check failed.
    """


class HandleKey:
    """The secret that signs file handles; see the module docstring before rotating it."""

    __slots__ = ("path", "_secret")

    def __init__(self, secret: bytes, path: Path | None = None) -> None:
        if not isinstance(secret, bytes) or len(secret) != KEY_SIZE:
            raise ValueError(f"a handle key is {KEY_SIZE} bytes")
        self._secret = secret
        self.path = path

    def __repr__(self) -> str:  # never print the secret into a log
        return f"HandleKey(path={str(self.path)!r})"

    @classmethod
    def load_or_create(cls, state_dir: Path) -> HandleKey:
        """The key at ``<state_dir>/nfs-handle.key``, created on the very first start.

        Creation is atomic and exclusive: the key is written to a private temporary file,
        fsynced, then *linked* to its name (link(2) fails if the name exists, unlike
        rename(2), which would replace it) and the directory fsynced.  So the name only ever
        holds a complete key, and of two daemons starting at once on a fresh state directory,
        one key wins and both use it.  Raises HandleKeyError for an unusable key file,
        OSError for I/O failures.
        """
        path = Path(state_dir) / KEY_FILE_NAME
        try:
            return cls(_read_key(path), path)
        except FileNotFoundError:
            pass
        temporary = path.with_name(f".{KEY_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.fchmod(fd, 0o600)  # the umask can only narrow it, but be exact
            secret = secrets.token_bytes(KEY_SIZE)
            if os.write(fd, secret) != KEY_SIZE:
                raise OSError(errno.EIO, f"{temporary}: short write of the handle key")
            os.fsync(fd)
            os.close(fd)
            fd = -1
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass  # another start won the race: use its key, not ours
            else:
                _fsync_directory(path.parent)
        finally:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
        return cls(_read_key(path), path)

    def mac(self, data: bytes) -> bytes:
        return hmac.new(self._secret, data, hashlib.sha256).digest()[:MAC_SIZE]


def _read_key(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HandleKeyError(errno.EINVAL, f"{path}: the NFS handle key must be a regular file")
        if st.st_mode & 0o077:
            raise HandleKeyError(
                errno.EPERM,
                f"{path}: the NFS handle key has mode {stat.S_IMODE(st.st_mode):04o}; "
                "it must not be accessible to group or others (chmod 600): whoever reads it "
                "can forge file handles",
            )
        if st.st_uid != os.geteuid():
            raise HandleKeyError(
                errno.EPERM,
                f"{path}: the NFS handle key is owned by uid {st.st_uid}, not by the daemon "
                f"(uid {os.geteuid()}); its owner could forge file handles",
            )
        if st.st_size != KEY_SIZE:
            raise HandleKeyError(
                errno.EINVAL,
                f"{path}: the NFS handle key is {st.st_size} bytes, expected {KEY_SIZE}; "
                "replacing it makes every NFS file handle stale (dead swap on every node)",
            )
        data = os.pread(fd, KEY_SIZE, 0)
    finally:
        os.close(fd)
    if len(data) != KEY_SIZE:  # shrank under us between fstat and read
        raise HandleKeyError(errno.EIO, f"{path}: short read of the NFS handle key")
    return data


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class FileHandle:
    """What a handle names: an object of one export, in one incarnation."""

    export_id: int  # u16: which export (configured, stable across restarts)
    fileid: int  # u64: the inode number, as in fattr3.fileid
    generation: int  # u32: bumped when the object behind fileid is scrubbed or re-created

    def __post_init__(self) -> None:
        for name, bits in (("export_id", 16), ("fileid", 64), ("generation", 32)):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 1 << bits:
                raise ValueError(
                    f"FileHandle.{name} must be an unsigned {bits}-bit int, not {value!r}"
                )

    @classmethod
    def for_directory(cls, export_id: int, directory: Path) -> FileHandle:
        """The handle of an export's root directory: its inode, generation 0."""
        return cls(export_id, os.stat(directory).st_ino, 0)


def encode(key: HandleKey, handle: FileHandle) -> bytes:
    """The HANDLE_SIZE bytes the client gets for ``handle``."""
    body = _BODY.pack(HANDLE_VERSION, handle.export_id, handle.fileid, handle.generation)
    return body + key.mac(body)


def decode(key: HandleKey, data: bytes | bytearray | memoryview) -> FileHandle:
    """The FileHandle in ``data``; raises BadHandle unless we issued exactly these bytes."""
    if len(data) != HANDLE_SIZE:
        raise BadHandle(f"a file handle is {HANDLE_SIZE} bytes, not {len(data)}")
    data = bytes(data)  # 31 bytes: hmac and struct want one contiguous object
    body, mac = data[: _BODY.size], data[_BODY.size :]
    if not hmac.compare_digest(key.mac(body), mac):
        raise BadHandle("file handle MAC does not match")
    version, export_id, fileid, generation = _BODY.unpack(body)
    if version != HANDLE_VERSION:  # a MAC'd handle with another version: from a newer daemon
        raise BadHandle(f"file handle version {version} is not supported")
    return FileHandle(export_id, fileid, generation)
