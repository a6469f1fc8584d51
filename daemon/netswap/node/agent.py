"""netswap-node's NBD agent: attach a node's swap to netswapd through the kernel's nbd driver,
and keep it attached when the server restarts.

Attach: the first server (in --server order) that takes us gets N sockets negotiated here
(nbd.client), handed to the kernel with netlink CONNECT (TIMEOUT, DEAD_CONN_TIMEOUT, never
DISCONNECT_ON_CLOSE: the device outlives the agent), then mkswap and swapon. An attach refused
(ERR_POLICY: the server's reserve is full) or a server unreachable moves on to the next.

Then the agent waits on the nbd multicast group (LINK_DEAD), on a hang-up of its own copies of
the sockets, and on signals. When sockets die, the kernel holds the device's I/O for up to
DEAD_CONN_TIMEOUT while the agent negotiates new sockets with back-off and brings them with
RECONFIGURE, until the kernel says no dead slot is left (ENOSPC). Before a socket goes to the
kernel, the agent reads the swap header through it: an export that no longer holds the UUID
seen at attach (wiped, replaced) fails the device on purpose (DISCONNECT: processes get I/O
errors) rather than feed the node zeros as its pages.

Nothing on that path may wait on swap: the agent is mlocked with its heap grown at start,
logs without blocking (a line that cannot be written now is dropped and counted), and writes
its state file only on a change of state.

Exit codes: 0 detached (SIGTERM, `netswap-node detach`); 2 config error; 3 no server took the
attach; 4 every connection stayed dead past the dead-connection timeout (the kernel failed the
device's I/O); 5 the export no longer holds this node's swap area (the device was failed on
purpose). 4 and 5 need a human: the unit does not restart on them.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import subprocess
import time
import uuid

from ..nbd import constants as C
from ..nbd.client import ClientHandshake, OptionRefused, SimpleReplyReader, read_request
from ..nbd.errors import ProtocolError
from . import state as node_state
from .swaparea import PAGE, read_device_uuid, swap_uuid

log = logging.getLogger("netswap.node")

EXIT_DETACHED = 0
EXIT_NO_SERVER = 3
EXIT_DEVICE_FAILED = 4
EXIT_AREA_GONE = 5

HANDSHAKE_TIMEOUT = 10.0
# Seconds between reconnect tries, the last repeated: a restarting netswapd is back within
# seconds, and every second of waiting is a second the node's swap I/O is held.
BACKOFF = (0.5, 1.0, 1.0, 1.0, 2.0, 2.0, 5.0)
# The kernel marks a socket dead when its receive fails; the agent's copy may see the hang-up
# first. A RECONFIGURE answered ENOSPC that soon after a hang-up is retried, not believed.
HANGUP_GRACE = 15.0


class AgentExit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class AreaGone(Exception):
    """The export does not hold this node's swap area any more."""


def export_name(name: str) -> str:
    return f"swap/{name}"


