"""Debian's own kernel for the test nodes, fetched once and kept in a cache.

Nothing is installed on the host: the package `linux-image-amd64` points at the current
`linux-image-<version>-amd64`, which `apt-get download` fetches and `dpkg -x` unpacks into
the cache; `depmod -b` indexes its modules there, and `modprobe -d -S --show-depends` lists
the .ko files (dependencies first) that the node's initramfs loads.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# What a node needs before its root is mounted (virtio NIC, 9p for the host's root) and what
# the tests use on it (nbd, NFSv3 with swap, md RAID1 for mirrored swap).
NODE_MODULES = ("virtio_pci", "virtio_net", "9pnet_virtio", "9p", "nbd", "nfsv3", "raid1")

CACHE = Path(os.environ.get("NETSWAP_TEST_CACHE", "/var/cache/netswap-tests"))
META_PACKAGE = "linux-image-amd64"


@dataclass(frozen=True)
class NodeKernel:
    version: str  # e.g. 6.1.0-57-amd64
    root: Path  # the unpacked package: boot/, lib/modules/<version>/

    @property
    def image(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def config(self) -> str:
        return (self.root / "boot" / f"config-{self.version}").read_text()

    def modules(self, names=NODE_MODULES) -> list[Path]:
        """The .ko files that load `names`, each after what it depends on, once each."""
        ordered: list[Path] = []
        for name in names:
            listing = _run("modprobe", "-d", str(self.root), "-S", self.version,
                           "--show-depends", name)
            for line in listing.splitlines():
                fields = line.split()
                if fields[:1] == ["builtin"]:
                    continue
                if fields[:1] != ["insmod"]:
                    raise RuntimeError(f"modprobe --show-depends {name}: {line!r}")
                path = Path(fields[1])
                if path not in ordered:
                    ordered.append(path)
        return ordered


def node_kernel(cache: Path = CACHE) -> NodeKernel:
    """The current Debian kernel, unpacked under `cache` (fetched on first use; a lock keeps
    two test runs from unpacking it at once)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _cached_or_unpacked(cache)
        except RuntimeError:
            # Lists older than the mirror name a version it no longer has: refresh, once.
            _run("apt-get", "update", "-q")
            return _cached_or_unpacked(cache)


def _cached_or_unpacked(cache: Path) -> NodeKernel:
    package = _current_package()
    version = package.removeprefix("linux-image-")
    root = cache / package
    if not (root / ".complete").exists():
        _unpack(package, version, root)
    return NodeKernel(version, root)


def _current_package() -> str:
    """linux-image-<version>-amd64, as linux-image-amd64 depends on it today."""
    depends = _run("apt-cache", "depends", META_PACKAGE)
    found = re.findall(r"Depends: (linux-image-\d[^\s<>]*-amd64)", depends)
    if not found:
        raise RuntimeError(f"apt-cache depends {META_PACKAGE} names no kernel (apt-get update?):"
                           f"\n{depends}")
    return found[0]


def _unpack(package: str, version: str, root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as scratch:
        # apt drops privileges to _apt for downloads; a directory it can write avoids the
        # warning (and the unsandboxed download) without changing what is fetched.
        os.chmod(scratch, 0o755)
        _run("apt-get", "download", "-q", package, cwd=scratch)
        [deb] = Path(scratch).glob(f"{package}_*.deb")
        unpacked = Path(scratch) / "root"
        _run("dpkg", "-x", str(deb), str(unpacked))
        _run("depmod", "-b", str(unpacked), version)
        if not (unpacked / "boot" / f"vmlinuz-{version}").exists():
            raise RuntimeError(f"{deb.name} has no boot/vmlinuz-{version}")
        unpacked.rename(root)
    (root / ".complete").touch()


def _run(*argv: str, cwd: str | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout
