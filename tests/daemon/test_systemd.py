"""systemd integration, tested with the kernel's sockets and systemd's own tools.

No service manager runs here, so each part is checked where it can be without one:

- The sd_notify protocol (netswap.systemd.Notifier) from a child process, over a real
  NOTIFY_SOCKET datagram socket bound by the test with SO_PASSCRED, so every message carries
  the sender's PID as the manager sees it (NotifyAccess=main accepts only the main PID).
- Socket activation (listen_fds): real listeners passed by systemd-socket-activate.
- systemd/netswapd.service: `systemd-analyze verify` and `systemd-analyze security`, and its
  settings against the default config.
- The unit's capabilities and seccomp filters, rebuilt with setpriv and libseccomp around a
  real netswapd that serves, shapes, reloads and stops inside them.
- The real daemon over a real NOTIFY_SOCKET (test_daemon_notifies_over_a_real_socket).
- `make install DESTDIR=...`: the files land where the unit expects them, and they run.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from netswap import systemd
from netswap.config import load
from support.daemon import Daemon, REPO, free_port, write_config
from support.libnbd import import_libnbd
from support.units import timespan_seconds, unit_settings
from support.wait import wait_until

UNIT = REPO / "systemd" / "netswapd.service"
SOCKET_UNIT = REPO / "systemd" / "netswapd.socket"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# Variables a manager may have set for whatever runs this test suite; no child started here
# may inherit them.
_MANAGER_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                      "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _MANAGER_VARIABLES}
    env.update(extra)
    return env


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# The manager's end of NOTIFY_SOCKET -------------------------------------------------------


@dataclass
class Message:
    fields: dict[str, str]
    pid: int  # the sender's PID, from SCM_CREDENTIALS: what NotifyAccess=main compares
    at: float  # time.monotonic() when it was received


class NotifySocket:
    """A datagram socket bound where NOTIFY_SOCKET points, read as systemd reads it."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # The kernel then attaches the sender's credentials to every datagram.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.messages: list[Message] = []

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float) -> Message | None:
        if not select.select([self.sock], [], [], max(0.0, timeout))[0]:
            return None
        data, ancillary, _flags, _address = self.sock.recvmsg(
            65536, socket.CMSG_SPACE(_UCRED.size))
        pid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[:_UCRED.size])[0]
        lines = [line for line in data.decode().split("\n") if line]
        assert all("=" in line for line in lines), data
        message = Message(dict(line.split("=", 1) for line in lines), pid, time.monotonic())
        self.messages.append(message)
        return message

    def expect(self, key: str, timeout: float = 10.0) -> Message:
        """The next message with KEY=1, skipping others (they stay in .messages)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and message.fields.get(key) == "1":
                return message
        raise AssertionError(f"no {key}=1 within {timeout} s; received: "
                             f"{[m.fields for m in self.messages]}")

    def during(self, seconds: float) -> list[Message]:
        """Everything that arrives in the next ``seconds``."""
        deadline = time.monotonic() + seconds
        got = []
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None:
                got.append(message)
        return got


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


# A child process driving netswap.systemd --------------------------------------------------

# One JSON command per line on stdin ([method, *args]), one JSON result per line on stdout.
DRIVER = """
import json, sys, threading, time
from netswap.systemd import Notifier

notifier = Notifier.from_environment()
healthy = threading.Event()
healthy.set()
print(json.dumps([notifier.enabled, notifier.watchdog_interval]), flush=True)
for line in sys.stdin:
    command, *args = json.loads(line)
    if command == "unhealthy":
        healthy.clear(); result = True
    elif command == "healthy":
        healthy.set(); result = True
    elif command == "start_watchdog":
        result = notifier.start_watchdog(healthy.is_set)
    elif command == "stop_watchdog":
        began = time.monotonic()
        result = [notifier.stop_watchdog(), time.monotonic() - began]
    else:
        result = getattr(notifier, command)(*args)
    print(json.dumps(result), flush=True)
