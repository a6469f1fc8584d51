"""The node's mirror: an md RAID1 over two nbd devices from two servers, built and members put
back with mdadm, members taken out and its state read through sysfs.

md, not a protocol of our own: the kernel already knows how to write both members, read the
one that answers, mark a member faulty when its I/O fails, and (with an internal write-intent
bitmap) resync only the regions written while a member was away once it is re-added.

The array uses metadata 1.2: md's superblock sits 4 KiB into each member, and its set UUID
(16 bytes at offset 16 of the superblock) is what the agent reads through a new socket to
know the export still holds this mirror's member (MdMember, the member's Identity).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from netswap.node import kstack

log = logging.getLogger("netswap.node")

SUPERBLOCK_OFFSET = 4096  # metadata 1.2: 8 sectors from the start of the member
MD_MAGIC = 0xA92B4EFC
SYS_BLOCK = Path("/sys/block")
SET_DISK_FAULTY = 0x929  # _IO(MD_MAJOR = 9, 0x29), linux/raid/md_u.h
MDADM_TIMEOUT = 120.0  # seconds: a --create of a large array included
KILL_WAIT = 5.0  # seconds for a killed mdadm to go


class MdError(OSError):
    """An mdadm command that failed (its output in the message)."""


class MdMember:
    """A member of the array whose set UUID is `array`: its md superblock, 4 KiB in
    (member.Identity)."""

    offset = SUPERBLOCK_OFFSET

    def __init__(self, array: uuid.UUID) -> None:
        self.array = array

    def found_in(self, page: bytes) -> str | None:
        found = superblock_uuid(page)
        if found == self.array:
            return None
        return (f"this node's mirror member (array {self.array}; found "
                f"{'array ' + str(found) if found else 'no md superblock, e.g. wiped'})")


def superblock_uuid(page: bytes) -> uuid.UUID | None:
    """The set UUID of the md 1.x superblock at the start of `page`, None if there is none."""
    if len(page) < 32 or struct.unpack_from("<I", page, 0)[0] != MD_MAGIC:
        return None
    return uuid.UUID(bytes=bytes(page[16:32]))


@dataclass(frozen=True)
class MdState:
    """What sysfs says of an array: `health` is clean, resyncing or degraded (or failed:
    gone, or no member in sync), `members` each member's kernel name -> its md state
    ("in_sync", "faulty", "spare", ...), `progress` the resync's "done / total" sectors."""

    health: str
    degraded: int
    action: str
    progress: str
    members: dict

    def __str__(self) -> str:
        shown = ", ".join(f"{name} {state}" for name, state in sorted(self.members.items()))
        extra = f", {self.action} {self.progress}" if self.health == "resyncing" else ""
        return f"{self.health} ({shown}{extra})"


def free_md_device() -> str:
    """An md device name no array uses: md127 downward, as mdadm itself picks."""
    for number in range(127, -1, -1):
        if not (SYS_BLOCK / f"md{number}" / "md" / "array_state").exists():
            return f"/dev/md{number}"
    raise MdError("no free md device number")


def create(device: str, members: list[str], name: str) -> uuid.UUID:
    """A RAID1 of `members` with an internal bitmap; returns its set UUID.

    --assume-clean: the members are new exports whose contents nobody will read before
    writing them (swap reads only slots it wrote, and each write goes to both), so an initial
    resync would copy the whole device over the network for nothing. A bitmap chunk of 1 MiB:
    a member back from an outage copies only the MiBs written meanwhile (a 1 GiB device's
    bitmap is 1,024 bits; mdadm's default chunk for it would be 64 MiB)."""
    mdadm("--create", device, "--run", "--level=1", f"--raid-devices={len(members)}",
          "--metadata=1.2", "--bitmap=internal", "--bitmap-chunk=1024", "--assume-clean",
          f"--name=netswap-{name}",
          "--homehost=any", *members)
    return array_uuid(members[0])


def array_uuid(member: str) -> uuid.UUID:
    """The set UUID in `member`'s superblock, read from the device itself."""
    with open(member, "rb") as f:
        f.seek(SUPERBLOCK_OFFSET)
        found = superblock_uuid(f.read(4096))
    if found is None:
        raise MdError(f"{member}: no md superblock after mdadm --create")
    return found


