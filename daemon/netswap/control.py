"""The control socket netswapctl talks to.

One request per connection: the client sends one JSON object on one line
(`{"command": "status"}`), the daemon answers with one JSON object on one line and closes.
`{"ok": true, ...}` on success, `{"ok": false, "error": "..."}` otherwise. The socket is
created mode 0600 and every peer's credentials are checked (SO_PEERCRED): only root or the
daemon's own user may drive it.

The commands read state the way the metrics collector does (snapshots, no data-path locks
held across I/O); `detach` is the one that acts: it closes a node's connections and
releases its reserve at once, optionally wiping its swap file.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Callable

from .unixsock import bind_unix

log = logging.getLogger("netswap.control")

_MAX_REQUEST = 4096  # a command line; anything longer is not from netswapctl


class ControlServer:
    def __init__(self, path: Path, commands: dict[str, Callable[[dict], dict]]) -> None:
        self._path = Path(path)
        self._commands = commands
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        sock = bind_unix(self._path, 0o600, "daemon.control_socket")
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()
        log.info("control socket on %s", self._path)

    def stop(self) -> None:
        self._stopping = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self._path.unlink()
        except FileNotFoundError:
            pass

    def _serve(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return  # stop() closed the socket
            with client:
                client.settimeout(5)
                try:
                    self._answer(client)
                except OSError as exc:
                    log.info("control client gone: %s", exc)

    def _answer(self, client: socket.socket) -> None:
        pid, uid, gid = struct.unpack("3i", client.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid not in (0, os.geteuid()):
            log.warning("control: refused uid %d (pid %d)", uid, pid)
            reply = {"ok": False, "error": "permission denied"}
        else:
            reply = self._dispatch(_read_line(client))
        client.sendall(json.dumps(reply).encode() + b"\n")

    def _dispatch(self, line: bytes) -> dict:
        try:
            request = json.loads(line)
            command = request["command"]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "expected one JSON object with a 'command'"}
        handler = self._commands.get(command)
        if handler is None:
            return {"ok": False, "error": f"unknown command {command!r}; known: {sorted(self._commands)}"}
        try:
            return {"ok": True, **handler(request)}
        except CommandError as exc:
            return {"ok": False, "error": str(exc)}


class CommandError(Exception):
    """A command that cannot be carried out; the message goes back to netswapctl."""


def _read_line(client: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < _MAX_REQUEST:
        chunk = client.recv(_MAX_REQUEST - len(data))
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def request(path: Path, command: str, **arguments) -> dict:
    """Send one command to the daemon and return its answer (the client side)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(json.dumps({"command": command, **arguments}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def uptime_since(started: float) -> float:
    return round(time.monotonic() - started, 1)