"""


class Driver:
    def __init__(self, tmp_path: Path, **env: str) -> None:
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        # As systemd does it: WATCHDOG_PID is the PID of the process that execs, which sh
        # knows as $$ and keeps through exec.
        command = f'exec "{sys.executable}" "{script}"'
        if env.pop("WATCHDOG_PID", None) == "$$":
            command = "WATCHDOG_PID=$$ " + command
        self.process = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=clean_env(**env))
        self.pid = self.process.pid
        self.enabled, self.watchdog_interval = json.loads(self.process.stdout.readline())

    def __call__(self, *command):
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        assert self.process.wait(10) == 0


@pytest.fixture
def driver(tmp_path):
    drivers = []

    def start(**env):
        drivers.append(Driver(tmp_path, **env))
        return drivers[-1]

    yield start
    for d in drivers:
        d.close()


# Notifications ------------------------------------------------------------------------------


def test_each_message_is_one_datagram_from_the_main_pid(notify, driver, tmp_path):
    d = driver(NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    assert d.enabled and d.watchdog_interval is None

    assert d("ready", "serving 3 exports on 127.0.0.1:10809") is True
    message = notify.expect("READY")
    assert message.fields == {"READY": "1", "STATUS": "serving 3 exports on 127.0.0.1:10809"}
    assert message.pid == d.pid

    assert d("status", "2 nodes attached") is True
    assert notify.receive(5).fields == {"STATUS": "2 nodes attached"}

    # A status line made from an error message cannot smuggle in an assignment.
    assert d("status", "reload failed: bad\nREADY=1") is True
    assert notify.receive(5).fields == {"STATUS": "reload failed: bad READY=1"}

    before = monotonic_usec()
    assert d("reloading") is True
    after = monotonic_usec()
    message = notify.expect("RELOADING")
    assert set(message.fields) == {"RELOADING", "MONOTONIC_USEC"}
    # CLOCK_MONOTONIC is one clock for the whole machine: the manager compares it with its own.
    assert before <= int(message.fields["MONOTONIC_USEC"]) <= after

    assert d("reloading", "re-reading /etc/netswapd/netswapd.toml") is True
    assert notify.expect("RELOADING").fields["STATUS"] == "re-reading /etc/netswapd/netswapd.toml"

    assert d("ready_after_reload", "reloaded: 4 exports") is True
    assert notify.expect("READY").fields == {"READY": "1", "STATUS": "reloaded: 4 exports"}

    assert d("stopping", "stopping: finishing in-flight requests") is True
    assert notify.expect("STOPPING").fields == {
        "STOPPING": "1", "STATUS": "stopping: finishing in-flight requests"}
    assert all(m.pid == d.pid for m in notify.messages)


def test_abstract_socket_name(driver):
    # "@name" is a name in the abstract namespace: no file, the name after a NUL byte.
    name = f"netswap-test-{uuid.uuid4().hex}"
    listener = NotifySocket(b"\0" + name.encode())
    try:
        d = driver(NOTIFY_SOCKET=f"@{name}")
        assert d("ready", "up") is True
        message = listener.expect("READY")
        assert message.fields == {"READY": "1", "STATUS": "up"} and message.pid == d.pid
    finally:
        listener.close()


def test_watchdog_pings_at_half_of_watchdog_usec(notify, driver, tmp_path):
    usec = 1_000_000
    d = driver(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC=str(usec),
               WATCHDOG_PID="$$")
    assert d.watchdog_interval == 0.5
    started = time.monotonic()
    assert d("start_watchdog") is True
    pings = [notify.expect("WATCHDOG", timeout=2) for _ in range(7)]

    # The first ping goes at once, so a slow start-up is not taken for a hang.
    assert pings[0].at - started < 0.3 * usec / 1e6
    intervals = [b.at - a.at for a, b in zip(pings, pings[1:])]
    assert all(0.3 * usec / 1e6 <= i <= 0.8 * usec / 1e6 for i in intervals), intervals
    # Scheduled from the start, not from the previous ping: no drift over the run.
    assert 0.45 <= (pings[-1].at - pings[0].at) / len(intervals) <= 0.55, intervals
    # Sent from a thread, and still the main process to the manager.
    assert all(p.pid == d.pid and p.fields == {"WATCHDOG": "1"} for p in pings)


def test_watchdog_stops_while_unhealthy_and_resumes(notify, driver, tmp_path):
    d = driver(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="400000")
    assert d.watchdog_interval == 0.2
    assert d("start_watchdog") is True
    notify.expect("WATCHDOG", timeout=1)
    notify.expect("WATCHDOG", timeout=1)

    assert d("unhealthy") is True
    notify.during(0.3)  # a check already past when the flag fell may still ping once
    silent = notify.during(1.0)  # five intervals
    assert not any("WATCHDOG" in m.fields for m in silent), [m.fields for m in silent]

    assert d("healthy") is True
    back = notify.expect("WATCHDOG", timeout=0.5)
    assert back.pid == d.pid


def test_stop_watchdog_is_prompt(notify, driver, tmp_path):
    d = driver(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="4000000")
    assert d("start_watchdog") is True
    notify.expect("WATCHDOG", timeout=1)
    stopped, took = d("stop_watchdog")
    # The thread sleeps on an Event, not for its 2 s interval.
    assert stopped is True and took < 0.5, took
    late = notify.during(2.5)
    assert not any("WATCHDOG" in m.fields for m in late)
    assert d("start_watchdog") is True  # and it can be started again
    notify.expect("WATCHDOG", timeout=1)


def test_without_notify_socket_everything_is_a_no_op(driver):
    d = driver(WATCHDOG_USEC="1000000")  # a watchdog without a socket to ping is no watchdog
    assert not d.enabled and d.watchdog_interval is None
    assert d("ready", "up") is False
    assert d("status", "x") is False
    assert d("reloading") is False
    assert d("ready_after_reload", "x") is False
    assert d("stopping", "x") is False
    assert d("watchdog_ping") is False
    assert d("start_watchdog") is False
    assert d("stop_watchdog")[0] is True


def test_unreachable_socket_never_raises_and_logs_once(tmp_path, caplog):
    # A path with nothing bound, and a socket file whose owner has gone (ECONNREFUSED).
    gone = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    gone.bind(str(tmp_path / "gone.sock"))
    gone.close()
    for path in (tmp_path / "absent.sock", tmp_path / "gone.sock"):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="netswap.systemd"):
            notifier = systemd.Notifier.from_environment(
                {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
            assert notifier.enabled
            assert notifier.ready("up") is False
            assert notifier.status("x") is False
            assert notifier.reloading() is False
            assert notifier.stopping("x") is False
            assert notifier.watchdog_ping() is False
            notifier.close()
        records = [r for r in caplog.records if r.name == "netswap.systemd"]
        assert len(records) == 1 and records[0].levelno == logging.DEBUG, records


def test_a_manager_that_does_not_read_cannot_stall_the_daemon(tmp_path, monkeypatch):
    monkeypatch.setattr(systemd, "SEND_TIMEOUT", 0.05)
    manager = NotifySocket(str(tmp_path / "notify.sock"))
    notifier = systemd.Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        for _ in range(100_000):  # the receive queue fills after a few hundred at most
            began = time.monotonic()
            if not notifier.status("x" * 1000):
                break
        else:
            pytest.fail("the manager's receive queue never filled")
        assert time.monotonic() - began < 1.0
        while manager.receive(0) is not None:  # the manager catches up
            pass
        assert notifier.status("caught up") is True
    finally:
        notifier.close()
        manager.close()


@pytest.mark.parametrize("value, address", [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@netswap/notify", b"\0netswap/notify"),
    ("", None),
    ("@", None),
    ("relative/notify", None),
    ("vsock:2:1234", None),  # the form newer managers use for VMs; not spoken here
])
def test_notify_socket_forms(value, address):
    notifier = systemd.Notifier.from_environment({"NOTIFY_SOCKET": value})
    assert notifier.enabled == (address is not None)
    assert notifier._address == address


@pytest.mark.parametrize("usec, pid, interval", [
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "other", None),  # meant for the process we inherited it from
    ("0", None, None),
    ("-5", None, None),
    ("soon", None, None),
    (None, None, None),
])
def test_watchdog_environment(usec, pid, interval):
    env = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid() if pid == "self" else os.getpid() + 1)
    notifier = systemd.Notifier.from_environment(env)
    assert notifier.watchdog_interval == interval
    if interval is None:
        assert notifier.start_watchdog(lambda: True) is False


def test_a_health_check_that_raises_counts_as_unhealthy(notify, tmp_path, caplog):
    calls = []

    def check():
        calls.append(time.monotonic())
        if len(calls) > 2:
            raise RuntimeError("acceptor thread gone")
        return True

    notifier = systemd.Notifier(str(tmp_path / "notify.sock"), watchdog_usec=200_000)
    with caplog.at_level(logging.ERROR, logger="netswap.systemd"):
        assert notifier.start_watchdog(check) is True
        pings = [notify.expect("WATCHDOG", timeout=1) for _ in range(2)]
        later = notify.during(0.5)
        assert notifier.stop_watchdog() is True
    assert len(pings) == 2 and not any("WATCHDOG" in m.fields for m in later)
    assert len(calls) > 3  # still checking, still not pinging
    errors = [r.getMessage() for r in caplog.records if r.name == "netswap.systemd"]
    assert len(errors) == 1 and "acceptor thread gone" in errors[0], errors


# Socket activation ---------------------------------------------------------------------------

# Reports what listen_fds_with_names() gave it over the first connection it accepts, then
# serves one connection on each socket.
ACTIVATED = """
import fcntl, json, os, socket
from netswap.systemd import listen_fds_with_names

