"""One way to run netswapd for a test: a config written from keyword arguments, the process
started and waited for until it listens, stopped with its log checked; and its control
command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from support.wait import wait_until

REPO = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Daemon:
    """A running netswapd and how to reach it."""

    port: int
    unix_socket: Path
    state_dir: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen = field(repr=False)
    metrics_port: int = 0
    # How to GET a path of the metrics listener when the test cannot reach 127.0.0.1 of the
    # daemon's network namespace itself (scrape(port, path) -> body).
    scrape: Callable[[int, str], str] | None = field(default=None, repr=False)

    def metrics(self) -> str:
        """The daemon's Prometheus exposition, as a scrape would get it."""
        if self.scrape is not None:
            return self.scrape(self.metrics_port, "/metrics")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def uri(self, export: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def unix_uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.unix_socket}"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode


def write_config(path: Path, state_dir: Path, port: int, unix_socket: Path, extra: str = "",
                 pool: str = "auto", swap_size: str = "64MiB", exports: str | None = None,
                 nbd_options: str = "", pool_options: str = "", swap_options: str = "",
                 listen: str | None = None, pressure_options: str = "enabled = false",
                 metrics_port: int = 0, nfs_options: str = "enabled = false") -> None:
    if exports is None:
        exports = """
            [[exports]]
            name = "disk"
            backend = "file"
            path = "disk.img"
            size = "64MiB"
            description = "a file export"

            [[exports]]
            name = "ram"
            backend = "memory"
            size = "64MiB"
            description = "remote RAM"

            [[exports]]
            name = "ro"
            backend = "file"
            path = "ro.img"
            size = "1MiB"
            read_only = true
            description = "read only"
        """
    # A test daemon never touches the host's rpcbind or port 111 unless the test asks.
    portmapper = "" if "portmapper" in nfs_options else 'portmapper = "off"'
    # Raw RPC test clients bind any port; the real clients (libnfs, QEMU, as root) bind
    # privileged ones, and their tests ask for the default, "privileged".
    node_ports = "" if "node_ports" in nfs_options else 'node_ports = "any"'
    path.write_text(
        textwrap.dedent(
            f"""
            [daemon]
            state_dir = "{state_dir}"
            log_level = "debug"
            workers = 4
            shutdown_timeout = 20
            control_socket = "{path.parent / 'control.sock'}"

            [pool]
            size = "{pool}"
            lock = "best-effort"
            {pool_options}

            [nbd]
            listen = {listen or f'["127.0.0.1:{port}", "[::1]:{port}"]'}
            unix_socket = "{unix_socket}"
            {nbd_options}

            [swap]
            enabled = true
            size = "{swap_size}"
            {swap_options}

            # Off unless a test is about it: this machine's own memory pressure (other tests
            # swapping, cgroups at their limits) must not throttle unrelated tests.
            [pressure]
            {pressure_options}

            # Off unless a test is about it: NFS binds fixed ports by default, and registers
            # with the host's rpcbind unless told otherwise.
            [nfs]
            {portmapper}
            {node_ports}
            {nfs_options}

            [metrics]
            listen = ["127.0.0.1:{metrics_port}"]
            """
        )
        + textwrap.dedent(exports)
        + textwrap.dedent(extra)
    )


def start_daemon(tmp: Path, cgroup: Path | None = None, prefix: tuple[str, ...] = (),
                 scrape: Callable[[int, str], str] | None = None, **config) -> Daemon:
    """Start netswapd on a config written from `config` (see write_config); with `cgroup`,
    the daemon runs inside that (v1 memory) cgroup from its first instruction. `prefix`
    is a command that execs the daemon's (e.g. ip netns exec NAME), `scrape` how to reach
    its metrics listener from there (Daemon.scrape).

    free_port() cannot hold the port it found: another process on the machine may bind it
    before netswapd does. Such a start is tried again on new ports, twice at most."""
    for attempt in range(3):
        try:
            return _start_daemon_once(tmp, cgroup, prefix, scrape, **config)
        except PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class PortTaken(RuntimeError):
    """netswapd could not bind a port free_port() had found free."""


def _start_daemon_once(tmp: Path, cgroup: Path | None, prefix: tuple[str, ...],
                       scrape: Callable[[int, str], str] | None, **config) -> Daemon:
    state_dir = tmp / "state"
    state_dir.mkdir(exist_ok=True)
    # A read-only export needs its file to exist before the daemon starts.
    ro = state_dir / "ro.img"
    if not ro.exists():
        ro.write_bytes(bytes(range(256)) * 4096)
    port = free_port()
    unix_socket = tmp / "nbd.sock"
    config_path = tmp / "netswapd.toml"
    metrics_port = free_port()
    write_config(config_path, state_dir, port, unix_socket, metrics_port=metrics_port, **config)
    log_path = tmp / "netswapd.log"
    log = open(log_path, "w")
    def join_cgroup():
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    process = subprocess.Popen(
        [*prefix, sys.executable, "-m", "netswap", "--config", str(config_path)],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        preexec_fn=join_cgroup if cgroup is not None else None,
    )
    log.close()
    daemon = Daemon(port, unix_socket, state_dir, config_path, log_path, process, metrics_port,
                    scrape)

    def listening() -> bool:
        if process.poll() is not None:
            error = PortTaken if "Address already in use" in daemon.log() else RuntimeError
            raise error(f"netswapd exited with {process.returncode}:\n{daemon.log()}")
        return "listening on" in daemon.log()

    try:
        wait_until(listening, timeout=30, what="netswapd listening")
    except AssertionError:
        process.kill()
        raise RuntimeError(f"netswapd did not start:\n{daemon.log()}") from None
    return daemon


def stop_clean(daemon) -> str:
    """Stop the daemon; it must exit 0 with no traceback in its log (returned)."""
    code = daemon.stop()
    log = daemon.log()
    assert "Traceback" not in log, log
    assert code == 0, log
    return log


def wait_for_log(daemon, text: str, timeout: float = 20) -> None:
    """Until `text` is in the daemon's log."""
    wait_until(lambda: text in daemon.log(), timeout=timeout,
               what=lambda: f"{text!r} never logged:\n{daemon.log()[-3000:]}")


def netswapctl(daemon, *args):
    """netswapctl on the daemon's control socket, as an operator runs it."""
    socket_path = daemon.config_path.parent / "control.sock"
    return subprocess.run([sys.executable, "-m", "netswap.ctl", "--socket", str(socket_path), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
