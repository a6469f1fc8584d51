"""One test's world: a LAN of its own (network.Lan), netswapd serving on it, and nodes (vm.Node)
booted on it, each with its own address. Everything is undone when the `with` block ends:
nodes killed, netswapd stopped (its log checked for tracebacks), the namespace deleted.

The nodes run the README's own node-side commands (`readme_commands`), with BOOTSERVER the
server's address on the LAN, so the README says what is tested.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO, Daemon, start_daemon
from node.initramfs import build_initramfs
from node.kernel import CACHE, NodeKernel, node_kernel
from node.network import Lan
from node.vm import NODE_MEMORY, Node

NBD_PORT = 10809
NFS_PORT = 2049
MOUNT_PORT = 20048
PAGES = REPO / "tests" / "node" / "pages.py"  # the node's workload, run by the host's python
FOUR_TIMES_MEMORY_MIB = 400  # of a node of NODE_MEMORY (91 MiB for its processes)


@dataclass(frozen=True)
class NodeImage:
    kernel: NodeKernel
    initramfs: Path


def node_image() -> NodeImage:
    kernel = node_kernel()
    return NodeImage(kernel, build_initramfs(kernel, CACHE))


def readme_commands(which: str, server: str) -> str:
    """The shell commands of the README block marked `<!-- node-commands: which -->`, with
    BOOTSERVER the server's address."""
    text = (REPO / "README.md").read_text()
    found = re.search(rf"<!-- node-commands: {re.escape(which)} -->\s*```sh\n(.*?)```", text,
                      re.DOTALL)
    if found is None:
        raise AssertionError(f"README.md has no block marked node-commands: {which}")
    return found.group(1).replace("BOOTSERVER", server)


def workload(size_mib: int, rounds: int = 1, probes: tuple[str, ...] = ()) -> str:
    """The shell command that runs the page workload on a node (pages.py)."""
    return " ".join([f"python3 {shlex.quote(str(PAGES))} {size_mib} --rounds {rounds}",
                     *(f"--probe {label}" for label in probes)])


class Lab:
    def __init__(self, tmp: Path, image: NodeImage, names: list[str]) -> None:
        self.tmp = tmp
        self.image = image
        self.names = names
        self.lan = Lan(len(names))
        self.nodes: dict[str, Node] = {}
        self.daemon: Daemon | None = None
        self._config: dict = {}
        self._restarts = 0

    @property
    def server(self) -> str:
        return self.lan.server

    def address(self, name: str) -> str:
        return self.lan.address(self.names.index(name))

    # -- netswapd ---------------------------------------------------------------------------

    def start_daemon(self, swap_size: str = "768MiB", nfs_swap_size: str = "768MiB",
                     swap_options: str = "", nfs_options: str = "", **config) -> Daemon:
        """netswapd in the LAN's namespace: NBD, NFS and MOUNT on the server's address at the
        README's ports, every node's address a swap node (swap.node_networks) and an NFS node
        by its name (nfs.nodes), from privileged source ports only (the default)."""
        nodes = ", ".join(f'"{name}" = ["{self.address(name)}"]' for name in self.names)
        self._config = dict(
            listen=f'["{self.server}:{NBD_PORT}"]',
            swap_size=swap_size,
            swap_options=f'node_networks = ["{self.lan.prefix}.0/24"]\n{swap_options}',
            nfs_options=f"""
                enabled = true
                listen = ["{self.server}:{NFS_PORT}"]
                mount_listen = ["{self.server}:{MOUNT_PORT}"]
                swap_size = "{nfs_swap_size}"
                node_ports = "privileged"
                nodes = {{ {nodes} }}
                {nfs_options}
            """,
            **config,
        )
        self.daemon = self._start()
        return self.daemon

    def _start(self) -> Daemon:
        return start_daemon(self.tmp, prefix=self.lan.exec(),
                            scrape=lambda port, path: self.lan.http_get("127.0.0.1", port, path),
                            **self._config)

    def restart_daemon(self, sig: int = signal.SIGTERM, pause: float = 3.0) -> Daemon:
        """Stop netswapd with `sig`, wait `pause` seconds, start it again on the same config
        and state; the old log is kept beside the new one."""
        old = self.daemon
        old.stop(sig)
        self._restarts += 1
        old.log_path.rename(old.log_path.with_name(f"netswapd.{self._restarts}.log"))
        self._check_log(old.log_path.with_name(f"netswapd.{self._restarts}.log").read_text())
        time.sleep(pause)
        self.daemon = self._start()
        return self.daemon

    def ctl(self, *argv: str) -> str:
        """netswapctl against the running daemon's control socket."""
        control = self.daemon.config_path.parent / "control.sock"
        done = subprocess.run([sys.executable, "-m", "netswap.ctl", "--socket", str(control),
                               *argv], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"netswapctl {' '.join(argv)}: {done.returncode}\n{done.stderr}")
        return done.stdout

    # -- nodes ------------------------------------------------------------------------------

    def boot(self, name: str, script: str, memory: int = NODE_MEMORY) -> Node:
        """Boot node `name` (its address is fixed by its place in `names`) running `script`."""
        node = Node(self.image.kernel, self.image.initramfs, self.lan, self.names.index(name),
                    name, self.tmp, memory)
        self.nodes[name] = node
        node.start(script)
        return node

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        try:
            for node in self.nodes.values():
                node.kill()
            if self.daemon is not None and self.daemon.process.poll() is None:
                code = self.daemon.stop()
                log = self.daemon.log()
                self._check_log(log)
                assert code == 0, log[-5000:]
        finally:
            self.lan.close()

    @staticmethod
    def _check_log(log: str) -> None:
        assert "Traceback" not in log, log[-5000:]

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