passed = listen_fds_with_names()
report = {
    "fds": [[name, s.fileno(), s.family.name, s.type.name,
             bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)]
            for name, s in passed],
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
for _name, listener in passed:
    conn, _ = listener.accept()
    conn.sendall(json.dumps(report).encode() + b"\\n")
    conn.close()
"""


def _read_line(sock: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return json.loads(data)


def _connect_when_listening(family, address, process, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect(address)
            return sock
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "systemd-socket-activate never listened"
            time.sleep(0.05)


def test_listen_fds_with_systemd_socket_activate(tmp_path):
    """systemd-socket-activate binds the sockets, sets LISTEN_* as a socket unit would, and
    execs the child on the first connection."""
    script = tmp_path / "activated.py"
    script.write_text(ACTIVATED)
    port, path = free_port(), tmp_path / "nbd.sock"
    process = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-l", str(path),
         "--fdname=nbd:nbd-unix", sys.executable, str(script)],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with _connect_when_listening(socket.AF_INET, ("127.0.0.1", port), process) as tcp:
            report = _read_line(tcp)
        with _connect_when_listening(socket.AF_UNIX, str(path), process) as unix:
            assert _read_line(unix) == report
        assert process.wait(10) == 0, process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert report["fds"] == [
        ["nbd", 3, "AF_INET", "SOCK_STREAM", True],
        ["nbd-unix", 4, "AF_UNIX", "SOCK_STREAM", True],
    ]
    assert report["env"] == []  # unset, so nothing the daemon starts takes them for its own


def test_listen_fds_rejects_an_fd_that_is_not_a_socket(tmp_path):
    # A wrapper that passes a file where a socket belongs: the daemon must not start on it.
    code = ("from netswap.systemd import listen_fds\n"
            "try:\n    listen_fds()\nexcept ValueError as e:\n    print(e)\n")
    result = subprocess.run(
        ["/bin/sh", "-c", f'LISTEN_PID=$$ LISTEN_FDS=1 exec "{sys.executable}" -c \'{code}\' '
                          f'3<"{REPO / "README.md"}"'],
        env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "fd 3 (unknown) passed by the service manager is not a socket" in result.stdout


def test_listen_fds_for_another_process_are_not_ours():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert systemd.listen_fds(env) == []
    assert env == {}  # unset whatever the outcome


def test_listen_fds_without_variables():
    assert systemd.listen_fds({}) == []
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert systemd.listen_fds(env, unset_environment=False) == []
    assert env == {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}


@pytest.mark.parametrize("env, problem", [
    ({"LISTEN_PID": "self", "LISTEN_FDS": "two"}, "not integers"),
    ({"LISTEN_PID": "me", "LISTEN_FDS": "2"}, "not integers"),
    ({"LISTEN_PID": "self", "LISTEN_FDS": "-1"}, "negative"),
    ({"LISTEN_PID": "self", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "nbd"}, "names 1 fds"),
])
def test_listen_fds_rejects_malformed_variables(env, problem):
    env = {k: str(os.getpid()) if v == "self" else v for k, v in env.items()}
    with pytest.raises(ValueError, match=problem):
        systemd.listen_fds(env)
    assert env == {}


# The unit file -------------------------------------------------------------------------------


def service_settings(text: str) -> dict[str, list[str]]:
    return {key: values for (section, key), values in unit_settings(text).items()
            if section == "Service"}


def console_script() -> Path:
    """The netswapd this test suite runs (the editable install's console script)."""
    script = Path(sysconfig.get_path("scripts")) / "netswapd"
    assert script.exists(), f"{script}: netswap is not installed (pip install -e .)"
    return script


def verifiable_copy(tmp_path: Path) -> Path:
    """The unit with /usr/local/bin/netswapd replaced by the netswapd installed here:
    `systemd-analyze verify` insists every command's executable exists, and on this machine
    the package is installed for development, not by make install. Nothing else changes;
    the unit as installed is verified by the make install test."""
    text = UNIT.read_text()
    commands = [line for line in text.splitlines()
                if line.startswith(("ExecStart", "ExecReload"))
                and "/usr/local/bin/netswapd" in line]
    assert len(commands) == 3, commands
    copy = tmp_path / "netswapd.service"
    copy.write_text(text.replace("/usr/local/bin/netswapd", str(console_script())))
    return copy


def test_unit_passes_systemd_analyze_verify(tmp_path):
    """Every key known to this systemd (252) and valid, every command executable. An unknown
    key is only a warning to systemd (exit status 0), so any output at all fails the test."""
    result = subprocess.run(["systemd-analyze", "verify", str(verifiable_copy(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_unit_exposure_stays_low(tmp_path):
    """systemd's own score of the sandbox (0 = fully locked down, 10 = none): a guard against
    options being dropped or loosened without anyone noticing. 2.4 when written; the network
    access and capabilities netswapd needs account for most of it."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager",
         str(verifiable_copy(tmp_path))], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "Overall exposure level" in line)
    assert float(line.split(":")[1].split()[0]) <= 3.0, result.stdout


def test_unit_agrees_with_the_daemon_and_its_default_config():
    service = service_settings(UNIT.read_text())
    config = load(str(REPO / "config" / "netswapd.toml"))

    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["ExecStart"] == [
        "/usr/local/bin/netswapd --config /etc/netswapd/netswapd.toml"]
    assert service["ExecStartPre"] == [
        "/usr/local/bin/netswapd check-config /etc/netswapd/netswapd.toml"]
    assert service["ExecReload"] == [
        "/usr/local/bin/netswapd check-config /etc/netswapd/netswapd.toml",
        "/bin/kill -HUP $MAINPID"]
    assert timespan_seconds(service["WatchdogSec"][0]) == 30
    # The daemon's own shutdown must end before systemd's SIGKILL.
    assert (timespan_seconds(service["TimeoutStopSec"][0])
            > config.daemon.shutdown_timeout + 10)

    caps = {"CAP_IPC_LOCK", "CAP_SYS_RESOURCE", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}
    assert set(service["CapabilityBoundingSet"][0].split()) == caps
    assert set(service["AmbientCapabilities"][0].split()) == caps
    assert service["LimitMEMLOCK"] == ["infinity"]
    assert service["OOMScoreAdjust"] == [str(config.protect.oom_score_adj)]
    assert set(service["RestrictAddressFamilies"][0].split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}

    # ProtectSystem=strict leaves writable only what the unit names; everything the default
    # config writes must be inside it.
    assert service["ProtectSystem"] == ["strict"]
    state = Path("/var/lib") / service["StateDirectory"][0]
    runtime = Path("/run") / service["RuntimeDirectory"][0]
    assert Path(config.daemon.state_dir) == state
    assert Path(config.nbd.unix_socket).parent == runtime
    assert Path(config.daemon.control_socket).parent == runtime
    swap_dir = Path(config.swap.directory)
    assert swap_dir.is_relative_to(state)
    assert service["StateDirectoryMode"] == ["0700"]


def test_socket_unit_passes_systemd_analyze_verify(tmp_path):
    """The socket unit verified together with the service it activates (the unit of the same
    name), as systemd loads them: any output at all fails the test."""
    service = verifiable_copy(tmp_path)
    socket_unit = service.with_name("netswapd.socket")
    socket_unit.write_text(SOCKET_UNIT.read_text())
    result = subprocess.run(["systemd-analyze", "verify", str(socket_unit), str(service)],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_socket_unit_listens_where_the_default_config_does():
    """netswapd refuses a passed socket no listener takes: the unit's addresses are the
    default config's nbd.listen, bound as netswapd binds them (an IPv6 address IPv6 only)."""
    settings = {key: values for (section, key), values in
                unit_settings(SOCKET_UNIT.read_text()).items() if section == "Socket"}
    config = load(str(REPO / "config" / "netswapd.toml"))
    shown = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
             for host, port in config.nbd.listen]
    assert settings["ListenStream"] == shown
    assert settings["BindIPv6Only"] == ["ipv6-only"]
    assert settings["FileDescriptorName"] == ["nbd"]


# The sandbox the unit builds, rebuilt without a service manager ----------------------------
#
# systemd turns CapabilityBoundingSet=/AmbientCapabilities=/NoNewPrivileges= into capability
# sets and no_new_privs, and SystemCallFilter=, MemoryDenyWriteExecute= and
# RestrictAddressFamilies= into seccomp filters, in the process it then execs. The same is
# done here with setpriv (util-linux) and libseccomp (the library systemd itself uses), from
# the unit's own settings, around a real netswapd. What is not rebuilt: the mount namespace
# (ProtectSystem=, PrivateTmp=, ...), whose effect is on paths, checked against the config
# in test_unit_agrees_with_the_daemon_and_its_default_config.

_CAPS = {"CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_IPC_LOCK": 14,
         "CAP_SYS_RESOURCE": 24}
_PROT_WRITE, _PROT_EXEC, _SHM_EXEC = 0x2, 0x4, 0o100000
_SCMP_ACT_ALLOW, _SCMP_ACT_KILL_PROCESS = 0x7FFF0000, 0x80000000
_SCMP_CMP_EQ, _SCMP_CMP_GT, _SCMP_CMP_MASKED_EQ = 4, 6, 7


def _scmp_errno(number: int) -> int:
    return 0x00050000 | number


def syscall_groups(*groups: str) -> set[str]:
    """The system calls in systemd's @groups, nested groups expanded, as systemd-analyze
    lists them for this systemd version."""
    names: set[str] = set()
    todo, seen = list(groups), set()
    while todo:
        group = todo.pop()
        if group in seen:
            continue
        seen.add(group)
        out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True,
                             text=True, check=True).stdout
        for line in out.splitlines()[1:]:  # the first line is the group's own name
            entry = line.strip()
            if entry and not entry.startswith("#"):
                (todo.append if entry.startswith("@") else names.add)(entry)
    return names


def seccomp_filters(service: dict[str, list[str]]) -> list[dict]:
    """The unit's seccomp settings as filters for SECCOMP_LAUNCHER, as systemd builds them
    (src/shared/seccomp-util.c)."""
    filters = []
    # MemoryDenyWriteExecute=yes: no mapping both writable and executable, no mapping made
    # executable later, no executable shared memory; EPERM.
    if service.get("MemoryDenyWriteExecute") == ["yes"]:
        wx = _PROT_WRITE | _PROT_EXEC
        eperm = _scmp_errno(1)
        filters.append({"default": _SCMP_ACT_ALLOW, "rules": [
            ["mmap", eperm, [[2, _SCMP_CMP_MASKED_EQ, wx, wx]]],
            ["mprotect", eperm, [[2, _SCMP_CMP_MASKED_EQ, _PROT_EXEC, _PROT_EXEC]]],
            ["pkey_mprotect", eperm, [[2, _SCMP_CMP_MASKED_EQ, _PROT_EXEC, _PROT_EXEC]]],
            ["shmat", eperm, [[2, _SCMP_CMP_MASKED_EQ, _SHM_EXEC, _SHM_EXEC]]],
        ]})
    # RestrictAddressFamilies=: socket() with any other family fails with EAFNOSUPPORT.
    families = {getattr(socket, name) for name in service["RestrictAddressFamilies"][0].split()}
    refuse = _scmp_errno(97)  # EAFNOSUPPORT
    top = max(families)
    filters.append({"default": _SCMP_ACT_ALLOW, "rules": (
        [["socket", refuse, [[0, _SCMP_CMP_EQ, family, 0]]]
         for family in range(top) if family not in families]
        + [["socket", refuse, [[0, _SCMP_CMP_GT, top, 0]]]])})
    # SystemCallFilter=: an allow list, then the ~ lists taken out of it; last, as systemd
    # loads it, since it does not allow seccomp() itself. A call outside it kills the
    # process here, where the unit says EPERM (SystemCallErrorNumber=): stricter, so that a
    # call netswapd makes but could live without still shows up as a failure.
    allowed: set[str] = set()
    for value in service["SystemCallFilter"]:
        if value.startswith("~"):
            allowed -= syscall_groups(*value[1:].split())
        else:
            allowed |= syscall_groups(*value.split())
    filters.append({"default": _SCMP_ACT_KILL_PROCESS,
                    "rules": [[name, _SCMP_ACT_ALLOW, []] for name in sorted(allowed)]})
    return filters


# Loads the filters in $NETSWAP_TEST_SECCOMP (after setpriv has set the capabilities and
# no_new_privs), then execs argv[1:].
SECCOMP_LAUNCHER = """
import ctypes, json, os, sys

class Cmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                       ctypes.c_uint, ctypes.POINTER(Cmp)]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
for spec in json.loads(os.environ.pop("NETSWAP_TEST_SECCOMP")):
    ctx = lib.seccomp_init(spec["default"])
    for name, action, conditions in spec["rules"]:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # not a system call on this architecture (mmap2, socketcall, ...)
            continue
        args = (Cmp * len(conditions))(*[Cmp(*c) for c in conditions])
        rc = lib.seccomp_rule_add_array(ctx, action, number, len(conditions), args)
        if rc < 0:
            raise OSError(-rc, f"seccomp_rule_add_array({name})")
    rc = lib.seccomp_load(ctx)
    if rc < 0:
        raise OSError(-rc, "seccomp_load")
os.execv(sys.argv[1], sys.argv[1:])
"""


def _bounding_set() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(l.split()[1] for l in status.splitlines() if l.startswith("CapBnd:")), 16)


def sandboxed(tmp_path: Path, argv: list[str]) -> tuple[list[str], dict[str, str], int]:
    """argv wrapped in the unit's capabilities and seccomp filters: (argv, env, the
    capability mask the process should end up with)."""
    service = service_settings(UNIT.read_text())
    assert service["NoNewPrivileges"] == ["yes"]
    caps = set(service["CapabilityBoundingSet"][0].split())
    # A capability this test runs without (containers often lack CAP_SYS_RESOURCE) cannot
    # be handed on; netswapd then gets the rest, as it would from a unit on such a host.
    have = _bounding_set()
    caps = {cap for cap in caps if have & (1 << _CAPS[cap])}
    names = ",".join(["-all"] + [f"+{cap[4:].lower()}" for cap in sorted(caps)])
    launcher = tmp_path / "seccomp_launcher.py"
    launcher.write_text(SECCOMP_LAUNCHER)
    wrapped = ["setpriv", "--no-new-privs", f"--bounding-set={names}", f"--inh-caps={names}",
               f"--ambient-caps={names}", "--", sys.executable, str(launcher), *argv]
    env = clean_env(NETSWAP_TEST_SECCOMP=json.dumps(seccomp_filters(service)))
    return wrapped, env, sum(1 << _CAPS[cap] for cap in caps)


def test_the_sandbox_is_real(tmp_path):
    """The rebuilt sandbox bites, so that the daemon passing inside it means something."""
    probe = (
        "import mmap, socket\n"
        "try:\n    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "    print('wx mapped')\nexcept PermissionError:\n    print('wx refused')\n"
        "try:\n    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n    print('packet socket')\n"
        "except OSError as e:\n    print('packet', e.errno)\n"
        "print(open('/proc/self/status').read())\n"
    )
    argv, env, mask = sandboxed(tmp_path, [sys.executable, "-c", probe])
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["wx refused", "packet 97"], result.stdout
    status = dict(line.split(":\t", 1) for line in lines[2:] if ":\t" in line)
    assert int(status["CapEff"], 16) == mask and int(status["CapBnd"], 16) == mask
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"

    # A call outside SystemCallFilter= (setuid is in @privileged) ends the process.
    argv, env, _ = sandboxed(tmp_path, [sys.executable, "-c", "import os; os.setuid(0)"])
    assert subprocess.run(argv, env=env, timeout=60).returncode == -signal.SIGSYS


# The real daemon ------------------------------------------------------------------------------


def launch(tmp: Path, env: dict[str, str] | None = None, argv_wrapper=None,
           wait_for_log: bool = True, **config) -> Daemon:
    """netswapd on a config from support.daemon.write_config(**config), like
    support.daemon.start_daemon, but with the environment a manager gives it (``env``;
    WATCHDOG_PID="$$" stands for the daemon's own PID) and optionally wrapped
    (``argv_wrapper(argv) -> (argv, env)``).
    """
    env = dict(env or {})
    state_dir = tmp / "state"
    state_dir.mkdir(exist_ok=True)
    (state_dir / "ro.img").write_bytes(bytes(range(256)) * 4096)  # the read-only export
    port, metrics_port = free_port(), free_port()
    config_path, log_path = tmp / "netswapd.toml", tmp / "netswapd.log"
    write_config(config_path, state_dir, port, tmp / "nbd.sock", metrics_port=metrics_port,
                 **config)
    argv = [sys.executable, "-m", "netswap", "--config", str(config_path)]
    if argv_wrapper is not None:
        argv, base = argv_wrapper(argv)
    else:
        base = clean_env()
    if env.pop("WATCHDOG_PID", None) == "$$":
        argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *argv]
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**base, **env})
    daemon = Daemon(port, tmp / "nbd.sock", state_dir, config_path, log_path, process,
                    metrics_port)
    deadline = time.monotonic() + 30
    while wait_for_log and "listening on" not in daemon.log():
        if process.poll() is not None or time.monotonic() > deadline:
            daemon.stop()
            raise AssertionError(f"netswapd did not start ({process.returncode}):\n{daemon.log()}")
        time.sleep(0.05)
    return daemon


