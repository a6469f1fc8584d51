"""What a running agent tells the world, and what a restarted agent adopts: one JSON file per
node under the state directory (/run/netswap-node: tmpfs, gone at reboot, as the device is).

Written atomically (temporary file, rename) on each change of state, never on the I/O path:
the NBD agent hands its states to a StateWriter, whose thread does the writing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("netswap.node")


def state_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / f"{name}.json"


def save(path: Path, state: dict) -> None:
    write_atomically(path, encode(state))


def encode(state: dict) -> str:
    return json.dumps(state, indent=2, sort_keys=True)


class StateWriter:
    """Writes the state file from a thread of its own: the newest state handed over, skipping
    any it was too slow for.

    A write to the state directory (tmpfs) needs a page. With memory short, a page waits on
    reclaim, reclaim on swap, and swap (a connection dead) on the agent: on a new socket for
    the device, or on taking a mirror member out. So the agent's loop hands the state over and
    goes on, and only this thread may wait for the page."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Condition()
        self._pending: str | None = None  # the newest state not yet written, as JSON
        self._handed = self._written = 0  # states handed over, and written (by count)
        self._last_error: str | None = None
        self._closed = False
        # Started at once, so that its stack is there (and locked) before memory runs short.
        self._thread = threading.Thread(target=self._run, name="state-writer", daemon=True)
        self._thread.start()

    def submit(self, state: dict) -> None:
        text = encode(state)  # now: the agent goes on changing the dict it hands over
        with self._lock:
            self._pending = text
            self._handed += 1
            self._lock.notify_all()

    def flush(self, timeout: float | None) -> bool:
        """Wait until every state handed over is written (or superseded and its successor
        written); False if that took longer than `timeout` seconds."""
        with self._lock:
            wanted = self._handed
            return self._lock.wait_for(lambda: self._written >= wanted, timeout)

    def close(self, timeout: float | None) -> bool:
        written = self.flush(timeout)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        return written

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                text, upto = self._pending, self._handed
                self._pending = None
            try:
                write_atomically(self.path, text)
                error = None
            except OSError as exc:
                error = f"{self.path}: {exc}"
            with self._lock:
                self._written = upto
                if error != self._last_error and error is not None:
                    log.error("state file not written: %s", error)
                self._last_error = error
                self._lock.notify_all()


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.rename(path)


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # half a file from a crash mid-write cannot happen (rename), junk can


def agent_alive(state: dict) -> bool:
    """Whether the agent that wrote `state` still runs (its pid, still this program)."""
    pid = state.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"netswap" in cmdline


def swap_used_kib(device: str) -> int | None:
    """KiB in use on `device` per /proc/swaps, None if it is not swapped on."""
    try:
        lines = Path("/proc/swaps").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if fields and os.path.realpath(fields[0]) == os.path.realpath(device):
            return int(fields[3])
    return None
