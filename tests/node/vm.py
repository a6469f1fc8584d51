"""A node: Debian's kernel booted under qemu (TCG), its root the host's own `/` over 9p.

`Node.start(script)` boots it with the script in its job directory; the node runs the
script as root in a chroot of the host's root (so the host's nbd-client, mount.nfs, python
and installed netswap are the node's), then powers off. `Node.wait()` gives the console
output and the script's exit status. A node is always torn down (qemu killed, its job
directory kept for the test's tmp_path) when its `with` block ends, failed or not.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .initramfs import EXIT_MARK
from .kernel import NodeKernel
from .network import Lan

MiB = 1 << 20
# A node of 144 MiB has about 91 MiB once its kernel has taken its share: small enough that a
# TCG node swaps four times its memory in well under a minute, big enough for python.
NODE_MEMORY = 144 * MiB
# A node whose console says nothing for this long while a test waits for it is taken as hung:
# its workload prints a line every 10 % and its longest quiet stretch measured here (a swapoff
# reading 400 MiB back over NFS) is under a minute. Not a timing check: a node stopped dead
# (a memory deadlock) fails in minutes instead of at the test's whole hang guard.
SILENCE_LIMIT = 300  # seconds
REPO = Path(__file__).resolve().parents[2]  # the checkout under test: the node sees it too
if any(c.isspace() or c == "," for c in str(REPO)):
    raise RuntimeError(f"{REPO}: a node cannot mount a checkout whose path has spaces or commas")
JOB = "/run/job"  # the job share on the node

# `hold NAME` in a node's script: say so on the console and wait for Node.release(NAME), so a
# test can act on the server (restart it, read its status) at a known point of the node's run.
# `await_release NAME` waits for the same release without saying so: for a script that goes on
# together with a workload's own `hold NAME`.
HOLD = f"""await_release() {{ while [ ! -e "{JOB}/release-$1" ]; do sleep 0.2; done; }}
hold() {{ echo "hold $1"; await_release "$1"; }}
"""


@dataclass
class NodeResult:
    name: str
    status: int | None  # the script's exit status; None if it never finished
    console: str

    def __str__(self) -> str:
        return f"--- node {self.name}: exit status {self.status} ---\n{self.console}"

    __repr__ = __str__  # what an assertion message shows: the console as it was


class NodeTimeout(AssertionError):
    pass


class Node:
    def __init__(self, kernel: NodeKernel, initramfs: Path, lan: Lan, index: int, name: str,
                 workdir: Path, memory: int = NODE_MEMORY) -> None:
        self.kernel = kernel
        self.initramfs = initramfs
        self.lan = lan
        self.index = index
        self.name = name
        self.address = lan.address(index)
        self.memory = memory
        self.job = workdir / f"node-{name}"
        self.job.mkdir(parents=True)
        self.console_path = self.job / "console.log"
        self.monitor_path = self.job / "monitor"  # qemu's human monitor: sysrq keys
        self.process: subprocess.Popen | None = None

    # -- running --------------------------------------------------------------------------------

    def start(self, script: str) -> None:
        """Boot the node; it runs `script` (sh) in its job directory and powers off."""
        # The host's PATH order, with the test's own python first (the netswap it installed).
        path = ":".join([str(Path(sys.executable).parent), "/usr/local/sbin", "/usr/local/bin",
                         "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        (self.job / "script").write_text(f"export PATH={path} HOME=/root\n{HOLD}set -u\n{script}")
        mac = f"52:54:00:77:00:{self.index + 10:02x}"
        # qemu64, not max: TCG emulates the plain x86-64 baseline faster than the newest
        # instructions glibc and the kernel would pick for "max" (the squeeze test's node
        # took 65 s against 83 s; the mirror test 163-245 s against 221-266 s).
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64", "-smp", "1",
            "-m", f"{self.memory // MiB}M", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot",
            "-kernel", str(self.kernel.image), "-initrd", str(self.initramfs),
            "-append", " ".join([
                "console=ttyS0", "panic=-1", "loglevel=4", "mitigations=off",
                "sysctl.kernel.sysrq=1",  # for dump_kernel_state of a hung node
                f"netswap.name={self.name}", f"netswap.ip={self.address}/24",
                f"netswap.repo={REPO}",
            ]),
            "-serial", f"file:{self.console_path}",
            "-monitor", f"unix:{self.monitor_path},server=on,wait=off",
            "-netdev", f"tap,id=lan,ifname={self.lan.taps[self.index]},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=lan,mac={mac}",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                       "multidevs=remap",
            "-virtfs", f"local,path={self.job},mount_tag=job,security_model=none,"
                       "multidevs=remap",
            "-virtfs", f"local,path={REPO},mount_tag=repo,security_model=none,readonly=on,"
                       "multidevs=remap",
        ]
        with open(self.job / "qemu.log", "w") as qemu_log:  # qemu's own complaints
            self.process = subprocess.Popen(self.lan.exec(*argv), stdin=subprocess.DEVNULL,
                                            stdout=qemu_log, stderr=subprocess.STDOUT)

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first match of `pattern` on the console, waiting up to `timeout` seconds for it;
        NodeTimeout (with the console) if it does not come or the node stops first."""
        now = time.monotonic()
        deadline, spoke, said = now + timeout, now, 0
        regex = re.compile(pattern, re.MULTILINE)
        while True:
            console = self.console()
            found = regex.search(console)
            if found:
                return found
            if self.process.poll() is not None:
                raise NodeTimeout(f"node {self.name} stopped before {pattern!r}:\n"
                                  f"{self.result()}")
            now = time.monotonic()
            if len(console) != said:
                spoke, said = now, len(console)
            elif now - spoke > SILENCE_LIMIT:
                self.dump_kernel_state()
                raise NodeTimeout(f"node {self.name} silent for {SILENCE_LIMIT} s while waiting "
                                  f"for {pattern!r} (hung?):\n{self.result()}")
            if now > deadline:
                self.dump_kernel_state()
                raise NodeTimeout(f"no {pattern!r} from node {self.name} in {timeout:.0f} s:\n"
                                  f"{self.result()}")
            time.sleep(0.2)

    def held(self, name: str, timeout: float) -> None:
        """Wait until the node's script reaches `hold NAME`."""
        self.wait_for(rf"^hold {re.escape(name)}$", timeout)

    def release(self, name: str) -> None:
        """Let the node's script go on past `hold NAME`."""
        (self.job / f"release-{name}").touch()

    def wait(self, timeout: float) -> NodeResult:
        """Wait for the node to power off; NodeTimeout (with the console) after `timeout`."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.dump_kernel_state()
            raise NodeTimeout(f"node {self.name} still running after {timeout:.0f} s:\n"
                              f"{self.result()}") from None
        return self.result()

    def dump_kernel_state(self) -> None:
        """Have a hung node's kernel print, on its console, what every blocked task waits on,
        its memory and what its CPU runs (magic SysRq: console loglevel 7, then w, m, l),
        typed on its keyboard through qemu's monitor; then give the slow serial line time."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as monitor:
                monitor.settimeout(5)
                monitor.connect(str(self.monitor_path))
                for key in "7wml":
                    monitor.sendall(f"sendkey alt-sysrq-{key}\n".encode())
                    time.sleep(1)
        except OSError as exc:
            print(f"node {self.name}: no SysRq dump ({exc})", flush=True)
            return
        began = quiet_since = time.monotonic()
        said = -1
        while time.monotonic() - quiet_since < 3 and time.monotonic() - began < 60:
            size = len(self.console())
            if size != said:
                said, quiet_since = size, time.monotonic()
            time.sleep(0.5)

    def result(self) -> NodeResult:
        status = None
        try:
            status = int((self.job / "exit-status").read_text())
        except (FileNotFoundError, ValueError):
            found = re.search(rf"^{EXIT_MARK}(\d+)", self.console(), re.MULTILINE)
            if found:
                status = int(found.group(1))
        return NodeResult(self.name, status, self.console())

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