def nbd_greeting(family, address) -> bytes:
    """The first 16 bytes a fixed-newstyle NBD server sends on accepting a connection."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(address)
        data = b""
        while len(data) < 16:
            chunk = sock.recv(16 - len(data))
            assert chunk, data
            data += chunk
        return data


def test_daemon_notifies_over_a_real_socket(tmp_path, notify):
    """netswapd under a manager's environment: READY=1 only once clients can be served,
    watchdog pings at half of WATCHDOG_USEC, RELOADING=1 then READY=1 around SIGHUP,
    STOPPING=1 on SIGTERM, all from the main PID (NotifyAccess=main)."""
    usec = 1_000_000
    daemon = launch(tmp_path, wait_for_log=False, env={
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": str(usec),
        "WATCHDOG_PID": "$$"})
    try:
        try:
            ready = notify.expect("READY", timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{daemon.log()}") from None
        # READY=1 means served: every listener accepts and answers at once.
        greeting = b"NBDMAGIC" + b"IHAVEOPT"
        assert nbd_greeting(socket.AF_INET, ("127.0.0.1", daemon.port)) == greeting
        assert nbd_greeting(socket.AF_INET6, ("::1", daemon.port)) == greeting
        assert nbd_greeting(socket.AF_UNIX, str(daemon.unix_socket)) == greeting
        assert "netswap_" in daemon.metrics()
        assert stat.S_ISSOCK((tmp_path / "control.sock").stat().st_mode)
        assert ready.pid == daemon.process.pid and ready.fields.get("STATUS"), ready

        pings = [notify.expect("WATCHDOG", timeout=2) for _ in range(4)]
        intervals = [b.at - a.at for a, b in zip(pings, pings[1:])]
        assert all(0.3 * usec / 1e6 <= i <= 0.8 * usec / 1e6 for i in intervals), intervals
        assert all(p.pid == daemon.process.pid for p in pings)

        before = monotonic_usec()
        daemon.process.send_signal(signal.SIGHUP)
        reloading = notify.expect("RELOADING", timeout=10)
        assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= monotonic_usec()
        reloaded = notify.expect("READY", timeout=10)
        assert reloaded.fields.get("STATUS") and reloaded.pid == daemon.process.pid

        daemon.process.send_signal(signal.SIGTERM)
        stopping = notify.expect("STOPPING", timeout=10)
        assert stopping.pid == daemon.process.pid
        assert daemon.process.wait(30) == 0, daemon.log()
    finally:
        daemon.stop()
    states = [key for m in notify.messages for key in ("READY", "RELOADING", "STOPPING")
              if m.fields.get(key) == "1"]
    assert states == ["READY", "RELOADING", "READY", "STOPPING"], states
    assert "Traceback" not in daemon.log(), daemon.log()


def wait_for_log(daemon: Daemon, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.log():
        if daemon.process.poll() is not None or time.monotonic() > deadline:
            daemon.stop()
            raise AssertionError(f"no {text!r} in the log ({daemon.process.returncode}):\n"
                                 f"{daemon.log()}")
        time.sleep(0.05)


def test_daemon_serves_on_the_sockets_systemd_passes(tmp_path):
    """systemd-socket-activate holds the NBD sockets as netswapd.socket does and execs
    netswapd on the first connection: that connection, made before netswapd ran, is served
    over the passed socket; the Unix socket, not passed, netswapd binds itself."""
    nbd = import_libnbd()
    port = free_port()
    addresses = [f"127.0.0.1:{port}", f"[::1]:{port}"]

    def socket_activate(argv):
        listen = [arg for address in addresses for arg in ("-l", address)]
        return (["systemd-socket-activate", "-E", "PYTHONPATH", *listen, "--fdname=nbd:nbd",
                 *argv], clean_env())

    daemon = launch(tmp_path, wait_for_log=False, argv_wrapper=socket_activate,
                    listen=json.dumps(addresses))
    try:
        wait_for_log(daemon, f"Listening on [::1]:{port}")  # systemd-socket-activate's
        assert "netswapd" not in daemon.log()  # nothing started yet: it waits for a client
        client = nbd.NBD()
        client.connect_uri(f"nbd://127.0.0.1:{port}/swap/node1")
        data = os.urandom(65536)
        client.pwrite(data, 4096)
        assert client.pread(len(data), 4096) == data
        client.shutdown()
        greeting = b"NBDMAGIC" + b"IHAVEOPT"
        assert nbd_greeting(socket.AF_INET6, ("::1", port)) == greeting
        assert nbd_greeting(socket.AF_UNIX, str(daemon.unix_socket)) == greeting
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.stop()
    log = daemon.log()
    assert "systemd passed 2 listening sockets" in log, log
    assert f"nbd.listen: serving on 127.0.0.1:{port} (fd 3, nbd), passed by systemd" in log
    assert f"nbd.listen: serving on [::1]:{port} (fd 4, nbd), passed by systemd" in log
    assert "nbd.unix_socket: serving on" not in log  # bound by netswapd
    assert "Traceback" not in log, log


def start_with_listener(tmp: Path, listener: socket.socket, config_path: Path,
                        log_name: str, wait: bool = True, name: str = "nbd") -> Daemon:
    """netswapd with ``listener`` as fd 3 and LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES as a
    socket unit passes them: the test holds the socket, as systemd does between starts.
    With ``wait``, returns once netswapd listens."""
    log_path = tmp / log_name
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh",
             sys.executable, "-m", "netswap", "--config", str(config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env=clean_env(LISTEN_FDS="1", LISTEN_FDNAMES=name),
            pass_fds=(3,), preexec_fn=lambda: os.dup2(listener.fileno(), 3))
    daemon = Daemon(listener.getsockname()[1], tmp / "nbd.sock", tmp / "state", config_path,
                    log_path, process)
    if wait:
        wait_for_log(daemon, "listening on")
    return daemon


def test_a_connection_made_while_netswapd_is_stopped_is_served_once_it_starts(tmp_path):
    """What netswapd.socket is for: a restart (an upgrade, a restart-only key) refuses no
    node. The connection waits in the backlog of the socket the manager holds and is served
    by the next netswapd, which finds the node's swap as the last one left it."""
    nbd = import_libnbd()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    uri = f"nbd://127.0.0.1:{port}/swap/node1"
    state = tmp_path / "state"
    state.mkdir()
    (state / "ro.img").write_bytes(bytes(range(256)) * 4096)  # the read-only export
    config_path = tmp_path / "netswapd.toml"
    write_config(config_path, state, port, tmp_path / "nbd.sock", metrics_port=free_port(),
                 listen=f'["127.0.0.1:{port}"]')
    data = os.urandom(131072)
    try:
        first = start_with_listener(tmp_path, listener, config_path, "first.log")
        try:
            client = nbd.NBD()
            client.connect_uri(uri)
            client.pwrite(data, 0)
            client.flush()
            client.shutdown()
        finally:
            assert first.stop() == 0, first.log()

        # No netswapd now. The client's connection is taken into the backlog, not refused,
        # and its handshake waits for a server.
        waiting = nbd.NBD()
        connected = threading.Event()
        failure: list[BaseException] = []

        def connect():
            try:
                waiting.connect_uri(uri)
                connected.set()
            except BaseException as exc:  # re-raised below, on the test's thread
                failure.append(exc)

        thread = threading.Thread(target=connect, name="waiting-client")
        thread.start()
        deadline = time.monotonic() + 10
        while not _backlog_holds_a_connection(port):
            assert time.monotonic() < deadline and not failure, failure
            time.sleep(0.05)
        assert not connected.is_set()

        second = start_with_listener(tmp_path, listener, config_path, "second.log")
        try:
            thread.join(30)
            assert connected.is_set(), (failure, second.log())
            assert waiting.pread(len(data), 0) == data
            waiting.shutdown()
        finally:
            assert second.stop() == 0, second.log()
    finally:
        listener.close()
    for daemon in (first, second):
        log = daemon.log()
        assert "systemd passed 1 listening socket" in log, log
        assert f"nbd.listen: serving on 127.0.0.1:{port} (fd 3, nbd), passed by systemd" in log
        assert "Traceback" not in log, log


