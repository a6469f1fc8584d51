"""Where a process waits in the kernel: its state, wait channel and kernel stack, read from
/proc, for the log line of a helper (mdadm) that did not finish in time.

A helper stuck under memory pressure says nothing itself; what it waits on (a lock, a page
fault, an md superblock write) is what tells a swap stall from a slow command.
"""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")
FRAMES = 8  # the innermost frames are the ones that say what it waits on


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _name_and_state(stat: str) -> tuple[str, str]:
    """The command name and state letter of a /proc/PID/stat line ("?" where unreadable).
    The name is in parentheses and may itself hold spaces and parentheses: the state is the
    first field after the last ")"."""
    if ")" not in stat:
        return "?", "?"
    rest = stat.rpartition(")")[2].split()
    return stat[stat.find("(") + 1:stat.rfind(")")], rest[0] if rest else "?"


def waiting_in(pid: int) -> str:
    """One line: `state D, wchan md_update_sb, stack a <- b <- c`, with what /proc shows."""
    state = _name_and_state(_read(PROC / str(pid) / "stat"))[1]
    wchan = _read(PROC / str(pid) / "wchan") or "?"
    frames = []
    for line in _read(PROC / str(pid) / "stack").splitlines():
        # "[<0>] md_ioctl+0x5e3/0x1870 [md_mod]": the function, without its offsets
        name = line.split("]", 1)[-1].strip().split("+", 1)[0]
        if name:
            frames.append(name)
    stack = " <- ".join(frames[:FRAMES]) or "unreadable"
    return f"state {state}, wchan {wchan}, stack {stack}"


def blocked_tasks() -> list[str]:
    """`name[pid]: waiting_in(pid)` for every task in uninterruptible sleep (state D)."""
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        name, state = _name_and_state(_read(entry / "stat"))
        if state != "D":
            continue
        found.append(f"{name}[{entry.name}]: {waiting_in(int(entry.name))}")
    return found
