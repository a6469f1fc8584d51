"""The schema: every netswapd key described once, as a field of the section object that holds it.

A key's description (its kind, its default as it would be written in the TOML file, its meaning,
and in `also` the rules that tie it to other keys) is the metadata of one dataclass field, so
the typed, frozen section objects the daemon reads, the validator, the error messages and the
reference (reference.py) all come from the same place and cannot drift apart. Defaults go
through the same kind as a value from the file. Rules between keys are in rules.py; the
section objects here hold what is left after they passed.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..swap.nodes import node_named
from .errors import ABSENT, ConfigError, key_path
from .kinds import (
    KiB,
    MiB,
    Boolean,
    Choice,
    Duration,
    Integer,
    InterfaceName,
    Kind,
    ListenAddresses,
    Networks,
    NodeNetworks,
    Number,
    PathText,
    Secrets,
    Size,
    Text,
    Uids,
    WordOr,
    describe_type,
)


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()  # the key must be present
OPTIONAL = ABSENT  # the key may be absent; its value is then None


@dataclass(frozen=True)
class Key:
    """One key: what it accepts, what it is when absent, and what it means."""

    name: str
    kind: Kind
    default: object
    meaning: str
    also: str = ""  # rules involving other keys, for the reference (checked in rules.py)


def key(kind: Kind, default, meaning: str, *, also: str = "", repr: bool = True):
    """A section field described as a key (its name is the field's)."""
    return dataclasses.field(repr=repr, metadata={"key": (kind, default, meaning, also)})


def keys_of(section: type) -> tuple[Key, ...]:
    """The keys of a section object, in the order of its fields (the file's and the
    reference's order)."""
    return tuple(Key(field.name, *field.metadata["key"]) for field in dataclasses.fields(section))


# How hard to insist on a protection the kernel may refuse for lack of rights or limits.
_INSISTENCE = Choice("required", "best-effort", "off")
_TLS_MODE = Choice("off", "optional", "require")
_TLS_FILE = PathText('an absolute path, or "" for none', absolute=True, empty_is_none=True)
_NFS_EXPORT_PATH = Text(0, 1024)


@dataclass(frozen=True)
class DaemonConfig:
    # absolute
    state_dir: Path = key(
        PathText("a path; relative paths are resolved against the directory "
            "containing the config file"),
        "/var/lib/netswapd",
        "Directory holding export files, per-node swap files and daemon state.")
    log_level: str = key(
        Choice("debug", "info", "warning", "error"),
        "info",
        "Least severe message that is logged.")
    workers: int = key(
        Integer(1, 256),
        8,
        "I/O threads shared by all connections.")
    shutdown_timeout: float = key(
        Duration(),
        "30s",
        "On SIGTERM/SIGINT, how long in-flight requests may take to finish before "
        "connections are closed.")
    # None: no control socket
    control_socket: Path | None = key(
        PathText('an absolute path of at most 107 bytes, or "" to disable',
            absolute=True, empty_is_none=True, max_bytes=107),
        "/run/netswapd/control.sock",
        "Unix socket netswapctl talks to (mode 0600: root only).")


@dataclass(frozen=True)
class PoolConfig:
    # bytes; None = "auto", computed from the reserve tree at start
    size: int | None = key(
        WordOr("auto", Size(MiB, multiple_of=4096)),
        "auto",
        "Size of the mlocked pool every request payload is carved from; the daemon's "
        'memory for request data never exceeds it. "auto" sizes it to the reservations '
        "(pool.normal_budget and the swap reserve) plus pool.headroom.",
        also="an explicit size must be >= nbd.max_request, and at start >= the "
        "reservations plus pool.headroom")
    lock: str = key(
        _INSISTENCE,
        "required",
        'Whether the pool is mlocked: "required" refuses to start if it cannot be, '
        '"best-effort" logs a warning and continues, "off" never tries.')
    normal_budget: int = key(
        Size(4 * KiB, multiple_of=4096),
        "64MiB",
        "Pool memory shared by non-swap requests and by swap requests before they fall "
        "back to their reserve; attaching swap nodes never takes it.",
        also="and >= nbd.max_request")
    headroom: int = key(
        Size(0, multiple_of=4096),
        "8MiB",
        "Slack on top of the reservations the pool must cover, for allocator "
        "fragmentation.")
    non_swap_exhausted: str = key(
        Choice("wait", "enomem"),
        "wait",
        'What a non-swap request gets when the normal budget is used up: "wait" queues it '
        'until memory is freed, "enomem" fails it at once with ENOMEM.')


@dataclass(frozen=True)
class NbdConfig:
    # (host, port); host "" = any address
    listen: tuple[tuple[str, int], ...] = key(
        ListenAddresses(),
        ["127.0.0.1:10809", "[::1]:10809"],
        "TCP addresses to serve NBD on; an empty list serves TCP nowhere.")
    unix_socket: Path | None = key(
        PathText('an absolute path of at most 107 bytes, or "" to disable',
            absolute=True, empty_is_none=True,
            max_bytes=107),
        "/run/netswapd/nbd.sock",
        "Unix socket to serve NBD on, for local clients.")
    max_request: int = key(
        Size(4 * KiB, 128 * MiB, power_of_two=True),
        "32MiB",
        "Largest READ/WRITE payload served (advertised as the maximum block size); "
        "larger requests are refused.")
    max_inflight: int = key(
        Integer(1, 1024),
        128,
        "Requests one connection may have in flight; with max_request, bounds how much of "
        "the pool one node can hold.")
    max_connections: int = key(
        Integer(1, 65536),
        1024,
        "Connections open at once, all clients together; past it new ones are closed at "
        "accept, so a connection flood cannot take threads and memory from attached nodes.")
    max_connections_per_client: int = key(
        Integer(1, 65536),
        64,
        "Connections open at once from one client address (a node with nbd-client -C N "
        "needs N); past it that client's new connections are closed at accept.")
    handshake_timeout: float = key(
        Duration(),
        "10s",
        "Time a new connection has to finish NBD negotiation before it is dropped.")
    keepalive: float = key(
        Duration(),
        "30s",
        "Idle time after which TCP keepalive probes a client; a client gone without a "
        "word (power loss, cable) is disconnected within about twice this, and its "
        "buffers and reserve go back.")
    send_timeout: float = key(
        Duration(),
        "60s",
        "Time a client may take none of the replies queued for it before it is "
        "disconnected (its buffers and in-flight slots go back).")
    c_loop: bool = key(
        Boolean(),
        True,
        "Serve plain READs and WRITEs on file exports in the C request loop, without the "
        "GIL (false: every request takes the Python path; for comparison and debugging).")
    follow_receiving_cpu: bool = key(
        Boolean(),
        False,
        "While a client sends one request at a time, run its C loop's thread on the CPU "
        "that receives its packets (SO_INCOMING_CPU), sparing two cross-CPU wake-ups per "
        "request; given back at the first queue, or when that CPU is crowded (false: "
        "leave placement to the scheduler, e.g. with your own CPU pinning).")
    block_size_min: int = key(
        Integer(1, 65536, power_of_two=True),
        1,
        "Advertised minimum block size: the alignment clients must respect.")
    block_size_preferred: int = key(
        Integer(512, 128 * MiB, power_of_two=True),
        4096,
        "Advertised preferred block size: the alignment clients should use for speed.",
        also="and >= nbd.block_size_min and <= nbd.max_request")
    tls: str = key(
        _TLS_MODE,
        "off",
        'TLS (NBD STARTTLS) on the TCP listeners: "off" refuses STARTTLS, "optional" '
        'lets each client choose, "require" serves no option but STARTTLS and ABORT '
        "before TLS.",
        also="not off: needs nbd.tls_certificate")
    # the same, the Unix socket
    unix_socket_tls: str = key(
        _TLS_MODE,
        "off",
        "TLS on the Unix socket, as nbd.tls for TCP.",
        also="not off: needs nbd.tls_certificate")
    tls_certificate: Path | None = key(
        _TLS_FILE,
        "",
        "PEM file with the server's certificate (and any intermediates after it); read at "
        "start and on reload.")
    # None: the key is in tls_certificate
    tls_key: Path | None = key(
        _TLS_FILE,
        "",
        'PEM file with the certificate\'s private key, unencrypted; "" when the key is in '
        "nbd.tls_certificate.")
    # None: client certificates are not asked for
    tls_client_ca: Path | None = key(
        _TLS_FILE,
        "",
        "PEM file of CA certificates that client certificates must chain to; set, every TLS "
        'client must present one; "" accepts TLS clients without a certificate.')

    def tls_mode(self, unix: bool) -> str:
        """The TLS mode of a connection accepted on the Unix socket or on TCP."""
        return self.unix_socket_tls if unix else self.tls


@dataclass(frozen=True)
class SwapConfig:
    enabled: bool = key(
        Boolean(),
        True,
        'Whether a client asking for export "swap/<node>" gets its own swap export, '
        "created from this template.")
    size: int = key(
        Size(MiB, multiple_of=4096),
        "1GiB",
        "Size of each node's swap export.",
        also="and a multiple of nbd.block_size_min")
    backend: str = key(
        Choice("file", "memory"),
        "file",
        "Where per-node swap data lives: a sparse file in directory, or server RAM "
        "(lost when the daemon stops).")
    # absolute, strictly inside daemon.state_dir
    directory: Path = key(
        PathText("a path, relative to daemon.state_dir or absolute"),
        "swap",
        "Directory for per-node swap files.",
        also="and must resolve strictly inside daemon.state_dir")
    description: str = key(
        Text(0, 4096),
        "netswap per-node swap",
        "Description sent to clients (NBD_INFO_DESCRIPTION).")
    max_nodes: int = key(
        Integer(1, 4096),
        16,
        "Swap nodes attached at once (a node past them is refused); the pool holds a "
        "reserve for each.")
    reserve_inflight: int = key(
        Integer(1, 1024),
        32,
        "Swap requests in flight per node that its reserve covers.")
    # bytes, a power of two
    reserve_request: int = key(
        Size(4 * KiB, 128 * MiB, power_of_two=True),
        "128KiB",
        "Request size the reserve covers: what a node's swap I/O is split into (its "
        "max_sectors_kb).",
        also="and <= nbd.max_request")
    max_connections: int = key(
        Integer(1, 64),
        4,
        "Connections per node whose receive windows the reserve covers.")
    detach_grace: float = key(
        Duration(),
        "30s",
        "How long a node's reserve stays connected after its last connection closes, so "
        "a reconnecting node finds it still there.")
    # host bits clear
    node_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = key(
        Networks(),
        [],
        "Peers whose connections are treated as swap (emergency) traffic from accept, "
        "before their export is known.")
    # ((network, node), ...), most specific first
    nodes: tuple = key(
        NodeNetworks(),
        {"localhost": ["127.0.0.0/8", "::1"]},
        "Which client addresses are which swap node ([swap.nodes] node = [networks]); an NFS "
        "client in none of them gets no swap file. Formerly nfs.nodes, which is still read, "
        "with a warning.")
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = key(
        Networks(),
        ["0.0.0.0/0", "::/0"],
        "TCP clients that may open a swap/<node> export (and see them listed); the "
        "default lets anyone who reaches nbd.listen open any node's swap.")
    # None: any uid
    allow_uids: tuple[int, ...] | None = key(
        Uids(),
        "any",
        "Unix-socket clients (by SO_PEERCRED uid) that may open a swap/<node> export.")
    bind: str = key(
        Choice("address", "secret", "none"),
        "address",
        '"address": a node\'s swap is bound to the client address (Unix socket: uid) that '
        "first attached it, kept in daemon.state_dir, and refused to every other; "
        '"secret": a client must ask for "swap/<node>:<secret>" with the node\'s secret '
        'from secrets; "none": any allowed client may open any node\'s swap.')
    # (node, secret), sorted
    secrets: tuple[tuple[str, bytes], ...] = key(
        Secrets(),
        {},
        'Per-node secrets for bind = "secret" ([swap.secrets] node = "secret"); they '
        "cross the network in clear without TLS.",
        also='set if and only if bind = "secret"', repr=False)
    wipe: bool = key(
        Boolean(),
        False,
        "Discard a node's swap contents (punch holes, made durable) when it detaches for "
        "good (detach_grace over, an operator's detach, daemon stop) and every node's image "
        "at daemon start.")

    def node_of(self, address: str) -> str | None:
        """The swap node a client address is (swap.nodes), or None."""
        return node_named(address, self.nodes)


@dataclass(frozen=True)
class NetworkConfig:
    # SO_PRIORITY
    priority: int = key(
        Integer(0, 7),
        6,
        "SO_PRIORITY of swap connections: the kernel's queueing priority for their "
        "packets (above 6 needs CAP_NET_ADMIN).")
    # the upper six bits of IP_TOS / IPV6_TCLASS
    dscp: int = key(
        Integer(0, 63),
        46,
        "DSCP of swap connections (IP_TOS / IPV6_TCLASS), for switches and routers; 46 is "
        "EF (expedited forwarding).")
    # SO_MARK; 0 = leave unset
    mark: int = key(
        Integer(0, 2**32 - 1),
        0,
        "SO_MARK of swap connections, for firewall and routing rules; 0 leaves it unset.")
    shape: bool = key(
        Boolean(),
        False,
        "Install a root qdisc on interface that sends packets carrying mark first (an HTB "
        "with a top-priority class and a BPF mark filter); removed at exit.",
        also="needs a nonzero network.mark")
    # "" = none; never "" when shape is true
    interface: str = key(
        InterfaceName(),
        "",
        "The serving interface, for shape.",
        also="required (not empty) when network.shape = true")


@dataclass(frozen=True)
class PressureConfig:
    enabled: bool = key(
        Boolean(),
        True,
        "Watch this server's memory pressure (PSI and MemAvailable) and run in "
        "emergency mode while it is high.")
    interval: float = key(
        Duration(),
        "1s",
        "How often /proc/pressure/memory and MemAvailable are read when PSI triggers are "
        "unavailable.")
    # percent; psi_exit < psi_enter
    psi_enter: float = key(
        Number(0, 100),
        10.0,
        'Memory PSI "some" avg10 (%) at or above which emergency mode starts.')
    psi_exit: float = key(
        Number(0, 100),
        5.0,
        "Memory PSI avg10 (%) below which emergency mode may end.",
        also="and < pressure.psi_enter")
    # bytes; available_exit > available_enter
    available_enter: int = key(
        Size(0),
        "256MiB",
        "MemAvailable at or below which emergency mode starts.")
    available_exit: int = key(
        Size(0),
        "512MiB",
        "MemAvailable above which emergency mode may end.",
        also="and > pressure.available_enter")


@dataclass(frozen=True)
class ProtectConfig:
    mlockall: str = key(
        _INSISTENCE,
        "best-effort",
        "mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT), so the daemon's own code and "
        'heap are never swapped out: "required" refuses to start without it, '
        '"best-effort" warns, "off" never tries.')
    oom_score_adj: int = key(
        Integer(-1000, 1000),
        -1000,
        "Written to /proc/self/oom_score_adj; -1000 exempts the daemon from the OOM "
        "killer.")
    io_flusher: str = key(
        _INSISTENCE,
        "best-effort",
        "prctl(PR_SET_IO_FLUSHER): the kernel does not make the daemon's allocations wait "
        "on the swap I/O the daemon itself must complete (needs CAP_SYS_RESOURCE); "
        '"required" refuses to start without it, "best-effort" warns, "off" never tries.')


@dataclass(frozen=True)
class NfsConfig:
    enabled: bool = key(
        Boolean(),
        True,
        "Serve NFSv3 (and MOUNT v3) over TCP: a swap export of per-node swap files and a "
        "scratch export of ordinary files.")
    listen: tuple[tuple[str, int], ...] = key(
        ListenAddresses(),
        ["127.0.0.1:2049"],
        "TCP addresses for NFSv3; an empty list serves NFS nowhere.")
    mount_listen: tuple[tuple[str, int], ...] = key(
        ListenAddresses(),
        ["127.0.0.1:20048"],
        "TCP addresses for MOUNT v3 (clients give it as mountport=).")
    # "" = none
    swap_export: str = key(
        _NFS_EXPORT_PATH,
        "/swap",
        "Export path of the swap export (MNT argument); each node sees only its own file "
        'there, named after the node; "" disables it.')
    # absolute
    swap_directory: Path = key(
        PathText("a path, relative to daemon.state_dir or absolute"),
        "nfs-swap",
        "Directory holding the per-node swap files.",
        also="and must resolve strictly inside daemon.state_dir")
    swap_size: int = key(
        Size(MiB, multiple_of=MiB),
        "256MiB",
        "Size of each node's swap file, fully allocated when the node first uses it "
        "(swapon refuses files with holes).")
    # "" = none
    scratch_export: str = key(
        _NFS_EXPORT_PATH,
        "/scratch",
        'Export path of a writable directory of ordinary files (a non-swap consumer); "" '
        "disables it.")
    # absolute
    scratch_directory: Path = key(
        PathText("a path, relative to daemon.state_dir or absolute"),
        "nfs-scratch",
        "Directory served as the scratch export.",
        also="and must resolve strictly inside daemon.state_dir")
    node_ports: str = key(
        Choice("privileged", "any"),
        "privileged",
        'Which source ports make a connection from a node\'s address that node: '
        '"privileged" (below 1024: only root on the node can bind them, as the kernel '
        "client and libnfs run as root do) keeps an unprivileged user on the node from "
        "reading or writing its swap file, which holds every process's memory, or "
        'unmounting it; "any" trusts every port (as knfsd\'s insecure). Such a '
        "connection may still use the other exports.")
    # seconds; None = never
    swap_idle_timeout: float | None = key(
        WordOr("never", Duration()),
        "10m",
        "A node's reserve is attached on its MNT of the swap export or its first swap-file "
        "READ/WRITE/COMMIT, and detached on its UMNT or after this long without any "
        "(then swap.detach_grace as for NBD); an idle detach never wipes the file, a later "
        'swap-file call attaches again. "never": only UMNT detaches.')
    max_io: int = key(
        Size(8 * KiB, 16 * MiB, power_of_two=True),
        "1MiB",
        "Largest READ/WRITE (FSINFO rtmax/wtmax); records are capped just above it.")
    c_loop: bool = key(
        Boolean(),
        True,
        "Serve a swap node's plain READs and WRITEs of its own swap file, and plain "
        "scratch-file READs and WRITEs, in the C call loop, without the GIL (false: every "
        "call takes the Python path; for comparison and debugging).")
    # NFS and MOUNT together
    max_connections: int = key(
        Integer(1, 65536),
        1024,
        "NFS and MOUNT connections open at once, all clients together (a budget of its "
        "own, apart from nbd.max_connections); past it new ones are closed at accept.")
    max_connections_per_client: int = key(
        Integer(1, 65536),
        64,
        "NFS and MOUNT connections open at once from one client address (a Linux mount "
        "takes one, or nconnect=N, plus a short MOUNT one; each libnfs tool one of each); "
        "past it that client's new connections are closed at accept.")
    keepalive: float = key(
        Duration(),
        "30s",
        "Idle time after which TCP keepalive probes an NFS client, as nbd.keepalive: a "
        "node gone without a word is disconnected within about twice this.")
    send_timeout: float = key(
        Duration(),
        "60s",
        "Time an NFS or MOUNT client may take none of the replies queued for it before "
        "it is disconnected (its buffers go back), as nbd.send_timeout for NBD clients.")
    record_timeout: float = key(
        Duration(),
        "30s",
        "Time an NFS, MOUNT or portmapper client has to send an RPC record whole once its "
        "first byte is in (time the daemon waits for pool memory for it not counted); a "
        "client that trickles a record, or stops halfway, holds the record's pool buffer, "
        "and is disconnected (NFS clients send the call again on a new connection).")
    portmapper: str = key(
        Choice("off", "serve", "register"),
        "register",
        "How clients find the NFS and MOUNT ports without port=/mountport=: "
        '"register" SETs them at the local rpcbind (nfs.rpcbind_socket) at start and UNSETs '
        'them at stop, only a warning if none answers; "serve" answers portmapper v2 itself '
        'on nfs.portmapper_listen (TCP; SET, UNSET and CALLIT refused); "off" neither.')
    portmapper_listen: tuple[tuple[str, int], ...] = key(
        ListenAddresses(),
        ["127.0.0.1:111"],
        'TCP addresses of the portmapper with nfs.portmapper = "serve" (clients ask port '
        "111).")
    rpcbind_socket: Path = key(
        PathText("an absolute path of at most 107 bytes", absolute=True,
            max_bytes=107),
        "/run/rpcbind.sock",
        "The local rpcbind's AF_LOCAL socket, where nfs.portmapper = \"register\" "
        "registers (rpcbind takes SET only from local callers).")

    def node_port_allowed(self, port: int | None) -> bool:
        """May a connection from this source `port` be a swap node's (nfs.node_ports)?
        None (no port: not a TCP peer) may."""
        return port is None or port < 1024 or self.node_ports == "any"


@dataclass(frozen=True)
class MetricsConfig:
    # (host, port) pairs, as nbd.listen
    listen: tuple[tuple[str, int], ...] = key(
        ListenAddresses(),
        ["127.0.0.1:9810"],
        "Where Prometheus scrapes /metrics: the pool, the reserve tree, drops and server "
        "counters. The endpoint is a non-swap consumer: it never touches the reserve. An "
        "empty list serves no metrics.")


@dataclass(frozen=True)
class ExportConfig:
    name: str = key(
        Text(1, 255, reserved_prefix="swap/"),
        REQUIRED,
        "Export name clients ask for.",
        also="and unique among exports")
    backend: str = key(
        Choice("file", "memory"),
        "file",
        "Where the export's data lives: the file at path, or server RAM (lost when the "
        "daemon stops).")
    # absolute for "file", None for "memory"
    path: Path | None = key(
        PathText("a path, relative to daemon.state_dir or absolute"),
        OPTIONAL,
        "Backing file of a file export.",
        also='required for backend "file", forbidden for "memory"; unique among exports; '
        "not inside swap.directory")
    size: int = key(
        Size(4096, multiple_of=4096),
        REQUIRED,
        "Export size.",
        also="and a multiple of nbd.block_size_min")
    read_only: bool = key(
        Boolean(),
        False,
        "Serve the export read-only (writes are refused).")
    description: str = key(
        Text(0, 4096),
        "",
        "Description sent to clients (NBD_INFO_DESCRIPTION).")
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = key(
        Networks(),
        ["0.0.0.0/0", "::/0"],
        "TCP clients that may open the export (and see it listed); the default lets "
        "anyone who reaches nbd.listen open it.")
    # None: any uid
    allow_uids: tuple[int, ...] | None = key(
        Uids(),
        "any",
        "Unix-socket clients (by SO_PEERCRED uid) that may open the export.")
    wipe: bool = key(
        Boolean(),
        False,
        "Discard the export's contents (punch holes, made durable) at daemon start and "
        "whenever its last client disconnects.",
        also="not with read_only = true")


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig
    pool: PoolConfig
    nbd: NbdConfig
    swap: SwapConfig
    network: NetworkConfig
    pressure: PressureConfig
    protect: ProtectConfig
    nfs: NfsConfig
    metrics: MetricsConfig
    exports: tuple[ExportConfig, ...]
    source: str  # the file this came from, or "<string>"


# Fixed sections, in file and documentation order; "exports" is an array of tables.
SECTIONS: dict[str, tuple[Key, ...]] = {
    name: keys_of(section) for name, section in (
        ("daemon", DaemonConfig), ("pool", PoolConfig), ("nbd", NbdConfig),
        ("swap", SwapConfig), ("network", NetworkConfig), ("pressure", PressureConfig),
        ("protect", ProtectConfig), ("nfs", NfsConfig), ("metrics", MetricsConfig))
}
EXPORT: tuple[Key, ...] = keys_of(ExportConfig)
TOP_LEVEL = (*SECTIONS, "exports")

KEYS: tuple[str, ...] = (
    *(f"{section}.{k.name}" for section, keys in SECTIONS.items() for k in keys),
    *(f"exports[].{k.name}" for k in EXPORT),
)


def reject_unknown_keys(table: Mapping, prefix: str, known: tuple[str, ...]) -> None:
    for name, value in table.items():
        if name in known:
            continue
        problem = "unknown key"
        close = difflib.get_close_matches(str(name), known, n=1)
        if close:
            problem += f" (did you mean {close[0]!r}?)"
        elif not prefix:  # a key written above its [section] header, e.g. top-level "workers"
            owners = [s for s, keys in SECTIONS.items() if name in {k.name for k in keys}]
            if owners:
                problem += f" (did you mean it under [{'] or ['.join(owners)}]?)"
        raise ConfigError(key_path(prefix, str(name)), problem, value=value,
                          allowed=", ".join(known))


def read_table(table, prefix: str, keys: tuple[Key, ...], header: str = ""
               ) -> tuple[dict, dict]:
    """Check one TOML table against its keys; header is how the table is written in TOML.

    Returns (values, written): the converted values, and the raw values they came from
    (the default where the key was absent), so that errors about rules between keys can
    quote what the operator wrote rather than a byte count.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(prefix, f"is {describe_type(table)}, not a table", value=table,
                          allowed=f"a table ({header or f'[{prefix}]'})")
    reject_unknown_keys(table, prefix, tuple(k.name for k in keys))
    values, written = {}, {}
    for k in keys:
        path = key_path(prefix, k.name)
        raw = table.get(k.name, k.default)
        if raw is REQUIRED:
            raise ConfigError(path, "is required but missing", allowed=k.kind.allowed)
        written[k.name] = raw
        values[k.name] = None if raw is OPTIONAL else k.kind.convert(raw, path)
    return values, written