def _backlog_holds_a_connection(port: int) -> bool:
    """Whether the listening socket on 127.0.0.1:port has a connection waiting to be
    accepted: ss shows a listener's accept queue length as its Recv-Q."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return any(int(line.split()[1]) > 0 for line in out.splitlines())


def test_nfs_serves_on_a_socket_systemd_passes(tmp_path):
    """The NFS listeners take passed sockets as the NBD ones do (FileDescriptorName=nfs)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    state = tmp_path / "state"
    state.mkdir()
    (state / "ro.img").write_bytes(bytes(range(256)) * 4096)
    config_path = tmp_path / "netswapd.toml"
    write_config(config_path, state, free_port(), tmp_path / "nbd.sock", metrics_port=free_port(),
                 nfs_options=f'enabled = true\nlisten = ["127.0.0.1:{port}"]\n'
                             f'mount_listen = ["127.0.0.1:{free_port()}"]')
    try:
        daemon = start_with_listener(tmp_path, listener, config_path, "netswapd.log", name="nfs")
        try:
            # An RPC NULL call to NFS v3 over the passed socket: one record, XID echoed.
            call = struct.pack(">IIIIIIIIIII", 0x80000028, 7, 0, 2, 100003, 3, 0, 0, 0, 0, 0)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(call)
                reply = sock.recv(4096)
            assert struct.unpack(">III", reply[4:16]) == (7, 1, 0), reply  # XID, REPLY, ACCEPTED
        finally:
            assert daemon.stop() == 0, daemon.log()
    finally:
        listener.close()
    log = daemon.log()
    assert f"nfs.listen: serving on 127.0.0.1:{port} (fd 3, nfs), passed by systemd" in log, log
    assert "Traceback" not in log, log


