"""systemd integration without libsystemd: sd_notify(3) and sd_listen_fds(3) in pure Python.

Both protocols are small and stable, so they are spoken here directly rather than through a
C binding that every install would have to build:

- Notification. The service manager passes ``NOTIFY_SOCKET``, a Unix datagram socket: a
  filesystem path, or ``@name`` for a name in the abstract namespace. Each message is one
  datagram of newline-separated ``KEY=VALUE`` assignments. The manager takes the sender's PID
  from the kernel's SCM_CREDENTIALS, so any thread of the main process may send under
  ``NotifyAccess=main``.
- Watchdog. With ``WatchdogSec=`` set the manager passes ``WATCHDOG_USEC`` (and
  ``WATCHDOG_PID``, the process it is meant for) and restarts the service when
  ``WATCHDOG=1`` has not arrived for that long. sd_watchdog_enabled(3) advises pinging at half
  the interval, so one late ping is not fatal.
- Socket activation. The manager passes listening sockets as fds 3, 4, ... with
  ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (the process they are for) and optionally
  ``LISTEN_FDNAMES`` (colon-separated names).

Nothing here may take the daemon down: the notification calls never raise. Outside systemd
(no ``NOTIFY_SOCKET``: tests, ``make run``, a foreground debug run) they do nothing. If the
socket cannot be reached they return False and the first failure is logged at debug level:
the manager that would read the message is the one that is not there.

    Notifier.from_environment(environ=None) -> Notifier   (a no-op Notifier outside systemd)
    Notifier(address=None, watchdog_usec=None)
      .enabled                                  NOTIFY_SOCKET was given
      .ready(status) / .status(text)            READY=1 + STATUS= / STATUS=
      .reloading(status=None)                   RELOADING=1 + MONOTONIC_USEC=
      .ready_after_reload(status)               READY=1 + STATUS=, the end of a reload
      .stopping(status)                         STOPPING=1 + STATUS=
      .watchdog_ping()                          WATCHDOG=1
      .watchdog_interval                        seconds between pings (WATCHDOG_USEC / 2) or None
      .start_watchdog(is_healthy) -> bool       a thread pinging while is_healthy() is true
      .stop_watchdog(timeout=...) -> bool
      .close()
    listen_fds(environ=None, unset_environment=True) -> list[socket.socket]
    listen_fds_with_names(...) -> list[tuple[str, socket.socket]]
    adopt_listen_fds(environ=None) -> int         keep the passed sockets for the listeners
    take_tcp_listener(host, port) / take_unix_listener(path) -> socket or None
    release_unclaimed_listeners() -> list[str]    close and name the sockets nothing took

With socket activation (systemd/netswapd.socket) the manager, not netswapd, owns the
listening sockets: a connection made while netswapd restarts waits in the socket's backlog
and is served once it is up again, instead of being refused. Each listener the config names
takes the passed socket bound to its address, and binds its own where none was passed, so the
same config runs with and without the socket unit.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, MutableMapping, Optional

log = logging.getLogger("netswap.systemd")

# The first fd systemd passes (SD_LISTEN_FDS_START): 0-2 are stdin, stdout and stderr.
LISTEN_FDS_START = 3

# How long one notification may wait for room in the manager's receive queue. PID 1 drains
# it promptly; one that has not for a second is overloaded or wedged, and a lost STATUS= or
# WATCHDOG=1 is better than a storage daemon whose start, reload or shutdown stalls on it.
SEND_TIMEOUT = 1.0


def _monotonic_usec() -> int:
    # CLOCK_MONOTONIC in microseconds: the clock the manager itself reads for MONOTONIC_USEC.
    # time.monotonic() is that clock on Linux too, but the contract names the clock, so ask
    # for it by name.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _one_line(text: str) -> str:
    # A newline would end the assignment and start another: "STATUS=ok\nREADY=1" from a
    # status built out of an error message must not become a READY=1.
    return " ".join(str(text).splitlines())


class Notifier:
    """Tells the service manager about the daemon's state over ``$NOTIFY_SOCKET``.

    One instance per process, made by from_environment(). Every message method returns True
    if the datagram was sent and False otherwise (no socket configured, or sending failed);
    none raises. Safe to call from any thread.
    """

    def __init__(self, address: Optional[str | bytes] = None,
                 watchdog_usec: Optional[int] = None) -> None:
        """``address``: the socket as sendto() takes it (a path, or bytes starting with NUL
        for an abstract name), or None for a notifier that does nothing. ``watchdog_usec``:
        the manager's watchdog timeout in microseconds, or None for no watchdog."""
        self._address = address
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._lock = threading.Lock()  # guards the socket's creation and _failure_logged
        self._sock: Optional[socket.socket] = None
        self._failure_logged = False
        self._watchdog_thread: Optional[threading.Thread] = None
        self._watchdog_stop = threading.Event()

    @classmethod
    def from_environment(cls, environ: Optional[MutableMapping[str, str]] = None) -> "Notifier":
        """The notifier systemd asked for through NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID
        (``environ`` defaults to os.environ), or one that does nothing when they are unset.

        The variables are left in place: children cannot impersonate the daemon under
        NotifyAccess=main, and netswapd starts none."""
        env = os.environ if environ is None else environ
        address = _parse_notify_socket(env.get("NOTIFY_SOCKET", ""))
        return cls(address, _parse_watchdog(env) if address is not None else None)

    # Messages -------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether there is a manager to notify (NOTIFY_SOCKET was set and usable)."""
        return self._address is not None

    def ready(self, status: str) -> bool:
        """Start-up is complete: the service is up (listening) and its dependents may start."""
        return self._send("READY=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """A one-line state summary for ``systemctl status``."""
        return self._send(f"STATUS={_one_line(text)}")

    def reloading(self, status: Optional[str] = None) -> bool:
        """A reload has begun; the manager shows the unit as "reloading" until
        ready_after_reload(). MONOTONIC_USEC tells a Type=notify-reload manager (systemd 253
        and later) that this RELOADING=1 was sent after the reload it asked for, not before;
        earlier versions ignore it."""
        fields = ["RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        return self._send(*fields)

    def ready_after_reload(self, status: str) -> bool:
        """The reload is over, whether the new config was taken or refused: the service is
        running again. Say which in ``status``."""
        return self._send("READY=1", f"STATUS={_one_line(status)}")

    def stopping(self, status: str) -> bool:
        """Shutdown has begun (in-flight requests are being finished)."""
        return self._send("STOPPING=1", f"STATUS={_one_line(status)}")

    def watchdog_ping(self) -> bool:
        """One keep-alive; start_watchdog() sends these on a schedule."""
        return self._send("WATCHDOG=1")

    def close(self) -> None:
        """Stop the watchdog thread and close the socket; later messages are not sent."""
        self.stop_watchdog()
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self._address = None

    def _send(self, *fields: str) -> bool:
        # One datagram per message, so the manager applies its assignments together: it must
        # never see READY=1 without the STATUS= that came with it.
        if self._address is None:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            self._socket().sendto(message, self._address)
        except OSError as exc:  # ENOENT, ECONNREFUSED, a timeout: the manager is not there
            with self._lock:
                first = not self._failure_logged
                self._failure_logged = True
            if first:
                log.debug("cannot notify the service manager at %r (further failures not "
                          "logged): %s", self._address, exc)
            return False
        return True

    def _socket(self) -> socket.socket:
        # One socket for the notifier's life (sd_notify opens one per message): the watchdog
        # sends every few seconds for as long as the daemon runs. Made on first use, so that
        # an unused notifier holds no fd. Python sockets are close-on-exec already.
        with self._lock:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.settimeout(SEND_TIMEOUT)
                self._sock = sock
            return self._sock

    # Watchdog -------------------------------------------------------------------------

    @property
    def watchdog_interval(self) -> Optional[float]:
        """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, or None without a
        watchdog."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def start_watchdog(self, is_healthy: Callable[[], bool]) -> bool:
        """Ping every watchdog_interval seconds, from a daemon thread, while ``is_healthy()``
        returns true. Returns False (and starts nothing) without a watchdog.

        The point of the watchdog is that a wedged daemon stops pinging, so the ping depends
        on ``is_healthy()``, which should prove the data path still moves. A check that
        returns false or raises skips that ping; one that blocks delays every ping after it,
        which is what a wedged daemon should look like. Pinging resumes when the check passes
        again: one missed ping is within the manager's tolerance, as pings go at half its
        timeout. The first ping is sent at once, so a slow start-up (a large pool to prefault
        and lock) is not mistaken for a hang."""
        interval = self.watchdog_interval
        if interval is None or not self.enabled:
            return False
        if self._watchdog_thread is not None:
            raise RuntimeError("the watchdog thread is already running")
        self._watchdog_stop.clear()
        self._watchdog_thread = threading.Thread(
            target=self._watchdog_loop, args=(interval, is_healthy), name="sd-watchdog",
            daemon=True)
        self._watchdog_thread.start()
        return True

    def stop_watchdog(self, timeout: float = 5.0) -> bool:
        """Stop pinging; wait up to ``timeout`` s for the thread (only a health check that
        blocks can hold it). True if it ended, or none was running."""
        thread = self._watchdog_thread
        if thread is None:
            return True
        self._watchdog_stop.set()
        thread.join(timeout)
        if thread.is_alive():
            return False
        self._watchdog_thread = None
        return True

    def _watchdog_loop(self, interval: float, is_healthy: Callable[[], bool]) -> None:
        # Deadlines are counted from the start, not from the last ping, so the time the check
        # and the send take does not accumulate: a late ping is followed by an early one.
        deadline = time.monotonic()
        healthy_before = True
        while True:
            try:
                healthy = bool(is_healthy())
                problem = "the health check failed"
            except Exception as exc:  # a broken check counts as unhealthy, never as a crash
                healthy = False
                problem = f"the health check raised {exc!r}"
            if healthy:
                self.watchdog_ping()
                if not healthy_before:
                    log.warning("healthy again: watchdog pings resumed")
            elif healthy_before:
                log.error("%s: not pinging the systemd watchdog; systemd restarts netswapd "
                          "when no ping has reached it for %.0f s", problem, 2 * interval)
            healthy_before = healthy
            deadline += interval
            now = time.monotonic()
            if deadline < now:  # the check overran whole intervals: no burst to catch up
                deadline = now
            if self._watchdog_stop.wait(deadline - now):
                return


def _parse_notify_socket(value: str) -> Optional[str | bytes]:
    """NOTIFY_SOCKET as sendto() takes it, or None if unset or not a form we speak."""
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace: the name is the bytes after a leading NUL, with no terminator.
        return b"\0" + os.fsencode(value[1:])
    # Newer managers may pass other forms (vsock:CID:PORT for VMs); netswapd runs on the host.
    log.debug("NOTIFY_SOCKET=%r: not a path or @abstract name; notifications disabled", value)
    return None


def _parse_watchdog(env: MutableMapping[str, str]) -> Optional[int]:
    """WATCHDOG_USEC if the watchdog is meant for this process, else None (as
    sd_watchdog_enabled(3): WATCHDOG_PID, when set, must be our PID)."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec:
        return None
    try:
        value = int(usec)
        if pid and int(pid) != os.getpid():
            return None  # inherited from a parent that is the watched process, not us
    except ValueError:
        log.debug("WATCHDOG_USEC=%r WATCHDOG_PID=%r: not integers; watchdog disabled", usec, pid)
        return None
    return value if value > 0 else None


# Socket activation ---------------------------------------------------------------------


def listen_fds(environ: Optional[MutableMapping[str, str]] = None,
               unset_environment: bool = True) -> list[socket.socket]:
    """The listening sockets systemd passed (fds 3, 4, ...), in order; [] when none were
    passed or they were passed to another process. See listen_fds_with_names()."""
    return [sock for _name, sock in listen_fds_with_names(environ, unset_environment)]


def listen_fds_with_names(environ: Optional[MutableMapping[str, str]] = None,
                          unset_environment: bool = True) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed, each with its name from LISTEN_FDNAMES (a socket unit's
    FileDescriptorName=, "unknown" when the manager gave none), as sd_listen_fds_with_names(3).

    The fds are for this process only if LISTEN_PID is our PID: a child that inherited the
    variables gets []. Each fd is marked close-on-exec, so the sockets do not leak into
    anything the daemon runs. With ``unset_environment`` (the default) the three variables
    are removed whatever the outcome, so that nothing started later takes them for its own.

    Raises ValueError when the variables are malformed or an fd is not a socket: systemd
    never does that, so the unit or a wrapper is broken and the daemon should not start.
    """
    env = os.environ if environ is None else environ
    try:
        pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
        if not pid or not count:
            return []
        try:
            if int(pid) != os.getpid():
                return []
            n = int(count)
        except ValueError:
            raise ValueError(f"LISTEN_PID={pid!r} LISTEN_FDS={count!r}: not integers") from None
        if n < 0:
            raise ValueError(f"LISTEN_FDS={count!r}: negative")
        labels = names.split(":") if names is not None else ["unknown"] * n
        if len(labels) != n:
            raise ValueError(f"LISTEN_FDNAMES={names!r} names {len(labels)} fds, "
                             f"LISTEN_FDS={count!r}")
        fds = range(LISTEN_FDS_START, LISTEN_FDS_START + n)
        # Close-on-exec first, for all of them, before anything below can fail.
        for fd in fds:
            try:
                os.set_inheritable(fd, False)
            except OSError as exc:
                raise ValueError(f"LISTEN_FDS={count!r}: fd {fd} is not open: "
                                 f"{exc.strerror}") from None
        sockets = []
        for fd, label in zip(fds, labels):
            try:
                sockets.append((label, socket.socket(fileno=fd)))  # family and type from the fd
            except OSError as exc:
                raise ValueError(f"fd {fd} ({label}) passed by the service manager is not a "
                                 f"socket: {exc.strerror}") from None
        return sockets
    finally:
        if unset_environment:
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                env.pop(name, None)


# The sockets adopt_listen_fds() kept, with their names, until a listener takes one. Held per
# process, not per server: the fds and the LISTEN_* variables that describe them belong to
# the process, and the NBD, NFS, MOUNT and portmapper listeners each take theirs from here.
_passed_listeners: list[tuple[str, socket.socket]] = []


def adopt_listen_fds(environ: Optional[MutableMapping[str, str]] = None) -> int:
    """Keep the listening sockets systemd passed for take_tcp_listener() and
    take_unix_listener(); returns how many. Logs which were passed, or that netswapd binds
    every listener itself. Raises ValueError as listen_fds_with_names()."""
    passed = listen_fds_with_names(environ)
    _passed_listeners[:] = passed
    if passed:
        log.info("systemd passed %d listening socket%s: %s", len(passed),
                 "" if len(passed) == 1 else "s",
                 ", ".join(_describe(name, sock) for name, sock in passed))
    else:
        log.info("no listening sockets passed by systemd: netswapd binds its listeners itself")
    return len(passed)


def take_tcp_listener(host: str, port: int, key: str) -> Optional[socket.socket]:
    """The passed TCP socket bound to host:port as a listen key names it ("" and "*" the IPv6
    wildcard, "localhost" 127.0.0.1, as netswapd binds them itself), or None to bind one."""
    if host in ("", "*"):
        wanted = ipaddress.ip_address("::")
    elif host == "localhost":
        wanted = ipaddress.ip_address("127.0.0.1")
    else:
        wanted = ipaddress.ip_address(host)
    for entry in _passed_listeners:
        _name, sock = entry
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        if sock.type != socket.SOCK_STREAM:
            continue  # a datagram socket stays unclaimed, and the start fails naming it
        address, bound_port = sock.getsockname()[:2]
        if ipaddress.ip_address(address.split("%", 1)[0]) == wanted and bound_port == port:
            return _take(entry, key)
    return None


def take_unix_listener(path: Path, key: str) -> Optional[socket.socket]:
    """The passed Unix stream socket bound to ``path``, or None to bind one. The path is the
    socket unit's: netswapd must not unlink it at stop, or the next start finds no socket."""
    for entry in _passed_listeners:
        _name, sock = entry
        if (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
                and sock.getsockname() == os.fspath(path)):
            return _take(entry, key)
    return None


def release_unclaimed_listeners() -> list[str]:
    """Close the passed sockets no listener took, and name them: the socket unit listens
    where the config does not, and connections there would wait in the backlog forever."""
    unclaimed = [_describe(name, sock) for name, sock in _passed_listeners]
    for _name, sock in _passed_listeners:
        sock.close()
    _passed_listeners.clear()
    return unclaimed


def _take(entry: tuple[str, socket.socket], key: str) -> socket.socket:
    _passed_listeners.remove(entry)
    name, sock = entry
    # The manager may pass it non-blocking; netswapd's own listeners start out blocking, and
    # the acceptor sets the mode it needs.
    sock.setblocking(True)
    log.info("%s: serving on %s, passed by systemd", key, _describe(name, sock))
    return sock


def _describe(name: str, sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        where = sock.getsockname() or "an unnamed Unix socket"
    elif sock.family == socket.AF_INET6:
        where = "[{}]:{}".format(*sock.getsockname()[:2])
    elif sock.family == socket.AF_INET:
        where = "{}:{}".format(*sock.getsockname()[:2])
    else:
        where = f"a socket of family {sock.family!r}"
    return f"{where} (fd {sock.fileno()}, {name})"
