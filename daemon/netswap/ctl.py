"""`netswapctl`: ask a running netswapd for its status, its exports, or to detach a node."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .control import request

DEFAULT_SOCKET = "/run/netswapd/control.sock"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netswapctl", description="Control a running netswapd.")
    parser.add_argument("--socket", default=DEFAULT_SOCKET,
                        help=f"the daemon's control socket (default: {DEFAULT_SOCKET})")
    parser.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("status", help="uptime, connections, attached nodes, free node slots, "
                                       "reserve, pressure")
    commands.add_parser("exports", help="every export with its size, use and connections")
    detach = commands.add_parser("detach", help="close a node's connections and release its reserve")
    detach.add_argument("node", help="the node name (as in swap/NODE over NBD, /swap/NODE over NFS)")
    detach.add_argument("--wipe", action="store_true",
                        help="also discard the node's swap contents (punch the NBD image, zero "
                             "the NFS swap file) and drop its binding (swap.bind), so a replaced "
                             "node may attach")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    arguments = {"node": args.node, "wipe": args.wipe} if args.command == "detach" else {}
    try:
        reply = request(Path(args.socket), args.command, **arguments)
    except (OSError, ValueError) as exc:
        print(f"netswapctl: cannot reach netswapd at {args.socket}: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"netswapctl: {reply.get('error', 'the daemon refused')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        print(_FORMATTERS[args.command](reply))
    return 0


def _status(reply: dict) -> str:
    lines = [
        f"netswapd {reply['version']}, up {reply['uptime_seconds']:.0f} s",
        f"connections: {reply['connections']} ({reply['in_handshake']} in handshake)",
    ]
    for export, count in sorted(reply["connections_per_export"].items()):
        lines.append(f"  {export}: {count}")
    nodes = reply["attached_nodes"]
    lines.append(f"attached swap nodes: {len(nodes)}")
    for node, count in sorted(nodes.items()):
        lines.append(f"  {node}: {count} connection(s){'' if count else ' (grace period)'}")
    slots = reply.get("node_slots")
    lines.append("node slots: none (no swap is served)" if slots is None
                 else f"node slots: {slots['free']} of {slots['total']} free")
    pool = reply["pool"]
    lines.append(f"pool: {pool['in_use_bytes']} of {pool['in_use_bytes'] + pool['free_bytes']} bytes "
                 f"in use, watermark {pool['watermark']}, reserve in use "
                 f"{pool['emergency_in_use_bytes']}, emergency allocations {pool['emergency_allocs']}")
    pressure = reply["pressure"]
    if pressure is None:
        lines.append("pressure: monitor off")
    else:
        psi = pressure["psi_some_avg10"]
        lines.append(f"pressure: {'EMERGENCY' if pressure['emergency'] else 'normal'} "
                     f"(psi some avg10 {'n/a' if psi is None else f'{psi:.1f}%'}, "
                     f"available {pressure['available_bytes'] >> 20} MiB)")
    lines += ["reserve:", reply["reserve_tree"]]
    return "\n".join(lines)


def _exports(reply: dict) -> str:
    rows = [f"{'export':<28}{'size':>14}{'allocated':>14}{'conns':>7}  kind"]
    for e in reply["exports"]:
        if not e["open"]:
            rows.append(f"{e['name']:<28}{'-':>14}{'-':>14}{0:>7}  swap (on disk, not open)")
            continue
        kind = "swap" if e["swap"] else ("read-only" if e["read_only"] else "read-write")
        rows.append(f"{e['name']:<28}{e['size']:>14}{e['allocated_bytes']:>14}"
                    f"{e['connections']:>7}  {kind} ({e['backend']})")
    return "\n".join(rows)


def _detach(reply: dict) -> str:
    return (f"node {reply['node']}: {reply['connections_closed']} connection(s) closed, reserve "
            f"{'released' if reply['reserve_released'] else 'was not connected'}"
            f"{', swap wiped' if reply['wiped'] else ''}"
            f"{', binding to ' + reply['unbound'] + ' dropped' if reply.get('unbound') else ''}")


_FORMATTERS = {"status": _status, "exports": _exports, "detach": _detach}


if __name__ == "__main__":
    sys.exit(main())