def test_daemon_binds_its_listeners_when_systemd_passes_none(tmp_path):
    daemon = launch(tmp_path)
    try:
        greeting = b"NBDMAGIC" + b"IHAVEOPT"
        assert nbd_greeting(socket.AF_INET, ("127.0.0.1", daemon.port)) == greeting
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert "no listening sockets passed by systemd: netswapd binds its listeners itself" in \
        daemon.log()


def test_daemon_refuses_a_passed_socket_no_listener_takes(tmp_path):
    """A socket unit that listens where the config does not: connections there would wait
    forever, so netswapd does not start, and says which socket."""
    stray = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stray.bind(("127.0.0.1", 0))
    stray.listen(8)
    port = stray.getsockname()[1]
    state = tmp_path / "state"
    state.mkdir()
    (state / "ro.img").write_bytes(bytes(range(256)) * 4096)
    config_path = tmp_path / "netswapd.toml"
    write_config(config_path, state, free_port(), tmp_path / "nbd.sock",
                 metrics_port=free_port())
    try:
        daemon = start_with_listener(tmp_path, stray, config_path, "netswapd.log", wait=False)
        try:
            assert daemon.process.wait(30) == 1, daemon.log()
        finally:
            daemon.stop()
    finally:
        stray.close()
    log = daemon.log()
    assert ("systemd passed sockets no listener in the config takes (the socket unit and the "
            f"config disagree): 127.0.0.1:{port} (fd 3, nbd)") in log, log
    assert "Traceback" not in log, log