def read_state(device: str) -> MdState:
    md = SYS_BLOCK / Path(device).name / "md"

    def read(name: str, default: str = "") -> str:
        try:
            return (md / name).read_text().strip()
        except OSError:
            return default

    array_state = read("array_state", "clear")
    members = {}
    for entry in md.glob("dev-*"):
        members[entry.name[4:]] = read(f"{entry.name}/state", "gone")
    degraded = int(read("degraded", "0") or 0)
    action = read("sync_action", "idle")
    in_sync = [m for m, s in members.items() if "in_sync" in s.split(",")]
    if array_state in ("clear", "inactive") or not in_sync:
        health = "failed"
    elif action in ("resync", "recover"):
        health = "resyncing"
    elif degraded or len(in_sync) < len(members):
        health = "degraded"
    else:
        health = "clean"
    return MdState(health, degraded, action, read("sync_completed", "none"), members)


def mark_faulty(array: int, member: str) -> None:
    """Tell md that `member` has failed (SET_DISK_FAULTY on the array's open descriptor
    `array`, as mdadm --fail does): md stops writing to it and completes the writes it has
    out there as failed on that member only. The one md request that takes no lock of the
    array, and no process or file to start: it is made while the node's swap is stalled."""
    number = os.stat(member).st_rdev
    major, minor = os.major(number), os.minor(number)
    # The kernel decodes the argument as new_decode_dev: minor's low byte, major, minor's rest.
    fcntl.ioctl(array, SET_DISK_FAULTY, (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12))


def take_out(device: str, member: str) -> bool:
    """Take `member` out of the array: marked faulty (if md had not yet), then removed; md
    then reads and writes only the other member. True once it is out (or was never in);
    False while md still holds I/O for it (EBUSY): try again later.

    Through md's sysfs, by the agent itself, not mdadm: this runs while the node's swap may
    be stalled on the dead member, and a process started now (mdadm, from the root file system)
    needs memory and pages that wait on that swap."""
    state_file = SYS_BLOCK / Path(device).name / "md" / f"dev-{Path(member).name}" / "state"
    try:
        if "faulty" not in _read_sysfs(state_file).split(","):
            _write_sysfs(state_file, "faulty")
        _write_sysfs(state_file, "remove")
    except FileNotFoundError:
        return True  # not in the array (any more)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise MdError(f"{device}: taking {member} out: {exc}") from None
    return True


def _read_sysfs(path: Path) -> str:
    with open(path, "rb", buffering=0) as f:
        return f.read(4096).decode(errors="replace").strip()


def _write_sysfs(path: Path, word: str) -> None:
    # One write(2): a sysfs attribute takes a command per write.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, word.encode())
    finally:
        os.close(fd)


def re_add(device: str, member: str) -> str:
    """Put `member` back: --re-add (the bitmap says what it missed, only that is copied);
    where md will not (the member is too far behind), --add (a full copy). Returns which."""
    try:
        mdadm(device, "--re-add", member)
        return "re-added"
    except MdError as exc:
        log.info("%s: --re-add of %s refused (%s): adding it as a new member", device,
                 member, exc)
    mdadm(device, "--add", member)
    return "added"


def add_new(device: str, member: str) -> None:
    """A member with nothing of ours on it (a wiped or new export): added, then rebuilt."""
    mdadm("--zero-superblock", "--force", member, check=False)
    mdadm(device, "--add", member)


def stop(device: str) -> None:
    mdadm("--stop", device)


def mdadm(*argv: str, check: bool = True, timeout: float = MDADM_TIMEOUT) -> str:
    # MDADM_NO_UDEV: a node may have no udev; mdadm then makes the device nodes itself.
    process = subprocess.Popen(["mdadm", *argv], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={"MDADM_NO_UDEV": "1",
                                    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        where = kstack.waiting_in(process.pid)
        blocked = [task for task in kstack.blocked_tasks()
                   if not task.startswith(f"mdadm[{process.pid}]")]
        process.kill()
        try:
            process.communicate(timeout=KILL_WAIT)
        except subprocess.TimeoutExpired:
            pass  # stuck in the kernel past SIGKILL: it goes when its wait ends
        raise MdError(f"mdadm {' '.join(argv)} did not finish in {timeout:.0f} s and was "
                      f"killed; it waited in: {where}"
                      + ("; blocked tasks: " + " | ".join(blocked) if blocked else "")) from None
    if check and process.returncode != 0:
        raise MdError(f"mdadm {' '.join(argv)} failed ({process.returncode}): "
                      f"{(stderr or stdout).strip()}")
    return stdout
