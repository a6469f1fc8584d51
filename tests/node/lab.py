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

from support.daemon import Daemon, REPO, start_daemon
from node.initramfs import build_initramfs
from node.kernel import CACHE, NodeKernel, node_kernel
from node.network import Lan
from node.vm import NODE_MEMORY, Node

NBD_PORT = 10809
NFS_PORT = 2049
MOUNT_PORT = 20048
PAGES = REPO / "tests" / "node" / "pages.py"  # the node's workload, run by the host's python
# Three times a node of NODE_MEMORY (91 MiB for its processes): enough that most of it must
# go out and come back, a quarter less TCG time than four (the suite's 20-minute budget). On
# a node of 160 MiB that runs netswap-node (which locks ~32 MiB) it is about four times.
THREE_TIMES_MEMORY_MIB = 300


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


def agent_command(name: str, *arguments: str, state_dir: str = "/run/netswap-node") -> str:
    """Shell lines that start netswap-node in the background (its pid in $A), its log straight
    on the console, and wait until it has attached or exited (the script goes on to say which)."""
    return f"""
netswap-node run --name {name} --state-dir {state_dir} {' '.join(arguments)} &
A=$!
until grep -qs '"state": "attached"' {state_dir}/{name}.json || ! kill -0 $A 2>/dev/null; do
    sleep 0.3
done
"""


class Lab:
    def __init__(self, tmp: Path, image: NodeImage, names: list[str], servers: int = 1) -> None:
        self.tmp = tmp
        self.image = image
        self.names = names
        self.lan = Lan(len(names), servers)
        self.nodes: dict[str, Node] = {}
        self.daemons: dict[int, Daemon] = {}  # by server index: each its address and state
        self._configs: dict[int, dict] = {}
        self._restarts = 0

    @property
    def server(self) -> str:
        return self.lan.server

    @property
    def daemon(self) -> Daemon | None:
        return self.daemons.get(0)

    def server_address(self, server: int) -> str:
        return self.lan.servers[server]

    def address(self, name: str) -> str:
        return self.lan.address(self.names.index(name))

    # -- netswapd ---------------------------------------------------------------------------

    def start_daemon(self, swap_size: str = "768MiB", nfs_swap_size: str = "768MiB",
                     swap_options: str = "", nfs_options: str = "", server: int = 0,
                     **config) -> Daemon:
        """netswapd in the LAN's namespace: NBD, NFS and MOUNT on server `server`'s address at
        the README's ports, every node's address a swap node (swap.node_networks) and an NFS
        node by its name (nfs.nodes), from privileged source ports only (the default)."""
        nodes = ", ".join(f'"{name}" = ["{self.address(name)}"]' for name in self.names)
        address = self.server_address(server)
        self._configs[server] = dict(
            listen=f'["{address}:{NBD_PORT}"]',
            swap_size=swap_size,
            swap_options=f'node_networks = ["{self.lan.prefix}.0/24"]\n{swap_options}',
            nfs_options=f"""
                enabled = true
                listen = ["{address}:{NFS_PORT}"]
                mount_listen = ["{address}:{MOUNT_PORT}"]
                swap_size = "{nfs_swap_size}"
                node_ports = "privileged"
                nodes = {{ {nodes} }}
                {nfs_options}
            """,
            **config,
        )
        return self.start_again(server)

    def start_again(self, server: int = 0) -> Daemon:
        """Start server `server`'s netswapd (again) on its config and state."""
        directory = self.tmp if server == 0 else self.tmp / f"server-{server}"
        directory.mkdir(exist_ok=True)
        self.daemons[server] = start_daemon(
            directory, prefix=self.lan.exec(),
            scrape=lambda port, path: self.lan.http_get("127.0.0.1", port, path),
            **self._configs[server])
        return self.daemons[server]

    def stop_daemon(self, sig: int = signal.SIGTERM, server: int = 0) -> None:
        """Stop server `server`'s netswapd with `sig`; its log is kept under a new name."""
        old = self.daemons[server]
        old.stop(sig)
        self._restarts += 1
        kept = old.log_path.with_name(f"netswapd.{self._restarts}.log")
        old.log_path.rename(kept)
        self._check_log(kept.read_text())

    def restart_daemon(self, sig: int = signal.SIGTERM, pause: float = 3.0,
                       server: int = 0) -> Daemon:
        """Stop netswapd with `sig`, wait `pause` seconds, start it again on the same config
        and state; the old log is kept beside the new one."""
        self.stop_daemon(sig, server)
        time.sleep(pause)
        return self.start_again(server)

    def ctl(self, *argv: str, server: int = 0) -> str:
        """netswapctl against a running daemon's control socket."""
        control = self.daemons[server].config_path.parent / "control.sock"
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
            for daemon in self.daemons.values():
                if daemon.process.poll() is None:
                    code = daemon.stop()
                    log = daemon.log()
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
