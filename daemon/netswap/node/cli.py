"""`netswap-node`: run the agent, show its status, detach.

    netswap-node run --server HOST[:PORT] [--server ...] [--name NAME] [--protocol nbd|nfs]
                     [--connections N] [--dead-conn-timeout 10m] [--priority P] [--mirror]
    netswap-node status [--json]
    netswap-node detach

`run` stays in the foreground (a service); `detach` asks the running agent to swapoff and
disconnect (SIGTERM) and waits for it; `status` reads the agent's state file (exit status 6
while a mirror is degraded).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from . import state as node_state

# status and detach import nothing more: on a node short of memory, `detach` starts while the
# agent's swapoff needs every free page.
DEFAULT_STATE_DIR = Path("/run/netswap-node")
EXIT_DEGRADED = 6  # `status` of a mirror running on one member


def _parser(with_run_options: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netswap-node",
                                     description="Keep this node's swap on netswapd.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="attach and tend the swap (foreground)")
    if with_run_options:  # the config module (and netswapd's) only when it is needed
        from .config import add_run_arguments

        add_run_arguments(run)
    status = commands.add_parser("status", help="device, server, connections, reconnects")
    status.add_argument("--json", action="store_true")
    detach = commands.add_parser("detach", help="swapoff and disconnect (stops the agent)")
    for sub in (status, detach):
        sub.add_argument("--name", default=None, help="the node name (default: hostname)")
        sub.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    detach.add_argument("--timeout", type=float, default=3600,
                        help="seconds to wait for the agent (swapoff reads everything back)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(with_run_options=argv[:1] == ["run"]).parse_args(argv)
    if args.command == "run":
        return _run(args)
    name = args.name or socket.gethostname().split(".")[0]
    path = node_state.state_path(args.state_dir, name)
    found = node_state.load(path)
    if args.command == "status":
        return _status(found, path, args.json)
    return _detach(found, path, args.timeout)


def _run(args) -> int:
    from ..config import ConfigError
    from .config import load_node_config, overrides_from

    try:
        config = load_node_config(args.config, overrides_from(args))
    except ConfigError as exc:
        print(f"netswap-node: {exc}", file=sys.stderr)
        return 2
    from .runtime import NonBlockingHandler, protect_agent, raise_min_free_kbytes, socket_reserve_kib

    handler = NonBlockingHandler(config.log)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger("netswap")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    protect_agent()
    if config.protocol == "nfs":
        from .nfsagent import NfsAgent

        return NfsAgent(config, _notifier()).run()
    from .agent import NbdAgent
    from .netlink import LinkDeadListener, NbdNetlink

    path = node_state.state_path(config.state_dir, config.name)
    previous = node_state.load(path) or {}
    if config.min_free_kbytes == "auto":
        baseline = raise_min_free_kbytes(socket_reserve_kib(config.connections),
                                         previous.get("min_free_kbytes_baseline"))
    else:
        baseline = None
        Path("/proc/sys/vm/min_free_kbytes").write_text(str(config.min_free_kbytes))
    agent = NbdAgent(config, NbdNetlink, LinkDeadListener, _notifier())
    agent.state["min_free_kbytes_baseline"] = baseline
    code = agent.run()
    if handler.dropped:
        print(f"netswap-node: {handler.dropped} log line(s) dropped", file=sys.stderr)
    return code


def _notifier():
    from ..systemd import Notifier

    notifier = Notifier.from_environment()
    return notifier if notifier.enabled else None


def _status(found: dict | None, path: Path, as_json: bool) -> int:
    if found is None:
        print(f"netswap-node: no agent state at {path}", file=sys.stderr)
        return 1
    found = dict(found, agent_running=node_state.agent_alive(found) or found.get("pid") == os.getpid(),
                 swap_used_kib=node_state.swap_used_kib(found.get("device", "")))
    if as_json:
        print(node_state.encode(found))
        return 0
    used = found["swap_used_kib"]
    print(f"{found['device']} ({found['protocol']}): {found['state']}, from {found['server']}"
          f"{' as ' + found['export'] if found.get('export') else ''}\n"
          f"connections: {found.get('alive')} of {found.get('connections')} alive, "
          f"reconnects: {found.get('reconnects', 0)}\n"
          f"swap: {'not on' if used is None else f'{used} KiB in use'}\n"
          f"agent: {'pid ' + str(found['pid']) if found['agent_running'] else 'not running'}\n"
          f"last error: {found.get('last_error') or 'none'}")
    if found.get("mirror"):
        print(f"mirror: {found.get('health') or 'unknown'}")
        for member in found.get("members", []):
            print(f"  {member['device']} from {member['server']}: "
                  f"{'away' if member.get('away') else 'in'}, {member['alive']} of "
                  f"{member['connections']} connection(s) alive"
                  f"{', ' + member['last_error'] if member.get('last_error') else ''}")
    # A degraded mirror still swaps, but runs without a copy until a human or the server
    # brings the other member back: a monitoring check sees that in the exit status.
    return EXIT_DEGRADED if found.get("state") == "degraded" else 0


def _detach(found: dict | None, path: Path, timeout: float) -> int:
    if found is None or not node_state.agent_alive(found):
        print(f"netswap-node: no running agent ({path})", file=sys.stderr)
        return 1
    os.kill(found["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while node_state.agent_alive(found):
        if time.monotonic() > deadline:
            print(f"netswap-node: agent {found['pid']} still detaching after {timeout:.0f} s",
                  file=sys.stderr)
            return 1
        time.sleep(0.2)
    after = node_state.load(path) or {}
    print(f"{found['device']}: {after.get('state', 'unknown')}")
    return 0 if after.get("state") == "detached" else 1


if __name__ == "__main__":
    sys.exit(main())
