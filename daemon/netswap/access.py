"""Who may open which export: allow lists, and per-node binding of swap exports.

Every connection has a ClientIdentity, read once at accept: the peer's IP address for TCP
(an IPv4-mapped IPv6 peer is its IPv4 address, so one IPv4 rule covers both listeners), the
peer's uid for the Unix socket (SO_PEERCRED: the kernel's word, not the client's).

Three rules, each checked when a client names an export (INFO, GO, EXPORT_NAME) and applied
to LIST, which shows only what the client may open:

* Allow lists: `allow` (networks) for TCP clients and `allow_uids` for Unix-socket clients,
  per static export and for the swap template. The defaults admit everyone.
* Binding of swap exports (`swap.bind`):
  "address": a node's swap belongs to the client (address, or uid on the Unix socket) whose
  GO first attached it. The binding is kept in `<state_dir>/swap-bindings.json`, so a
  restart does not free it; only an operator's `netswapctl detach --wipe` does.
  "secret": the client names `swap/<node>:<secret>`; the secret comes from the config and is
  compared in constant time. It is never logged, listed or sent back.
  "none": any client the allow list admits may open any node's swap.
* A refused client learns only that it is not allowed (NBD_REP_ERR_POLICY); the rule, the
  export and the client go to the log and to the counter access_denied{export:reason}, with
  "swap" for every node's swap export, so a scan of node names cannot mint series.

The check at lookup is what INFO and LIST see; the binding itself is made at attach under a
lock, so two clients racing for an unbound node cannot both win.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .counters import declare
from .errors import AccessDenied, AttachRefused
from .exports.registry import ExportError
from .nbd.handshake import MAX_DESCRIPTION
from .swap.nodes import SWAP_PREFIX, client_address, swap_node_from_name

ACCESS_DENIED = declare(
    "daemon", "access_denied", "netswap_access_denied_total",
    "Clients refused an export by an allow list, a swap binding or secret, as \"export:reason\" "
    "(\"swap\" for every node's swap export).",
    label="export_reason")

log = logging.getLogger("netswap.access")

BINDINGS_FILE = "swap-bindings.json"
_DENIED = "access to this export is not allowed"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class ClientIdentity:
    """Who is on the other end of a connection, as far as the kernel can tell."""

    address: Optional[ipaddress.IPv4Address | ipaddress.IPv6Address] = None  # TCP peers
    uid: Optional[int] = None  # Unix-socket peers; None if the kernel did not say

    @property
    def key(self) -> str:
        """What a swap binding records: one stable string per client."""
        if self.address is not None:
            return f"address {self.address}"
        return f"uid {self.uid}" if self.uid is not None else "uid unknown"

    def __str__(self) -> str:
        return self.key


def peer_identity(sock: socket.socket, address) -> ClientIdentity:
    """The identity of a just-accepted socket (`address` as accept() returned it)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return ClientIdentity(address=client_address(address[0]))
    try:
        _pid, uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError as exc:  # not on a Unix socket, or not Linux: no uid, so no uid rule passes
        log.warning("cannot read the peer's credentials: %s", exc)
        return ClientIdentity()
    return ClientIdentity(uid=uid)


def _with_slots(description: str, slots) -> str:
    # Within what the handshake sends of a description, so the count is never cut off.
    return description if slots is None else slots.describe(description, MAX_DESCRIPTION)


def permits(rule, client: ClientIdentity) -> bool:
    """Does an export's (or the swap template's) allow / allow_uids admit this client?"""
    if client.address is not None:
        return any(client.address in network for network in rule.allow)
    return rule.allow_uids is None or client.uid in rule.allow_uids


