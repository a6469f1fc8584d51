"""netswap-node configuration: a TOML [node] table and the command line, validated into a frozen
NodeConfig.

The rules are netswapd's (netswap.config): every key is described once, in _NODE below (its
kind, default and meaning); unknown keys and tables are errors; every problem is a ConfigError
naming the source, the full key, the value and what would have been accepted, e.g.

    /etc/netswap/node.toml: node.connections = 99: is out of range; allowed: an integer from 1 to 16

The kinds, parse_duration and the error type are netswap.config's own, imported, so the two
programs read sizes, durations and paths alike. Command-line values (`overrides`) go through
the same kinds as the file's and win over them; their errors say "command line".

Public API:
    NodeConfig                                the validated, frozen result
    load_node_config(path, overrides) -> NodeConfig
    parse_node_config(document, overrides=None, source="<string>") -> NodeConfig
    add_run_arguments(parser)                 --config, --server, --name, ... on `run`
    overrides_from(args) -> dict              the options given, as overrides
    format_server((host, port)) -> str        "10.0.0.1:10809", "[fd00::1]:10809"
    DEFAULT_CONFIG_PATH, DEFAULT_NBD_PORT, NODE_KEYS
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config.errors import ConfigError
from ..config.kinds import (
    NODE_NAME_RE,  # the swap node name rule (swap/nodes.py)
    Boolean,
    Choice,
    Integer,
    Kind,
    PathText,
    UniqueStrings,
    ip_literal,
    parse_duration,
)
from ..config.schema import SECTIONS as NETSWAPD_SECTIONS
from ..config.schema import Key, reject_unknown_keys

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_NBD_PORT",
    "NODE_KEYS",
    "NodeConfig",
    "add_run_arguments",
    "format_server",
    "load_node_config",
    "overrides_from",
    "parse_node_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/netswap/node.toml")
DEFAULT_NBD_PORT = 10809  # IANA's NBD port, netswapd's default nbd.listen
# Where an override came from, in error messages: "command line: node.connections = 99: ...".
COMMAND_LINE = "command line"

# The kernel's nbd driver takes both timeouts in whole seconds (NBD_ATTR_TIMEOUT,
# NBD_ATTR_DEAD_CONN_TIMEOUT), and multiplies the request timeout by HZ into an unsigned int;
# a day is far below that limit and far above any useful value.
_MAX_TIMEOUT = 24 * 3600


@dataclass(frozen=True)
class NodeConfig:
    # (host, port), in the order to try. host: an IP literal (IPv6 without brackets) or a host
    # name, lower case. port: the NBD port (default 10809); for protocol "nfs", nfs_port.
    servers: tuple[tuple[str, int], ...]
    name: str  # the swap node name: the export is "swap/<name>", the NFS file <name>
    protocol: str = "nbd"  # "nbd" | "nfs"
    connections: int = 1  # 1..16
    dead_conn_timeout: float = 600.0  # seconds, whole, > 0
    io_timeout: float = 10.0  # seconds, whole, > 0: the kernel's per-request timeout
    priority: int = 100  # swapon priority, -1..32767
    state_dir: Path = Path("/run/netswap-node")  # absolute
    log: str = "stderr"  # "stderr" | "kmsg"
    min_free_kbytes: str | int = "auto"  # "auto" or an int >= 0
    nfs_mount: Path = Path("/mnt/swap")  # absolute
    nfs_port: int = 2049
    mount_port: int = 20048
    mirror: bool = False  # md RAID1 over two servers' exports (protocol "nbd")


def format_server(server: tuple[str, int]) -> str:
    """A (host, port) of NodeConfig.servers as written in the config: IPv6 in brackets."""
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------
# Kinds the node needs beyond netswapd's.


# RFC 1123 labels; the last one not all digits, so that a mistyped IPv4 address
# ("10.0.0.300") is an error rather than a host name that never resolves.
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)


def _host_name(text: str) -> str | None:
    if not text.isascii():  # before lower(): "\u212a".lower() is "k"
        return None
    name = text.lower()
    labels = name.split(".")
    if (not 1 <= len(name) <= 253 or not all(_LABEL_RE.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        return None
    return name


class _Servers(UniqueStrings):
    """ "HOST[:PORT]" strings -> a tuple of (host, port), duplicates refused after parsing.

    Host names are allowed (netswapd's listen addresses are not): the node resolves them each
    time it connects, so a server that moves keeps its name. A port is allowed with "nbd"
    only: an NFS server is reached on node.nfs_port and node.mount_port.
    """

    type_name = "list of str"
    _HOSTS = ('HOST is an IPv4 address, a host name, or an IPv6 address in brackets '
              '("[fd00::1]")')

    def __init__(self, protocol: str = "nbd", nfs_port: int = 2049):
        self.protocol = protocol
        if protocol == "nfs":
            self.default_port, self.port_allowed = nfs_port, False
            self.allowed = (f'a non-empty list of "HOST" strings; {self._HOSTS}; no port '
                            f'with protocol "nfs" (node.nfs_port, node.mount_port); '
                            "no duplicates")
        else:
            self.default_port, self.port_allowed = DEFAULT_NBD_PORT, True
            self.allowed = (f'a non-empty list of "HOST" or "HOST:PORT" strings; {self._HOSTS}; '
                            f"PORT 1..65535, default {DEFAULT_NBD_PORT}; no duplicates")

    def _parse_one(self, text, key) -> tuple[str, int]:
        if text.startswith("["):
            inside, bracket, rest = text[1:].partition("]")
            if not bracket:
                self._reject(key, text, 'has no closing "]"')
            host = ip_literal(ipaddress.IPv6Address, inside)
            if host is None:
                self._reject(key, text, f"{inside!r} is not an IPv6 address")
            if rest and not rest.startswith(":"):
                self._reject(key, text, f'has {rest!r} after "]", not ":PORT"')
            port_text = rest[1:] if rest else None
        else:
            if text.count(":") > 1:
                if ip_literal(ipaddress.IPv6Address, text) is not None:
                    self._reject(key, text, f'is an IPv6 address without brackets (write '
                                            f'"[{text}]" or "[{text}]:{self.default_port}")')
                address, _, port = text.rpartition(":")
                if ip_literal(ipaddress.IPv6Address, address) is not None:
                    self._reject(key, text, f'is an IPv6 address and port without brackets '
                                            f'(write "[{address}]:{port}")')
                self._reject(key, text, 'is not "HOST" or "HOST:PORT"')
            host_text, colon, port_text = text.partition(":")
            if not colon:
                port_text = None
            host = ip_literal(ipaddress.IPv4Address, host_text) or _host_name(host_text)
            if host is None:
                self._reject(key, text, f"{host_text!r} is not an IPv4 address or a host name")
        if port_text is None:
            return host, self.default_port
        if not self.port_allowed:
            self._reject(key, text, f'has a port, but node.protocol = "{self.protocol}" '
                                    "connects to node.nfs_port and node.mount_port")
        if not re.fullmatch(r"[0-9]{1,5}", port_text, re.ASCII) or not 1 <= int(port_text) <= 65535:
            self._reject(key, text, f"port {port_text!r} is not 1..65535")
        return host, int(port_text)


class _NodeName(Kind):
    type_name = "str"
    allowed = ('a swap node name: 1 to 63 characters of a-z, 0-9 and "-", not starting or '
               'ending with "-"')

    def convert(self, value, key):
        self._require_type(key, value, isinstance(value, str), "a string")
        if not NODE_NAME_RE.fullmatch(value):
            self._reject(key, value, "is not a swap node name")
        return value


class _Seconds(Kind):
    """A duration (netswapd's syntax) that must come to whole seconds, 1 to _MAX_TIMEOUT: the
    kernel's nbd timeouts are whole seconds, and "1500ms" silently cut to 1 s is a timeout
    nobody asked for."""

    type_name = "duration"
    allowed = (f'a whole number of seconds from 1 to {_MAX_TIMEOUT} (24h): a TOML number, or a '
               'string "<number><unit>" with unit ms, s, m, h, e.g. "10s", "10m"')

    def convert(self, value, key):
        try:
            seconds = parse_duration(value, key)
        except ConfigError as error:
            error.allowed = self.allowed
            raise
        if not seconds.is_integer():
            self._reject(key, value, f"is {seconds:g} s, not a whole number of seconds (the "
                                     "kernel takes whole seconds)")
        if seconds > _MAX_TIMEOUT:
            self._reject(key, value, f"is {seconds:.0f} s, out of range")
        return seconds


class _MinFreeKbytes(Kind):
    type_name = '"auto" or int'
    allowed = ('"auto" (raise vm.min_free_kbytes by what the swap sockets can hold), or an '
               f"integer from 0 to {2**31 - 1} (KiB)")

    def convert(self, value, key):
        if value == "auto":
            return value
        self._require_type(key, value, isinstance(value, int) and not isinstance(value, bool),
                           '"auto" or an integer')
        if not 0 <= value <= 2**31 - 1:
            self._reject(key, value, "is out of range")
        return value


# ---------------------------------------------------------------------------------------------
# The schema of [node]. Defaults are written as in the TOML file (config/node.toml shows each).


class _HostNameDefault:
    """The default of node.name: the short host name, lower case (host names are not case
    sensitive; swap node names are lower case)."""

    def __repr__(self) -> str:
        return "<short host name>"


_FROM_HOST_NAME = _HostNameDefault()
_NO_DEFAULT = object()


class _ByMode:
    """The default of node.dead_conn_timeout, which depends on node.mirror."""

    plain, mirror = "10m", "5s"

    def __repr__(self) -> str:
        return f'"{self.plain}" ("{self.mirror}" with mirror)'


_BY_MODE = _ByMode()

_NODE = (
    Key("server", _Servers(), _NO_DEFAULT,
           "The netswapd servers; at least one (two with mirror). A node ranks them by "
           "rendezvous hashing of its name and takes the first that accepts it."),
    Key("name", _NodeName(), _FROM_HOST_NAME,
           'This node\'s swap node name: its export is "swap/<name>" (NFS: the file <name>).'),
    Key("protocol", Choice("nbd", "nfs"), "nbd",
           "How the swap is reached: an NBD device, or a swap file on an NFS mount."),
    Key("connections", Integer(1, 16), 1,
           "NBD connections to the export (the server must allow several)."),
    Key("dead_conn_timeout", _Seconds(), _BY_MODE,
           "How long the kernel holds swap I/O while every connection is down, waiting for "
           'the agent to reconnect; past it the device\'s I/O fails. Default "10m", with '
           'mirror "5s" (the other member carries the swap: fail fast, do not stall).'),
    Key("io_timeout", _Seconds(), "10s",
           "The kernel's per-request timeout: a request on a dead socket is requeued after it."),
    Key("priority", Integer(-1, 32767), 100,
           "swapon priority (-1: the kernel's default, below every other swap)."),
    Key("state_dir", PathText("an absolute path", absolute=True), "/run/netswap-node",
           "Where the agent keeps what it attached, for status, detach and a restarted agent."),
    Key("log", Choice("stderr", "kmsg"), "stderr",
           "Where log lines go: stderr (the journal, under systemd) or the kernel log."),
    Key("min_free_kbytes", _MinFreeKbytes(), "auto",
           "vm.min_free_kbytes: the memory the kernel keeps for the swap sockets."),
    Key("nfs_mount", PathText("an absolute path", absolute=True), "/mnt/swap",
           'Where the NFS swap export is mounted (protocol "nfs").'),
    Key("nfs_port", Integer(1, 65535), 2049, 'The NFS port of the servers (protocol "nfs").'),
    Key("mount_port", Integer(1, 65535), 20048,
           'The MOUNT port of the servers (protocol "nfs").'),
    Key("mirror", Boolean(), False,
           "Swap on an md RAID1 over the exports of two servers: one dying loses nothing "
           '(protocol "nbd"; mdadm on the node).'),
)
_FIELDS = {field.name: field for field in _NODE}
_KEY_NAMES = tuple(_FIELDS)
NODE_KEYS: tuple[str, ...] = tuple(f"node.{name}" for name in _KEY_NAMES)

_SERVERS_REQUIRED = 'server = ["HOST[:PORT]", ...] under [node], or --server HOST[:PORT]'


# ---------------------------------------------------------------------------------------------
# Validation.

# netswapd's tables, named when netswap-node is pointed at a netswapd config by mistake.
_NETSWAPD_TABLES = (*NETSWAPD_SECTIONS, "exports")


def _node_table(document, source: str | None) -> Mapping:
    """The [node] table of a parsed TOML document, after refusing everything else in it."""
    if not isinstance(document, Mapping):
        raise ConfigError(None, "the document is not a table", source=source)
    for name, value in document.items():
        if name == "node":
            continue
        is_table = isinstance(value, Mapping) or (
            isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value))
        if is_table and name not in _FIELDS:
            problem = "unknown table"
            if name in _NETSWAPD_TABLES:
                problem += " (a netswapd table: netswap-node reads only [node])"
            elif difflib.get_close_matches(str(name), ("node",), n=1):
                problem += " (did you mean [node]?)"
            raise ConfigError(f"[{name}]", problem, allowed="[node]", source=source)
        problem = "unknown key"
        if name in _FIELDS:  # written above the [node] header
            problem += " (did you mean it under [node]?)"
        raise ConfigError(str(name), problem, value=value, allowed="a [node] table",
                          source=source)
    table = document.get("node", {})
    if not isinstance(table, Mapping):
        raise ConfigError("node", "is not a table", value=table, allowed="a table ([node])",
                          source=source)
    try:
        reject_unknown_keys(table, "node", _KEY_NAMES)
    except ConfigError as error:
        error.source = source
        raise
    return table


def parse_node_config(document: Mapping, overrides: Mapping | None = None,
                      source: str | None = "<string>") -> NodeConfig:
    """Validate a parsed TOML document (a [node] table, or nothing at all) with command-line
    overrides on top: key -> value as it would be written under [node] (None: not given).
    source names the document in errors (None: there is none, the defaults are in play)."""
    table = _node_table(document, source)
    given = {name: value for name, value in (overrides or {}).items() if value is not None}
    try:
        reject_unknown_keys(given, "node", _KEY_NAMES)
    except ConfigError as error:
        error.source = COMMAND_LINE
        raise

    def written(name: str):
        """(the raw value, where it came from): the command line, the file, or the default."""
        if name in given:
            return given[name], COMMAND_LINE
        return table.get(name, _FIELDS[name].default), source

    def convert(name: str, kind: Kind | None = None):
        value, origin = written(name)
        try:
            return (kind or _FIELDS[name].kind).convert(value, f"node.{name}")
        except ConfigError as error:
            error.source = origin
            raise

    values = {name: convert(name) for name in _KEY_NAMES
              if name not in ("server", "name", "dead_conn_timeout")}
    if written("dead_conn_timeout")[0] is _BY_MODE:
        values["dead_conn_timeout"] = parse_duration(
            _BY_MODE.mirror if values["mirror"] else _BY_MODE.plain, "node.dead_conn_timeout")
    else:
        values["dead_conn_timeout"] = convert("dead_conn_timeout")

    if written("name")[0] is _FROM_HOST_NAME:
        host = socket.gethostname().split(".")[0]
        host = host.lower() if host.isascii() else host
        if not NODE_NAME_RE.fullmatch(host):
            # No source: the value came from neither the file nor the command line.
            raise ConfigError("node.name", "is this host's name, which is not a swap node "
                              "name; set node.name or --name", value=host,
                              allowed=_NodeName.allowed)
        values["name"] = host
    else:
        values["name"] = convert("name")

    # The servers last: whether a port may be given, and which is the default, depend on the
    # protocol (and for "nfs" on nfs_port).
    servers, origin = written("server")
    if servers is _NO_DEFAULT or (isinstance(servers, (list, tuple)) and not servers):
        raise ConfigError("node.server", "at least one server is required",
                          allowed=_SERVERS_REQUIRED, source=origin)
    values["servers"] = convert("server", _Servers(values["protocol"], values["nfs_port"]))
    if values["mirror"]:
        mirror, origin = written("mirror")
        if values["protocol"] != "nbd":
            raise ConfigError("node.mirror", f'needs node.protocol = "nbd" (it is '
                              f'"{values["protocol"]}"): the mirror is an md RAID1 over two '
                              "NBD devices", value=mirror, allowed='false with protocol "nfs"',
                              source=origin)
        if len(values["servers"]) < 2:
            raise ConfigError("node.mirror", "needs at least two servers (node.server / "
                              f"--server), {len(values['servers'])} given", value=mirror,
                              allowed="false with one server", source=origin)
    return NodeConfig(**values)


def load_node_config(path: str | os.PathLike | None, overrides: Mapping) -> NodeConfig:
    """The node's configuration: the TOML file at `path` (None: no file, defaults and
    overrides only), with `overrides` (overrides_from(args)) winning over it. Every failure,
    reading the file included, is a ConfigError."""
    if path is None:
        return parse_node_config({}, overrides, source=None)
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(None, f"cannot read: {error.strerror or error}",
                          source=source) from error
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(None, f"is not UTF-8 (byte {error.start})", source=source) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(None, f"TOML syntax error: {error}", source=source) from None
    return parse_node_config(document, overrides, source=source)


# ---------------------------------------------------------------------------------------------
# The command line of `netswap-node run`.

# option dest -> the [node] key it overrides (the same name, for every option here)
_OPTIONS = ("server", "name", "protocol", "connections", "dead_conn_timeout", "io_timeout",
            "priority", "state_dir", "log", "mirror")
_DURATIONS = ("dead_conn_timeout", "io_timeout")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and the options that override [node] keys. Every override defaults to None
    (not given), so that only what was typed wins over the file."""
    default_config = DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None
    parser.add_argument(
        "--config", metavar="PATH", default=default_config,
        help=f"TOML file with a [node] table (default: {DEFAULT_CONFIG_PATH}, if it exists)")
    parser.add_argument(
        "--server", metavar="HOST[:PORT]", action="append", default=None,
        help=f"a netswapd server (NBD port default {DEFAULT_NBD_PORT}; IPv6 as "
             "[ADDR]:PORT); repeat for more (ranked by hashing the node name); replaces "
             "node.server")
    parser.add_argument("--name", default=None,
                        help="the swap node name (default: the short host name)")
    parser.add_argument("--protocol", choices=_FIELDS["protocol"].kind.options, default=None,
                        help="nbd (default) or nfs")
    parser.add_argument("--connections", metavar="N", type=int, default=None,
                        help="NBD connections, 1..16 (default 1)")
    parser.add_argument("--dead-conn-timeout", metavar="DURATION", default=None,
                        help='how long the kernel waits for a reconnect, e.g. "10m" '
                             '(default; "5s" with --mirror), or seconds')
    parser.add_argument("--io-timeout", metavar="DURATION", default=None,
                        help='the kernel\'s per-request timeout, e.g. "10s" (default)')
    parser.add_argument("--priority", metavar="P", type=int, default=None,
                        help="swapon priority, -1..32767 (default 100)")
    parser.add_argument("--state-dir", metavar="PATH", default=None,
                        help="the agent's state directory (default /run/netswap-node)")
    parser.add_argument("--log", choices=_FIELDS["log"].kind.options, default=None,
                        help="stderr (default) or kmsg")
    parser.add_argument("--mirror", action="store_true", default=None,
                        help="md RAID1 over the exports of two servers (needs two --server)")


def _number_or_text(text: str):
    """A duration as typed: "600" or "1.5" is seconds (a TOML number would be), "10m" text."""
    if re.fullmatch(r"[0-9]+", text, re.ASCII):
        return int(text)
    if re.fullmatch(r"[0-9]*\.[0-9]+|[0-9]+\.", text, re.ASCII):
        return float(text)
    return text


def overrides_from(args: argparse.Namespace) -> dict:
    """The options given on the command line, as load_node_config's overrides."""
    overrides = {}
    for name in _OPTIONS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in _DURATIONS:
            value = _number_or_text(value)
        elif name == "server":
            value = list(value)
        overrides[name] = value
    return overrides