SANDBOX_INTERFACE = "nssandbox0"


@pytest.fixture
def sandbox_interface():
    # One end of a veth pair as the interface facing the nodes, as in test_daemon_shaping.
    subprocess.run(["ip", "link", "del", SANDBOX_INTERFACE], capture_output=True)
    subprocess.run(["ip", "link", "add", SANDBOX_INTERFACE, "type", "veth", "peer", "name",
                    SANDBOX_INTERFACE + "p"], check=True)
    subprocess.run(["ip", "link", "set", SANDBOX_INTERFACE, "up"], check=True)
    yield SANDBOX_INTERFACE
    subprocess.run(["ip", "link", "del", SANDBOX_INTERFACE], capture_output=True)


def test_daemon_serves_inside_the_units_sandbox(tmp_path, sandbox_interface):
    """A real netswapd under the unit's capabilities, no_new_privs and seccomp filters
    (MemoryDenyWriteExecute= among them), with everything privileged it can do switched on
    (SO_MARK and the shaping qdisc over rtnetlink: CAP_NET_ADMIN, AF_NETLINK; mlockall and
    the locked pool: CAP_IPC_LOCK), serves swap and file I/O, scrapes, reloads and stops
    cleanly: nothing it does needs more than the unit grants."""
    nbd = import_libnbd()
    wrapped = {}

    def wrapper(argv):
        argv, env, wrapped["mask"] = sandboxed(tmp_path, argv)
        return argv, env

    daemon = launch(tmp_path, argv_wrapper=wrapper, extra=f"""
        [network]
        priority = 7
        mark = 0x5357
        shape = true
        interface = "{sandbox_interface}"

        [protect]
        mlockall = "required"
    """)
    try:
        qdisc = subprocess.run(["tc", "qdisc", "show", "dev", sandbox_interface, "root"],
                               capture_output=True, text=True, check=True).stdout
        assert qdisc.split()[1] == "htb", qdisc
        status = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines()
                      if ":\t" in line)
        assert int(status["CapEff"], 16) == wrapped["mask"]
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"

        data = os.urandom(1 << 20)
        for export in ("swap/node1", "disk", "ram"):
            h = nbd.NBD()
            h.connect_uri(daemon.uri(export))
            h.pwrite(data, 4096)
            h.flush()
            assert h.pread(len(data), 4096) == data
            h.trim(1 << 16, 4096)
            h.zero(1 << 16, 1 << 17)
            assert h.pread(1 << 16, 4096) == bytes(1 << 16)
            h.shutdown()
        assert "netswap_requests_total" in daemon.metrics()

        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in daemon.log(), timeout=15, what=daemon.log)
    finally:
        code = daemon.stop()
    log = daemon.log()
    assert code == 0 and "Traceback" not in log, log
    assert "self-protection: mlockall on" in log and "bytes, locked;" in log, log
    # Nothing refused: no warning but those for a capability this machine could not hand on.
    missing = [cap for cap, bit in _CAPS.items() if not wrapped["mask"] & (1 << bit)]
    complaints = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    assert all(any(cap in line for cap in missing) for line in complaints), complaints


