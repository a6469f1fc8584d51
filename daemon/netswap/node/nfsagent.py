"""netswap-node's NFS mode: the README's mount of /swap and swapon of the node's file.

The hard mount does the reconnecting (the kernel client retries until the server is back, and
netswapd's handles survive its restarts), so the agent attaches, waits for a stop signal and
detaches (swapoff, umount). Its state file says what is mounted where, for `status`.
"""

from __future__ import annotations

import logging
import os
import signal

from . import state as node_state
from .agent import EXIT_DETACHED, EXIT_NO_SERVER, AgentExit, _run
from .placement import rank

log = logging.getLogger("netswap.node")


class NfsAgent:
    def __init__(self, config, notifier=None) -> None:
        self.config = config
        self._notifier = notifier
        self._state_path = node_state.state_path(config.state_dir, config.name)
        self.state: dict = {}

    def run(self) -> int:
        stop = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.append(True))
        try:
            self._attach()
            if self._notifier is not None:
                self._notifier.ready(f"swapping on {self.state['device']}")
            while not stop:
                signal.pause()
            self._detach()
        except AgentExit as done:
            (log.info if done.code == EXIT_DETACHED else log.critical)("%s", done)
            return done.code
        return EXIT_DETACHED

    def _attach(self) -> None:
        mount = str(self.config.nfs_mount)
        os.makedirs(mount, exist_ok=True)
        errors = []
        # The same placement as NBD's: the node's ranking of the servers, not the list's order.
        for host, _ in rank(self.config.name, self.config.servers):
            options = (f"vers=3,proto=tcp,port={self.config.nfs_port},"
                       f"mountport={self.config.mount_port},mountproto=tcp,nolock,hard")
            try:
                _run("mount", "-t", "nfs", "-o", options, f"{host}:/swap", mount)
            except AgentExit as exc:
                log.warning("attach: %s did not mount: %s", host, exc)
                errors.append(f"{host}: {exc}")
                continue
            device = os.path.join(mount, self.config.name)
            _run("mkswap", device)
            _run("swapon", "-p", str(self.config.priority), device)
            self.state = dict(pid=os.getpid(), protocol="nfs", name=self.config.name,
                              server=host, device=device, mount=mount, state="attached",
                              reconnects=0, last_error=None, connections=1, alive=1)
            node_state.save(self._state_path, self.state)
            log.info("attached %s over NFS from %s, priority %d", device, host,
                     self.config.priority)
            return
        raise AgentExit(EXIT_NO_SERVER, "attach: no server took the node: " + "; ".join(errors))

    def _detach(self) -> None:
        device = self.state["device"]
        log.info("detaching %s: swapoff, then umount", device)
        if node_state.swap_used_kib(device) is not None:
            _run("swapoff", device, timeout=None)
        _run("umount", self.state["mount"])
        node_state.save(self._state_path, dict(self.state, state="detached"))
        raise AgentExit(EXIT_DETACHED, f"detached {device}")
