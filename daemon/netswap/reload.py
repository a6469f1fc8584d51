"""What a SIGHUP may change in a running daemon, and what needs a restart.

`plan_reload(old, new)` is pure: it returns the configuration to run with from now on and
the keys whose new values cannot take effect without a restart (they size or bind things
made once at start: the pool and its reserve tree, listening sockets, threads, the process's
protection). Those keep their old values, and the daemon logs them; everything else —
exports, the swap template for nodes not yet seen, per-connection limits, tagging, the
non-swap policy, log level, grace and shutdown times — applies to new connections at once.
Connections already open keep the limits they started with, so they see no hiccup.
"""

from __future__ import annotations

import dataclasses

from .config import Config, NfsConfig

# (section, key) pairs fixed at start.
RESTART_ONLY = {
    "daemon": {"state_dir", "workers", "control_socket"},
    "pool": {"size", "lock", "normal_budget", "headroom"},
    "nbd": {"listen", "unix_socket"},
    "swap": {"enabled", "backend", "directory", "max_nodes", "reserve_inflight",
             "reserve_request", "max_connections", "node_networks", "nodes"},
    "network": {"shape", "interface"},
    "pressure": {"enabled", "interval", "psi_enter", "psi_exit", "available_enter",
                 "available_exit"},
    "protect": {"mlockall", "oom_score_adj", "io_flusher"},
    "metrics": {"listen"},
    # The NFS side reads its config once, at start (listeners, exports, limits, the idle
    # clock, the portmapper): every key of it needs a restart, and a reload says so.
    "nfs": {field.name for field in dataclasses.fields(NfsConfig)},
}


def plan_reload(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The effective config after a reload, and the keys that need a restart to change."""
    restart = []
    sections = {}
    for section, fixed in RESTART_ONLY.items():
        old_section, new_section = getattr(old, section), getattr(new, section)
        kept = {}
        for key in fixed:
            if getattr(old_section, key) != getattr(new_section, key):
                restart.append(f"{section}.{key}")
                kept[key] = getattr(old_section, key)
        sections[section] = dataclasses.replace(new_section, **kept)
    return dataclasses.replace(new, **sections), sorted(restart)
