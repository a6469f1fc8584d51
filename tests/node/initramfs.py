"""The node's initramfs: busybox, the kernel modules, and an init that turns the host's own
root (shared read-only over 9p) into the node's root and runs the node's script.

The node's parameters come on the kernel command line (`netswap.name=`, `netswap.ip=`,
`netswap.repo=`: the checkout under test, shared at its own path, which may be under a
directory the node covers with tmpfs), so one initramfs serves every node of a kernel. The script and its results travel through a
second, writable 9p share (`job`): the harness writes `script` there, init runs it in a chroot
of the host's root with stdout and stderr on the console (no pipe to a process that could be
swapped out), and writes its exit status to `exit-status` before it powers the node off.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

from .kernel import NodeKernel

BUSYBOX = Path("/bin/busybox")  # busybox-static: runs with no library from anywhere
EXIT_MARK = "netswap-node-exit-status="

INIT = r"""#!/bin/busybox sh
# The node's pid 1 (tests/node/initramfs.py).
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules.order); do
    insmod "/modules/$module" || echo "init: insmod $module failed"
done
for word in $(cat /proc/cmdline); do
    case "$word" in
        netswap.name=*) NAME="${word#*=}" ;;
        netswap.ip=*) ADDRESS="${word#*=}" ;;
        netswap.repo=*) REPO="${word#*=}" ;;
    esac
done
hostname "$NAME"
ip link set lo up
ip link set eth0 up
ip addr add "$ADDRESS" dev eth0
# The host's root, read-only; the node writes to tmpfs only.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /newroot
for dir in run tmp var/tmp mnt; do
    mount -t tmpfs -o mode=1777 tmpfs "/newroot/$dir"
done
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/run/job
mount -t devpts devpts /newroot/dev/pts
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 job /newroot/run/job
# The checkout under test at its own path, also where a tmpfs above hides it (a clone in /tmp).
mkdir -p "/newroot$REPO"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 repo "/newroot$REPO"
echo "init: node $NAME at $ADDRESS is up, $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) MiB of memory"
chroot /newroot /bin/sh -c 'cd /run/job && exec /bin/sh ./script' </dev/console >/dev/console 2>&1
status=$?
echo "$status" > /newroot/run/job/exit-status
sync
echo "__MARK__$status"
umount /newroot/run/job
reboot -f
"""


def build_initramfs(kernel: NodeKernel, directory: Path) -> Path:
    """An uncompressed newc cpio archive for `kernel`, kept in `directory` under a name that
    changes with its contents, so a changed init or kernel never reuses a stale one."""
    modules = kernel.modules()
    init = INIT.replace("__MARK__", EXIT_MARK).encode()
    digest = hashlib.sha256(init + kernel.version.encode() + BUSYBOX.read_bytes())
    for module in modules:
        digest.update(str(module).encode())
    path = directory / f"initramfs-{kernel.version}-{digest.hexdigest()[:16]}.cpio"
    if path.exists():
        return path
    archive = _Cpio()
    archive.directory("bin")
    archive.directory("modules")
    archive.file("init", init, 0o755)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.file("modules.order", "".join(f"{m.name}\n" for m in modules).encode(), 0o644)
    for module in modules:
        archive.file(f"modules/{module.name}", module.read_bytes(), 0o644)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_bytes(archive.finish())
    partial.rename(path)
    return path


class _Cpio:
    """The newc format the kernel unpacks (Documentation/driver-api/early-userspace)."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._inode = 1

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, b"")

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self._out.getvalue()

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self._inode, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        self._inode += 1
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._write_padded(header + encoded)
        self._write_padded(data)

    def _write_padded(self, chunk: bytes) -> None:
        self._out.write(chunk)
        self._out.write(b"\0" * (-self._out.tell() % 4))