# make install ---------------------------------------------------------------------------------

DEBIAN_PYTHON = "/usr/bin/python3"


def source_copy(tmp_path: Path) -> Path:
    """The working tree's files (tracked and new, not ignored) in tmp_path/src: pip builds in
    the source directory, and the build must not race with, or leave build/ in, the
    checkout other work happens in."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True).stdout
    src = tmp_path / "src"
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is skipped
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, src / name)
    return src


def make(src: Path, *args: str, python: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["make", "-C", str(src), *args, f"PYTHON={python}"],
                            capture_output=True, text=True, timeout=600, env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def imported_netswap(python: str, **env: str) -> str:
    return subprocess.run([python, "-c", "import netswap; print(netswap.__file__)"],
                          capture_output=True, text=True, check=True, cwd="/",
                          env=clean_env(**env)).stdout.strip()


@pytest.mark.parametrize("python", [DEBIAN_PYTHON, sys.executable], ids=["debian", "this"])
def test_make_install_puts_files_where_the_unit_expects_them(tmp_path, python):
    """make install DESTDIR=...: the unit, the config and the package, staged. With Debian's
    python3 (what a server runs) pip itself puts netswapd in /usr/local/bin; with another
    interpreter (this test suite's) /usr/local/bin gets symlinks to where pip put it. Either
    way the staged unit's commands exist under DESTDIR and run the staged package."""
    has_pip = subprocess.run([python, "-m", "pip", "--version"], capture_output=True)
    assert has_pip.returncode == 0, f"{python} has no pip (Debian: apt-get install python3-pip)"
    src, root = source_copy(tmp_path), tmp_path / "root"
    scripts, purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('scripts')); "
                       "print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True).stdout.split()
    before = imported_netswap(sys.executable)
    result = make(src, "install", f"DESTDIR={root}", python=python)
    # Staging never touches the interpreter's own environment (here: the editable install
    # every other test runs).
    assert imported_netswap(sys.executable) == before
    assert "systemctl daemon-reload" in result.stdout  # the next steps, not run
    # A package under /root or /home is out of the service's sight (ProtectHome=yes): said.
    hidden = purelib.startswith(("/root/", "/home/"))
    assert ("ProtectHome=yes" in result.stderr) == hidden, result.stderr

    unit_path = root / "etc/systemd/system/netswapd.service"
    assert unit_path.read_text() == UNIT.read_text()  # the default PREFIX is the unit's
    assert stat.S_IMODE(unit_path.stat().st_mode) == 0o644
    socket_path = unit_path.with_name("netswapd.socket")
    assert socket_path.read_text() == SOCKET_UNIT.read_text()
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o644
    config = root / "etc/netswapd/netswapd.toml"
    assert config.read_text() == (REPO / "config/netswapd.toml").read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o644

    service = service_settings(unit_path.read_text())
    binary, _, args = service["ExecStart"][0].partition(" ")
    assert args == "--config /etc/netswapd/netswapd.toml"
    assert root / args.split()[1].lstrip("/") == config
    for command in ("netswapd", "netswapctl"):
        path = Path(binary).with_name(command)
        staged = root / path.relative_to("/")
        if Path(scripts) == path.parent:  # Debian's python3: pip's own script
            assert not staged.is_symlink()
        else:  # a link to the script pip staged, by the path it will have once installed
            assert Path(os.readlink(staged)) == Path(scripts) / command
            staged = root / scripts.lstrip("/") / command
        assert staged.is_file() and os.access(staged, os.X_OK), staged
        assert staged.read_text().splitlines()[0] == f"#!{python}"

    # The staged commands run the staged package, not the one this test suite imports. Its
    # compiled pool is there too; importing it needs cffi, which staging leaves to the
    # target system, so only this suite's interpreter (which has it) imports it.
    env = {"PYTHONPATH": str(root / purelib.lstrip("/"))}
    assert imported_netswap(python, **env).startswith(str(root))
    assert list((root / purelib.lstrip("/") / "netswap").glob("_pool*.so"))
    if python == sys.executable:
        subprocess.run([python, "-c", "import netswap._pool"], check=True, cwd="/",
                       env=clean_env(**env))
    netswapd = root / binary.lstrip("/")
    run = subprocess.run([str(netswapd), "check-config", str(config)], capture_output=True,
                         text=True, cwd="/", env=clean_env(**env))
    assert run.returncode == 0 and run.stdout.startswith(f"{config}: ok"), run.stderr
    run = subprocess.run([str(netswapd.with_name("netswapctl")), "--help"], capture_output=True,
                         text=True, cwd="/", env=clean_env(**env))
    assert run.returncode == 0 and "netswapctl" in run.stdout, run.stderr

    # And systemd accepts the installed unit, its commands found under DESTDIR.
    verifiable = tmp_path / "netswapd.service"
    verifiable.write_text(unit_path.read_text().replace(binary, str(netswapd)))
    result = subprocess.run(["systemd-analyze", "verify", str(verifiable)], capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")

    # Installing again keeps the operator's config and refreshes the rest.
    config.write_text("# the operator's\n" + config.read_text())
    unit_path.unlink()
    result = make(src, "install-files", f"DESTDIR={root}", python=python)
    assert "kept" in result.stdout
    assert config.read_text().startswith("# the operator's\n")
    assert unit_path.read_text() == UNIT.read_text()


def test_make_install_writes_its_paths_into_the_unit(tmp_path):
    src, root = source_copy(tmp_path), tmp_path / "root"
    make(src, "install-files", f"DESTDIR={root}", "PREFIX=/opt/netswap", "SYSCONFDIR=/etc/ns",
         python=DEBIAN_PYTHON)
    unit = (root / "etc/systemd/system/netswapd.service").read_text()
    service = service_settings(unit)
    assert service["ExecStart"] == [
        "/opt/netswap/bin/netswapd --config /etc/ns/netswapd/netswapd.toml"]
    assert service["ExecStartPre"] == [
        "/opt/netswap/bin/netswapd check-config /etc/ns/netswapd/netswapd.toml"]
    assert "/usr/local/bin" not in unit and "/etc/netswapd" not in unit
    assert (root / "etc/ns/netswapd/netswapd.toml").is_file()
    # Debian's python3 puts its commands in /usr/local/bin: /opt/netswap/bin links to them.
    assert os.readlink(root / "opt/netswap/bin/netswapd") == "/usr/local/bin/netswapd"