class NbdAgent:
    def __init__(self, config, netlink_factory, listener_factory, notifier=None) -> None:
        self.config = config
        self._netlink_factory = netlink_factory
        self._listener_factory = listener_factory
        self._notifier = notifier
        self._state_path = node_state.state_path(config.state_dir, config.name)
        self._copies: dict[int, socket.socket] = {}  # our dup of each socket the kernel has
        self._stopping = False
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self.state: dict = {}

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> int:
        for wakeup in (self._wakeup_r, self._wakeup_w):
            wakeup.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop_signal)
        try:
            with self._netlink_factory() as netlink, self._listener_factory() as listener:
                self.netlink = netlink
                if not self._adopt():
                    self._attach()
                if self._notifier is not None:
                    self._notifier.ready(f"swapping on {self.state['device']} "
                                         f"from {self.state['server']}")
                return self._watch(listener)
        except AgentExit as done:
            (log.info if done.code == EXIT_DETACHED else log.critical)("%s", done)
            self._save(state="detached" if done.code == EXIT_DETACHED else "failed",
                       last_error=None if done.code == EXIT_DETACHED else str(done),
                       exit_code=done.code)
            return done.code

    def _on_stop_signal(self, signum, frame) -> None:
        self._stopping = True

    # -- attach and adopt ------------------------------------------------------------------------

    def _attach(self) -> None:
        errors = []
        for host, port in self.config.servers:
            sockets = []
            try:
                for _ in range(self.config.connections):
                    sockets.append(self._open_socket(host, port))
            except (OSError, OptionRefused, ProtocolError) as exc:
                for sock, _ in sockets:
                    sock.close()
                log.warning("attach: %s:%d did not take %s: %s", host, port,
                            export_name(self.config.name), exc)
                errors.append(f"{host}:{port}: {exc}")
                continue
            self._connect(host, port, sockets)
            return
        raise AgentExit(EXIT_NO_SERVER, "attach: no server took the node: " + "; ".join(errors))

    def _connect(self, host: str, port: int, sockets) -> None:
        export = sockets[0][1]
        if self.config.connections > 1 and not export.transmission_flags & C.TFLAG_CAN_MULTI_CONN:
            raise AgentExit(EXIT_NO_SERVER, f"{host}:{port} does not allow several connections "
                                            "to one export (no CAN_MULTI_CONN)")
        identifier = (f"netswap:{host}:{port}/{export_name(self.config.name)}"
                      if self.netlink.has_backend_identifier else None)
        index = self.netlink.connect(
            [sock.fileno() for sock, _ in sockets], size=export.size, block_size=PAGE,
            server_flags=export.transmission_flags, timeout=int(self.config.io_timeout),
            dead_conn_timeout=int(self.config.dead_conn_timeout), backend_identifier=identifier)
        device = f"/dev/nbd{index}"
        for sock, _ in sockets:
            self._keep_copy(sock)
        _wait_for_device(device, export.size)
        _run("mkswap", device)  # at attach only: a reconnect keeps the node's pages
        area = read_device_uuid(device)
        if area is None:
            raise AgentExit(EXIT_AREA_GONE, f"{device}: no swap header after mkswap")
        _run("swapon", "-p", str(self.config.priority), device)
        self.state = dict(self.state, pid=os.getpid(), protocol="nbd", name=self.config.name,
                          server=f"{host}:{port}", host=host, port=port, index=index,
                          device=device, export=export_name(self.config.name),
                          uuid=str(area), size=export.size, connections=len(sockets),
                          alive=len(sockets), reconnects=0, last_error=None, state="attached",
                          backend_identifier=identifier,
                          dead_conn_timeout=self.config.dead_conn_timeout)
        self._save()
        log.info("attached %s of %s as %s: %d bytes, %d connection(s), swap area %s, "
                 "priority %d", self.state["export"], self.state["server"], device, export.size,
                 len(sockets), area, self.config.priority)

    def _adopt(self) -> bool:
        """Take over a device a previous agent attached (it survives the agent)."""
        previous = node_state.load(self._state_path)
        if not previous or previous.get("protocol") != "nbd" or previous.get("state") == "detached":
            return False
        index = previous.get("index")
        # STATUS lists every nbd device, configured or not: only a connected one is ours.
        if previous.get("state") == "failed" or not self.netlink.status().get(index):
            log.info("state file names nbd%s, which is gone: attaching afresh", index)
            return False
        if node_state.agent_alive(previous):
            raise AgentExit(1, f"another agent (pid {previous['pid']}) tends {previous['device']}")
        self.state = dict(previous, pid=os.getpid(),
                          min_free_kbytes_baseline=self.state.get("min_free_kbytes_baseline"))
        self.state["alive"] = 1  # at least: the device is connected; the probe fills the rest
        log.info("adopted %s (%s of %s, swap area %s)", previous["device"], previous["export"],
                 previous["server"], previous["uuid"])
        self._save()
        # Connections may have died while no agent watched: fill every dead slot there is.
        self._reconnect(self.state["connections"], reason="adopted")
        log.info("%s: adopted, %d of %d connection(s) alive", self.state["device"],
                 self.state["alive"], self.state["connections"])
        return True

    # -- sockets ----------------------------------------------------------------------------------

    def _open_socket(self, host: str, port: int):
        """A socket negotiated on this node's export, blocking, ready for the kernel."""
        sock = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            handshake = ClientHandshake(export_name(self.config.name))
            while handshake.export is None:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed the connection in the handshake")
                handshake.receive_data(data)
                sock.sendall(handshake.data_to_send())
            sock.settimeout(None)  # the kernel's own I/O on it must not see O_NONBLOCK
            return sock, handshake.export
        except BaseException:
            sock.close()
            raise

    def _check_area(self, sock: socket.socket) -> None:
        """Read the swap header through `sock`: it must be the area seen at attach."""
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.sendall(read_request(1, 0, PAGE))
        reader = SimpleReplyReader(1, PAGE)
        while reader.data is None:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection before the header READ")
            reader.receive_data(data)
        sock.settimeout(None)
        found = swap_uuid(reader.data)
        if found != uuid.UUID(self.state["uuid"]):
            raise AreaGone(f"{self.state['export']} on {self.state['server']} no longer holds "
                           f"this node's swap area {self.state['uuid']} (its header: "
                           f"{found or 'none, e.g. wiped'})")

    def _keep_copy(self, sock: socket.socket) -> None:
        # The kernel holds the socket; our copy only watches for the hang-up.
        self._copies[sock.fileno()] = sock

    # -- watching -------------------------------------------------------------------------------

    def _watch(self, listener) -> int:
        poller = select.poll()
        poller.register(self._wakeup_r, select.POLLIN)
        poller.register(listener.fileno(), select.POLLIN)
        watched: set[int] = set()
        last_hangup = 0.0
        while True:
            for fd in set(self._copies) - watched:
                poller.register(fd, select.POLLRDHUP)
                watched.add(fd)
            if self._stopping:
                self._detach()
            # A dying socket is seen twice, as LINK_DEAD and as a hang-up of our copy (when we
            # have one: not for sockets an earlier agent brought): act on the larger count.
            linked_dead = hung_up = 0
            for fd, events in poller.poll(1000):
                if fd == self._wakeup_r.fileno():
                    _drain(self._wakeup_r)
                elif fd == listener.fileno():
                    linked_dead += listener.read().count(self.state["index"])
                elif events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                    poller.unregister(fd)
                    watched.discard(fd)
                    self._copies.pop(fd).close()
                    hung_up += 1
                    last_hangup = time.monotonic()
            dead = max(linked_dead, hung_up)
            if dead:
                log.warning("%s: %d connection(s) to %s died", self.state["device"], dead,
                            self.state["server"])
                self.state["alive"] = max(0, self.state["alive"] - dead)
                self._reconnect(dead, reason="connection lost", hung_up_at=last_hangup)

    def _reconnect(self, wanted: int, reason: str, hung_up_at: float = 0.0) -> None:
        """Bring new sockets until `wanted` dead slots are filled or the kernel has none."""
        host, port = self.state["host"], self.state["port"]
        self._save(state="reconnecting")
        dead_since = time.monotonic()
        tries = 0
        while wanted > 0:
            if self._stopping:
                self._detach()
            waited = time.monotonic() - dead_since
            if self.state["alive"] == 0 and waited > self.config.dead_conn_timeout:
                raise AgentExit(EXIT_DEVICE_FAILED,
                                f"{self.state['device']}: {self.state['server']} away for "
                                f"{waited:.0f} s, longer than the dead-connection timeout "
                                f"({self.config.dead_conn_timeout:.0f} s): the kernel failed "
                                "the device's I/O; swapped-out pages may be lost")
            tries += 1
            try:
                sock, export = self._open_socket(host, port)
            except (OSError, OptionRefused, ProtocolError) as exc:
                delay = BACKOFF[min(tries - 1, len(BACKOFF) - 1)]
                if self.state["alive"] == 0:
                    # Wake at the kernel's own deadline, to say at once what it just did.
                    left = dead_since + self.config.dead_conn_timeout - time.monotonic()
                    delay = max(0.05, min(delay, left + 0.05))
                log.warning("reconnect try %d to %s:%d (%s): %s; next in %.1f s", tries, host,
                            port, reason, exc, delay)
                self.state["last_error"] = f"reconnect: {exc}"
                self._sleep(delay)
                continue
            try:
                self._check_area(sock)
                # The device's TIMEOUT tells netlink.reconfigure whether the kernel took the
                # socket (it answers 0 also when no dead slot was left: see there).
                self.netlink.reconfigure(self.state["index"], [sock.fileno()],
                                         timeout=int(self.config.io_timeout),
                                         backend_identifier=self.state.get("backend_identifier"))
            except AreaGone as gone:
                sock.close()
                self._fail_device(str(gone))
            except (OSError, ProtocolError) as exc:
                sock.close()
                if getattr(exc, "errno", None) == errno.ENOSPC:
                    if time.monotonic() - hung_up_at < HANGUP_GRACE and tries < 50:
                        self._sleep(0.2)  # our copy saw the hang-up before the kernel did
                        continue
                    break  # no dead slot left: every connection is alive
                log.warning("reconnect try %d to %s:%d: %s", tries, host, port, exc)
                self._sleep(BACKOFF[min(tries - 1, len(BACKOFF) - 1)])
                continue
            self._keep_copy(sock)
            wanted -= 1
            self.state["alive"] = min(self.state["connections"], self.state["alive"] + 1)
            self.state["reconnects"] += 1
            log.info("%s: new connection to %s brought in (%s, try %d, %.1f s after the "
                     "loss)", self.state["device"], self.state["server"], reason, tries,
                     time.monotonic() - dead_since)
        # Every dead slot filled, or the kernel had none left: all connections are alive.
        self._save(state="attached", alive=self.state["connections"], last_error=None)

    def _sleep(self, seconds: float) -> None:
        select.select([self._wakeup_r], [], [], seconds)
        _drain(self._wakeup_r)

    # -- endings ------------------------------------------------------------------------------

    def _fail_device(self, why: str) -> None:
        log.critical("%s: failing the device rather than hand the node wrong pages", why)
        try:
            self.netlink.disconnect(self.state["index"])
        except OSError as exc:
            log.error("disconnect of %s failed: %s", self.state["device"], exc)
        raise AgentExit(EXIT_AREA_GONE, why)

    def _detach(self) -> None:
        device = self.state["device"]
        log.info("detaching %s: swapoff (reads every swapped-out page back), then disconnect",
                 device)
        self._save(state="detaching")
        if node_state.swap_used_kib(device) is not None:
            _run("swapoff", device, timeout=None)
        self.netlink.disconnect(self.state["index"])
        for sock in self._copies.values():
            sock.close()
        self._copies.clear()
        raise AgentExit(EXIT_DETACHED, f"detached {device}")

    def _save(self, **changes) -> None:
        self.state.update(changes)
        if self.state.get("device"):
            node_state.save(self._state_path, self.state)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass


def _wait_for_device(device: str, size: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(device, "rb") as f:
                if f.seek(0, os.SEEK_END) == size:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AgentExit(1, f"{device} did not appear with {size} bytes")
        time.sleep(0.05)


def _run(*argv: str, timeout: float | None = 120) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AgentExit(1, f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()}")