class SwapBindings:
    """Node -> the ClientIdentity.key it is bound to, persisted in one JSON file (0600).

    Every change is written to a temporary file, fsynced and renamed over the old one, and
    the directory fsynced: after a crash the file is the old or the new table, never half.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        try:
            text = self._path.read_text()
        except FileNotFoundError:
            self._nodes: dict[str, str] = {}
            return
        except OSError as exc:
            raise ExportError.wrap(f"swap bindings {self._path}", exc) from exc
        try:
            nodes = json.loads(text)["nodes"]
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in nodes.items()):
                raise ValueError("entries are not node: client strings")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Failing closed: without the table, any client could take any node's swap.
            raise ExportError(errno.EINVAL, f"swap bindings {self._path} are unreadable "
                              f"({exc}); fix or remove the file (removing frees every node)")
        self._nodes = dict(nodes)

    def get(self, node: str) -> Optional[str]:
        return self._nodes.get(node)

    def bind(self, node: str, client: str) -> tuple[str, bool]:
        """Bind an unbound node to `client`: (who it is bound to, whether that is new)."""
        with self._lock:
            bound = self._nodes.get(node)
            if bound is not None:
                return bound, False
            self._save({**self._nodes, node: client})
            self._nodes[node] = client
            return client, True

    def unbind(self, node: str) -> Optional[str]:
        """Forget a node's binding; return who it was bound to."""
        with self._lock:
            bound = self._nodes.get(node)
            if bound is not None:
                self._save({k: v for k, v in self._nodes.items() if k != node})
                del self._nodes[node]
            return bound

    def _save(self, nodes: dict[str, str]) -> None:
        temporary = self._path.with_name(self._path.name + ".new")
        data = json.dumps({"nodes": nodes}, indent=1, sort_keys=True).encode()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self._path)
        directory = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class AccessControl:
    """The registry and the lifecycle as one client sees them (see the module docstring)."""

    def __init__(self, registry, lifecycle, config, counters, bindings: SwapBindings) -> None:
        self._registry = registry
        self._lifecycle = lifecycle
        self._counters = counters
        self._bindings = bindings
        self.apply_config(config)

    def apply_config(self, config) -> None:
        """A reload: rules apply to what clients name from now on (open connections stay)."""
        self._swap = config.swap if config.swap.enabled else None
        self._static = {spec.name: spec for spec in config.exports}
        self._secrets = dict(config.swap.secrets)

    # What the handshake calls, with the client bound in by the connection ------------------

    def lookup(self, name: str, client: ClientIdentity):
        """The export `name` if this client may open it; None if there is none; AccessDenied."""
        spec = self._static.get(name)
        if spec is not None:
            if not permits(spec, client):
                self._deny(name, "allow", client, name)
            return self._registry.lookup(name)
        if self._swap is None or not isinstance(name, str) or not name.startswith(SWAP_PREFIX):
            return self._registry.lookup(name)
        base, colon, secret = name.partition(":")
        node = swap_node_from_name(base)
        if self._swap.bind == "secret":
            if node is None:
                # Unknown, but answered as a refusal: the name may hold a secret, which
                # "no export named ..." would echo and the EXPORT_NAME path would log.
                self._deny("swap", "bad_name", client, "an invalid swap name")
            if not permits(self._swap, client):
                self._deny("swap", "allow", client, base)
            if not colon:
                self._deny("swap", "no_secret", client, base)
            expected = self._secrets.get(node)
            # Compared even for a node without a secret, so timing does not tell which have one.
            matches = hmac.compare_digest(secret.encode(), expected or bytes(32))
            if expected is None or not matches:
                self._deny("swap", "wrong_secret", client, base)
            return self._registry.lookup(base)
        if node is None or colon:
            return None  # not a node's swap (a ":" is only meaningful with secrets)
        if not permits(self._swap, client):
            self._deny("swap", "allow", client, name)
        if self._swap.bind == "address":
            bound = self._bindings.get(node)
            if bound is not None and bound != client.key:
                self._deny("swap", "bound", client, name, f"bound to {bound}")
        return self._registry.lookup(name)

    def list(self, client: ClientIdentity) -> list[tuple[str, str]]:
        """The registry's listing, less what this client could not open; swap exports are
        described as `describe` does."""
        shown = []
        slots = self._lifecycle.node_slots() if self._swap is not None else None
        for name, description in self._registry.list():
            node = swap_node_from_name(name) if self._swap is not None else None
            if node is not None:
                if not self._may_open_swap(node, client):
                    continue
                description = _with_slots(description, slots)
            elif name in self._static and not permits(self._static[name], client):
                continue
            shown.append((name, description))
        return shown

    def describe(self, export) -> str:
        """An export's description as INFO and GO send it now: a swap export's says how many
        node slots are free (swap/attach.py, Lifecycle.node_slots), at the time of asking."""
        if not export.is_swap:
            return export.description
        return _with_slots(export.description, self._lifecycle.node_slots())

    def attach(self, export, client: ClientIdentity):
        """Attach (lifecycle) after binding an unbound node's swap to this client."""
        node = export.node if export.is_swap else None
        if node is None or self._swap is None or self._swap.bind != "address":
            return self._lifecycle.attach(export)
        try:
            bound, new = self._bindings.bind(node, client.key)
        except OSError as exc:
            # Unrecorded, a binding would not survive a restart: refuse rather than pretend.
            self._counters.inc(ACCESS_DENIED, "swap:binding_store")
            log.error("node %r: cannot record its binding to %s: %s", node, client, exc)
            raise AttachRefused("netswapd cannot record this node's binding", "binding_store")
        if bound != client.key:  # another client bound it after our lookup
            self._deny("swap", "bound", client, export.name, f"bound to {bound}")
        if new:
            log.info("node %r bound to %s", node, client)
        return self._lifecycle.attach(export)

    # For the operator ------------------------------------------------------------------------

    def unbind(self, node: str) -> Optional[str]:
        """Free a node's swap for whichever client attaches next (a replaced node)."""
        bound = self._bindings.unbind(node)
        if bound is not None:
            log.info("node %r unbound from %s", node, bound)
        return bound

    # Internals -------------------------------------------------------------------------------

    def _may_open_swap(self, node: str, client: ClientIdentity) -> bool:
        if not permits(self._swap, client) or self._swap.bind == "secret":
            return False  # with secrets, LIST carries none, so it can open none
        bound = self._bindings.get(node) if self._swap.bind == "address" else None
        return bound is None or bound == client.key

    def _deny(self, label: str, reason: str, client: ClientIdentity, what: str,
              detail: str = "") -> None:
        self._counters.inc(ACCESS_DENIED, f"{label}:{reason}")
        log.warning("refused %s access to %s: %s%s", client, what, reason,
                    f" ({detail})" if detail else "")
        raise AccessDenied(_DENIED, reason)
