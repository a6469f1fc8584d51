"""netswap-node's NBD agent: attach a node's swap to netswapd through the kernel's nbd driver,
keep it attached when a server restarts, and (--mirror) keep it alive when a server dies.

Attach: the servers are ranked by rendezvous hashing of the node's name (placement.py); the
first that takes us (two, mirrored) gets N sockets negotiated here (nbd.client), handed to the
kernel with netlink CONNECT (TIMEOUT, DEAD_CONN_TIMEOUT, never DISCONNECT_ON_CLOSE: the
device outlives the agent). A server that refuses (ERR_POLICY: its reserve is full) or is
unreachable is skipped for the next. Plain: mkswap and swapon on the nbd device. Mirror: an md
RAID1 with an internal bitmap over the two nbd devices (mdraid.py), mkswap and swapon on it.

Then the agent waits on the nbd multicast group (LINK_DEAD), on a hang-up of its own copies of
the sockets, and on signals. When sockets die, the kernel holds the device's I/O for up to
DEAD_CONN_TIMEOUT while the member (member.py) negotiates new sockets with back-off and brings
them with RECONFIGURE, until the kernel says no dead slot is left (ENOSPC). Before a socket
goes to the kernel, the member reads its identity through it (the swap header, or the md
superblock): an export that no longer holds it is never handed to the kernel.

Plain, a server away past the timeout or a wiped export fails the device on purpose (the
kernel fails its I/O; DISCONNECT), rather than feed the node zeros as its pages. Mirror, the
timeout is short (5 s by default): the member's device is disconnected (its held I/O fails,
md marks it faulty and goes on with the other), and the agent keeps trying its server; once
it answers, a new device is connected and re-added (md copies what the bitmap says it
missed), or added as new (a full resync) if the export no longer holds the member.

Nothing on that path may wait on swap: the agent is mlocked with its heap grown at start,
logs without blocking (a line that cannot be written now is dropped and counted), and writes
its state file only on a change of state. mdadm runs only to build the mirror and to put a
member back, never while the node's swap depends on it: a member is re-added while the other
carries the swap.

Exit codes: 0 detached (SIGTERM, `netswap-node detach`); 2 config error; 3 no server took the
attach (mirror: fewer than two); 4 every connection stayed dead past the dead-connection
timeout (mirror: of both members; the kernel failed the device's I/O); 5 the export no longer
holds this node's swap area (plain; the device was failed on purpose). 3, 4 and 5 need a
human: the unit does not restart on them. `netswap-node status` exits 6 while a mirror is
degraded.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter

from . import mdraid
from . import state as node_state
from .config import format_server
from .member import NEGOTIATION_ERRORS, AreaGone, Member
from .placement import rank
from .swaparea import SwapHeader, read_device_uuid

log = logging.getLogger("netswap.node")

EXIT_DETACHED = 0
EXIT_NO_SERVER = 3
EXIT_DEVICE_FAILED = 4
EXIT_AREA_GONE = 5

# A mirror member md marked faulty while its connections live (an I/O error) is put back at
# most this often: a member that keeps failing is left out, and said so, not churned.
READD_INTERVAL = 30.0
# While its server is away, a mirror member is tried this often.
AWAY_RETRY = 5.0
# After its device is disconnected, md lets a member go once its held I/O has failed; longer
# than this is said in the log.
TAKE_OUT_PATIENCE = 30.0
# An exiting agent waits this long for its last state to be written.
FINAL_STATE_WAIT = 30.0


class AgentExit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class NbdAgent:
    def __init__(self, config, netlink_factory, listener_factory, notifier=None) -> None:
        self.config = config
        self._netlink_factory = netlink_factory
        self._listener_factory = listener_factory
        self._notifier = notifier
        self._state_path = node_state.state_path(config.state_dir, config.name)
        self._stopping = False
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self.members: list[Member] = []
        self.md: str | None = None  # the mirror's md device
        self.health: str | None = None  # the mirror's, as last logged
        self._away: set[Member] = set()  # mirror members out of the array, their server tried
        self._readded_at: dict[Member, float] = {}
        self._taking_out: dict[Member, float] = {}  # members md has not let go of, since when
        self._slow_take_out: set[Member] = set()  # (said so once)
        self.state: dict = {}
        self._writer: node_state.StateWriter | None = None  # while run() runs
        # The md device, open from the start: marking a member faulty must not wait on an
        # open (a file to allocate) while the node's swap is stalled.
        self._md_fd: int | None = None

    @property
    def device(self) -> str:
        """What the node swaps on: the md device, or the one member's nbd device."""
        return self.md or self.members[0].device

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> int:
        for wakeup in (self._wakeup_r, self._wakeup_w):
            wakeup.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop_signal)
        self._writer = node_state.StateWriter(self._state_path)
        try:
            with self._netlink_factory() as netlink, self._listener_factory() as listener:
                self.netlink = netlink
                if not self._adopt():
                    self._attach()
                if self._notifier is not None:
                    self._notifier.ready(f"swapping on {self.device} from "
                                         f"{self.state['server']}")
                return self._watch(listener)
        except AgentExit as done:
            (log.info if done.code == EXIT_DETACHED else log.critical)("%s", done)
            self._save(state="detached" if done.code == EXIT_DETACHED else "failed",
                       last_error=None if done.code == EXIT_DETACHED else str(done),
                       exit_code=done.code)
            return done.code
        finally:
            self._close_md()
            # The last state is what `netswap-node detach` and the next agent read.
            if not self._writer.close(FINAL_STATE_WAIT):
                log.error("%s: the last state was not written in %.0f s", self._state_path,
                          FINAL_STATE_WAIT)

    def _on_stop_signal(self, signum, frame) -> None:
        self._stopping = True

    # -- attach and adopt ------------------------------------------------------------------------

    def _attach(self) -> None:
        wanted = 2 if self.config.mirror else 1
        ranked = rank(self.config.name, self.config.servers)
        log.info("placement of %s: %s", self.config.name,
                 ", ".join(format_server(server) for server in ranked))
        errors = []
        for host, port in ranked:
            member = Member(self.config.name, host, port, self.config)
            try:
                opened = member.open_sockets()
            except NEGOTIATION_ERRORS as exc:
                log.warning("attach: %s did not take %s: %s", member.server, member.export, exc)
                errors.append(f"{member.server}: {exc}")
                continue
            try:
                member.connect(self.netlink, opened)
            except OSError as exc:
                for sock, _ in opened:
                    sock.close()
                self._disconnect_all()
                raise AgentExit(1, f"attach: the kernel did not take {member.server}'s "
                                   f"sockets: {exc}") from exc
            self.members.append(member)
            log.info("attached %s of %s as %s: %d bytes, %d connection(s)", member.export,
                     member.server, member.device, member.size, member.connections)
            if len(self.members) == wanted:
                break
        if len(self.members) < wanted:
            self._disconnect_all()
            took = f"only {self.members[0].server} took it; " if self.members else ""
            raise AgentExit(EXIT_NO_SERVER, f"attach: {'a mirror needs two servers: ' if wanted == 2 else ''}"
                                            f"{took}no{' other' if took else ''} server took "
                                            f"the node: " + "; ".join(errors))
        try:
            if self.config.mirror:
                self._build_mirror()
            _run("mkswap", self.device)  # at attach only: a reconnect keeps the node's pages
            area = read_device_uuid(self.device)
            if area is None:
                raise AgentExit(EXIT_AREA_GONE, f"{self.device}: no swap header after mkswap")
            if not self.config.mirror:
                self.members[0].identity = SwapHeader(area)
            _run("swapon", "-p", str(self.config.priority), self.device)
        except (AgentExit, OSError):
            self._teardown()
            raise
        self._save(pid=os.getpid(), protocol="nbd", name=self.config.name, uuid=str(area),
                   mirror=self.config.mirror, state="attached", last_error=None,
                   dead_conn_timeout=self.config.dead_conn_timeout)
        log.info("swapping on %s: swap area %s, priority %d%s", self.device, area,
                 self.config.priority, f", mirrored on {self.state['server']}"
                 if self.md else "")

    def _build_mirror(self) -> None:
        md = mdraid.free_md_device()
        devices = [member.device for member in self.members]
        try:
            array = mdraid.create(md, devices, self.config.name)
        except mdraid.MdError as exc:
            raise AgentExit(1, f"mirror: {exc}") from exc
        self.md = md
        self._md_fd = os.open(md, os.O_RDONLY)
        for member in self.members:
            member.identity = mdraid.MdMember(array)
        self.state["array"] = str(array)
        self.health = str(mdraid.read_state(md))
        self.state["health"] = self.health
        log.info("mirror %s: RAID1 over %s, array %s, internal bitmap: %s", md,
                 " and ".join(f"{m.device} ({m.server})" for m in self.members), array,
                 self.health)

    def _adopt(self) -> bool:
        """Take over the devices a previous agent attached (they survive the agent)."""
        previous = node_state.load(self._state_path)
        if not previous or previous.get("protocol") != "nbd" or previous.get("state") == "detached":
            return False
        saved = previous.get("members") or []
        # STATUS lists every nbd device, configured or not: only a connected one is ours.
        connected = self.netlink.status()
        if previous.get("state") == "failed" or not any(connected.get(s.get("index"))
                                                         for s in saved):
            log.info("state file names %s, which is gone: attaching afresh",
                     previous.get("device"))
            return False
        if bool(previous.get("mirror")) != self.config.mirror:
            raise AgentExit(1, f"{previous['device']} was attached "
                               f"{'with' if previous.get('mirror') else 'without'} --mirror: "
                               "detach it first (netswap-node detach)")
        if node_state.agent_alive(previous):
            raise AgentExit(1, f"another agent (pid {previous['pid']}) tends {previous['device']}")
        self.state = dict(previous, pid=os.getpid(),
                          min_free_kbytes_baseline=self.state.get("min_free_kbytes_baseline"))
        if previous.get("mirror"):
            self.md = previous["device"]
            self._md_fd = os.open(self.md, os.O_RDONLY)
            self.health = previous.get("health")
        for entry in saved:
            member = Member(self.config.name, entry["host"], entry["port"], self.config)
            member.restore(entry)
            self.members.append(member)
            if self.md:
                member.identity = mdraid.MdMember(uuid.UUID(previous["array"]))
            else:
                member.identity = SwapHeader(uuid.UUID(previous["uuid"]))
            if entry.get("away") or not connected.get(member.index):
                self._away.add(member)  # mirror only: a plain device not connected is gone
                member.alive = 0
            else:
                # Connections may have died while no agent watched: fill every dead slot.
                member.lost(member.connections, "adopted")
        log.info("adopted %s (%s of %s, swap area %s)", previous["device"],
                 previous["export"], previous["server"], previous["uuid"])
        self._save()
        return True

    # -- watching -------------------------------------------------------------------------------

    def _watch(self, listener) -> int:
        poller = select.poll()
        poller.register(self._wakeup_r, select.POLLIN)
        poller.register(listener.fileno(), select.POLLIN)
        watched: dict[int, tuple] = {}  # fd -> (member, its socket) registered in poller
        last_hangup = 0.0
        while True:
            # Copies closed since (a member left the mirror) out, new ones in: by identity,
            # since a closed socket's number comes back for the next one.
            for fd, (member, sock) in list(watched.items()):
                if member.copies.get(fd) is not sock:
                    poller.unregister(fd)
                    del watched[fd]
            for member in self.members:
                for fd, sock in member.copies.items():
                    if fd not in watched:
                        poller.register(fd, select.POLLRDHUP)
                        watched[fd] = (member, sock)
            if self._stopping:
                self._detach()
            # A dying socket is seen twice, as LINK_DEAD and as a hang-up of our copy (when we
            # have one: not for sockets an earlier agent brought): act on the larger count.
            linked_dead: Counter = Counter()
            hung_up: Counter = Counter()
            for fd, events in poller.poll(self._poll_timeout_ms()):
                if fd == self._wakeup_r.fileno():
                    _drain(self._wakeup_r)
                elif fd == listener.fileno():
                    for index in listener.read():
                        for member in self.members:
                            if member.index == index and member not in self._away:
                                linked_dead[member] += 1
                elif events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                    poller.unregister(fd)
                    member, sock = watched.pop(fd)
                    if member.copies.get(fd) is sock:
                        del member.copies[fd]
                        sock.close()
                        hung_up[member] += 1
                        last_hangup = time.monotonic()
            for member in self.members:
                dead = max(linked_dead[member], hung_up[member])
                if dead:
                    log.warning("%s: %d connection(s) to %s died", member.device, dead,
                                member.server)
                    member.lost(dead, "connection lost", hung_up_at=last_hangup)
                    self._save(state="reconnecting")
            for member in list(self._taking_out):
                self._take_out(member)
            for member in self.members:
                self._tend(member)
            if self.md:
                self._watch_mirror()

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        due = [m.next_try for m in self.members if m.missing or m in self._away]
        if not due:
            return 1000
        return int(max(0.0, min(1.0, min(due) - now)) * 1000)

    def _tend(self, member: Member) -> None:
        """Move `member` on: a try at a dead slot, or at bringing a mirror member back."""
        if self._stopping:
            return
        if member in self._away:
            if time.monotonic() >= member.next_try:
                self._rejoin(member)
            return
        if not member.missing:
            return
        waited = member.dead_for()
        if waited > self.config.dead_conn_timeout:
            why = (f"{member.server} away for {waited:.0f} s, longer than the dead-connection "
                   f"timeout ({self.config.dead_conn_timeout:.0f} s): "
                   + (f"{member.device} marked faulty in md and disconnected" if self.md else
                      f"the kernel failed {member.device}'s I/O"))
            if not self.md:
                raise AgentExit(EXIT_DEVICE_FAILED, f"{member.device}: {why}; swapped-out "
                                                    "pages may be lost")
            self._leave_mirror(member, why)
            return
        if time.monotonic() < member.next_try:
            return
        try:
            tried = member.step(self.netlink)
        except AreaGone as gone:
            if not self.md:
                self._fail_device(member, str(gone))
            self._leave_mirror(member, str(gone))
            return
        if tried.done:
            if member.reason == "adopted":
                log.info("%s: adopted, %d of %d connection(s) alive", member.device,
                         member.alive, member.connections)
            self._save(state=self._overall(), last_error=None)

    # -- the mirror -----------------------------------------------------------------------------

    def _leave_mirror(self, member: Member, why: str) -> None:
        """Take `member` out of the array: its device disconnected (the I/O the kernel holds
        for it fails, md goes on with the other member), its server tried from now on."""
        log.warning("%s: %s; %s goes on with %s, the member is out until %s is back",
                    member.device, why, self.md,
                    ", ".join(m.device for m in self.members if m is not member) or "nothing",
                    member.server)
        self._away.add(member)
        member.last_error = why
        # Faulty first, then disconnected: md must know before the member's held writes fail
        # (member.MIRROR_KERNEL_GRACE says why).
        try:
            mdraid.mark_faulty(self._md_fd, member.device)
        except OSError as exc:
            log.error("%s: marking %s faulty failed: %s", self.md, member.device, exc)
        try:
            self.netlink.disconnect(member.index)
        except OSError as exc:
            log.error("disconnect of %s failed: %s", member.device, exc)
        member.close_copies()
        member.missing, member.alive, member.tries = 0, 0, 0
        member.next_try = time.monotonic() + AWAY_RETRY
        self._take_out(member)
        if all(m in self._away for m in self.members):
            raise AgentExit(EXIT_DEVICE_FAILED, f"{self.md}: every member lost ("
                            + "; ".join(f"{m.server}: {m.last_error}" for m in self.members)
                            + "); swapped-out pages may be lost")
        self._save(state="degraded", last_error=why)

    def _take_out(self, member: Member) -> None:
        """One try at taking `member` out of the array; md refuses (EBUSY) until the I/O it
        holds for the member has failed, so the loop tries again on its next turn."""
        try:
            out = mdraid.take_out(self.md, member.device)
        except mdraid.MdError as exc:
            log.error("%s: %s stays in the array as faulty: %s", self.md, member.device, exc)
            out = True  # said once; its rejoin will find it
        if out:
            self._taking_out.pop(member, None)
            self._slow_take_out.discard(member)
            return
        since = self._taking_out.setdefault(member, time.monotonic())
        if time.monotonic() - since > TAKE_OUT_PATIENCE and member not in self._slow_take_out:
            self._slow_take_out.add(member)
            log.warning("%s: md still holds I/O for %s after %.0f s; it goes when that fails",
                        self.md, member.device, TAKE_OUT_PATIENCE)

    def _rejoin(self, member: Member) -> None:
        """One try at bringing an away member back: a new device on its server, re-added
        (md copies what the bitmap says it missed) or, if the export lost the member, added
        as new (a full copy from the other)."""
        if member in self._taking_out:
            return  # its old device is still in the array
        member.tries += 1
        try:
            opened = member.open_sockets()
        except NEGOTIATION_ERRORS as exc:
            member.next_try = time.monotonic() + AWAY_RETRY
            if member.tries == 1 or member.tries % 12 == 0:
                log.warning("%s: %s still away (try %d): %s", self.md, member.server,
                            member.tries, exc)
            return
        holds_member = True
        try:
            member.check_identity(opened[0][0])
        except AreaGone as gone:
            holds_member = False
            log.warning("%s: %s; it joins as a new member (a full resync)", self.md, gone)
        except NEGOTIATION_ERRORS as exc:
            for sock, _ in opened:
                sock.close()
            member.next_try = time.monotonic() + AWAY_RETRY
            log.warning("%s: %s answered, then not: %s", self.md, member.server, exc)
            return
        try:
            member.connect(self.netlink, opened)
            if holds_member:
                how = mdraid.re_add(self.md, member.device)
            else:
                mdraid.add_new(self.md, member.device)
                how = "added as new"
        except OSError as exc:  # MdError included
            for sock, _ in opened:
                sock.close()
            member.next_try = time.monotonic() + AWAY_RETRY
            log.error("%s: bringing %s back failed: %s", self.md, member.server, exc)
            return
        self._away.discard(member)
        member.reconnects += 1
        member.last_error = None
        log.info("%s: %s is back as %s, %s (try %d)", self.md, member.server, member.device,
                 how, member.tries)
        self._save(state=self._overall(), last_error=None)

    def _watch_mirror(self) -> None:
        state = mdraid.read_state(self.md)
        shown = str(state)
        if shown != self.health:
            level = logging.INFO if state.health in ("clean", "resyncing") else logging.WARNING
            log.log(level, "%s: %s", self.md, shown)
            self.health = shown
            self._save(health=shown, state=self._overall())
        # A member md failed while its connections live (an I/O error): put it back, but not
        # over and over.
        for member in self.members:
            md_state = state.members.get(os.path.basename(member.device), "")
            if ("faulty" in md_state.split(",") and member not in self._away
                    and not member.missing):
                now = time.monotonic()
                if now - self._readded_at.get(member, -READD_INTERVAL) < READD_INTERVAL:
                    continue
                self._readded_at[member] = now
                try:
                    if not mdraid.take_out(self.md, member.device):
                        del self._readded_at[member]  # md still holds I/O for it: next turn
                        continue
                    how = mdraid.re_add(self.md, member.device)
                    log.warning("%s: md had failed %s (%s) while connected; %s", self.md,
                                member.device, member.server, how)
                except mdraid.MdError as exc:
                    log.error("%s: %s stays out: %s", self.md, member.device, exc)

    def _overall(self) -> str:
        if self._away:
            return "degraded"
        if any(m.missing for m in self.members):
            return "reconnecting"
        return "attached"

    # -- endings ------------------------------------------------------------------------------

    def _fail_device(self, member: Member, why: str) -> None:
        log.critical("%s: failing the device rather than hand the node wrong pages", why)
        try:
            self.netlink.disconnect(member.index)
        except OSError as exc:
            log.error("disconnect of %s failed: %s", member.device, exc)
        raise AgentExit(EXIT_AREA_GONE, why)

    def _detach(self) -> None:
        device = self.device
        log.info("detaching %s: swapoff (reads every swapped-out page back), then disconnect",
                 device)
        self._save(state="detaching")
        if node_state.swap_used_kib(device) is not None:
            _run("swapoff", device, timeout=None)
        self._teardown()
        raise AgentExit(EXIT_DETACHED, f"detached {device}")

    def _teardown(self) -> None:
        """Stop the mirror (if any) and disconnect every member's device."""
        if self.md:
            self._close_md()  # md stops an array only when nobody else has it open
            try:
                mdraid.stop(self.md)
            except mdraid.MdError as exc:
                log.error("%s", exc)
        self._disconnect_all()

    def _close_md(self) -> None:
        if self._md_fd is not None:
            os.close(self._md_fd)
            self._md_fd = None

    def _disconnect_all(self) -> None:
        for member in self.members:
            if member.index is not None and member not in self._away:
                try:
                    self.netlink.disconnect(member.index)
                except OSError as exc:
                    log.error("disconnect of %s failed: %s", member.device, exc)
            member.close_copies()

    def _save(self, **changes) -> None:
        self.state.update(changes)
        if not self.members:
            return
        members = [dict(m.saved(), away=m in self._away) for m in self.members]
        self.state.update(
            device=self.device, members=members, mirror=bool(self.md),
            server=", ".join(m.server for m in self.members),
            export=self.members[0].export,
            connections=sum(m.connections for m in self.members),
            alive=sum(m.alive for m in self.members),
            reconnects=sum(m.reconnects for m in self.members))
        if self.md:
            self.state["md"] = self.md
        self._writer.submit(self.state)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass


def _run(*argv: str, timeout: float | None = 120) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AgentExit(1, f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()}")
