"""systemd integration, tested with the kernel's sockets and systemd's own tools.

No service manager runs here, so each part is checked where it can be without one:

- The sd_notify protocol (netswap.systemd.Notifier) from a child process, over a real
  NOTIFY_SOCKET datagram socket bound by the test with SO_PASSCRED, so every message carries
  the sender's PID as the manager sees it (NotifyAccess=main accepts only the main PID).
- Socket activation (listen_fds): real listeners passed by systemd-socket-activate.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, free_port
from netswap import systemd

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
