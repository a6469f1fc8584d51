"""What a running agent tells the world, and what a restarted agent adopts: one JSON file per
node under the state directory (/run/netswap-node: tmpfs, gone at reboot, as the device is).

Written atomically (temporary file, rename) on each change of state, never on the I/O path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def state_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / f"{name}.json"


def save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(state, indent=2, sort_keys=True))
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
