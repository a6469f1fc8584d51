"""Configuration: TOML -> typed, validated, frozen objects; every error names key, value, rule."""

import dataclasses
import ipaddress
import pickle
import re
import tomllib
from pathlib import Path

import pytest

from netswap import config
from netswap.config import ConfigError
from support.daemon import REPO

MiB = 1 << 20
# The default allow list: every IPv4 and every IPv6 client.
EVERYONE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
GiB = 1 << 30


def error_of(mapping, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        config.parse(mapping, **kwargs)
    return caught.value


def with_exports(*exports, **sections):
    return {**sections, "exports": list(exports)}


# ---------------------------------------------------------------------------------------------
# Sizes and durations.


@pytest.mark.parametrize(
    "text, expected",
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("4096B", 4096),
        ("512KiB", 512 << 10),
        ("512K", 512 << 10),
        ("64MiB", 64 * MiB),
        ("64M", 64 * MiB),
        ("1GiB", GiB),
        ("2TiB", 2 << 40),
        ("1kB", 1000),
        ("100MB", 100_000_000),
        ("4GB", 4_000_000_000),
        ("1 GiB", GiB),
        (" 8MiB ", 8 * MiB),
    ],
)
def test_parse_size_accepts(text, expected):
    assert config.parse_size(text, "pool.size") == expected


@pytest.mark.parametrize(
    "value, problem",
    [
        ("1.5GiB", "whole number"),
        ("64XB", "unknown unit 'XB'"),
        ("64KB", "unknown unit 'KB'"),  # ambiguous between 1000 and 1024: refused
        ("64mb", "unknown unit 'mb'"),
        ("GiB", "not a size"),
        ("", "not a size"),
        ("-1", "not a size"),
        ("٤٠٩٦", "not a size"),  # non-ASCII digits that int() would accept
        (-4096, "negative"),
        (1.5, "is a float"),
        (True, "is a boolean"),
        ([4096], "is an array"),
    ],
)
def test_parse_size_rejects(value, problem):
    with pytest.raises(ConfigError) as caught:
        config.parse_size(value, "exports[1].size")
    message = str(caught.value)
    assert f"exports[1].size = {value!r}" in message
    assert problem in message
    assert "KiB" in message and "kB" in message  # the allowed syntax is spelled out


@pytest.mark.parametrize(
    "value, seconds",
    [
        (30, 30.0),
        (0.25, 0.25),
        ("10s", 10.0),
        ("500ms", 0.5),
        ("100ms", 0.1),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 2 m ", 120.0),
    ],
)
def test_parse_duration_accepts(value, seconds):
    assert config.parse_duration(value, "daemon.shutdown_timeout") == seconds


@pytest.mark.parametrize(
    "value, problem",
    [
        ("10", "no unit"),  # seconds or milliseconds? refuse to guess
        ("5d", "unknown unit 'd'"),
        ("soon", "not a duration"),
        ("-1s", "not a duration"),
        (0, "> 0"),
        ("0ms", "> 0"),
        (-3, "> 0"),
        (float("inf"), "finite"),
        (float("nan"), "finite"),
        (True, "is a boolean"),
    ],
)
def test_parse_duration_rejects(value, problem):
    with pytest.raises(ConfigError) as caught:
        config.parse_duration(value, "nbd.handshake_timeout")
    message = str(caught.value)
    assert f"nbd.handshake_timeout = {value!r}" in message
    assert problem in message
    assert '"500ms"' in message


def test_format_size():
    assert config.format_size(32 * MiB) == "32MiB"
    assert config.format_size(1536 * MiB) == "1536MiB"
    assert config.format_size(1000) == "1000 bytes"


# ---------------------------------------------------------------------------------------------
# Defaults and the typed result.


DEFAULT_POOL = config.PoolConfig(size=None, lock="required", normal_budget=64 * MiB,
                                 headroom=8 * MiB, non_swap_exhausted="wait")


def test_empty_document_gives_defaults():
    cfg = config.parse({})
    assert cfg.daemon == config.DaemonConfig(
        state_dir=Path("/var/lib/netswapd"), log_level="info", workers=8, shutdown_timeout=30.0,
        control_socket=Path("/run/netswapd/control.sock"),
    )
    assert cfg.pool == DEFAULT_POOL
    assert cfg.nbd == config.NbdConfig(
        listen=(("127.0.0.1", 10809), ("::1", 10809)),
        unix_socket=Path("/run/netswapd/nbd.sock"),
        max_request=32 * MiB,
        max_inflight=128,
        max_connections=1024,
        max_connections_per_client=64,
        handshake_timeout=10.0,
        keepalive=30.0,
        send_timeout=60.0,
        c_loop=True,
        follow_receiving_cpu=False,
        block_size_min=1,
        block_size_preferred=4096,
        tls="off",
        unix_socket_tls="off",
        tls_certificate=None,
        tls_key=None,
        tls_client_ca=None,
    )
    assert cfg.swap == config.SwapConfig(
        enabled=True,
        size=GiB,
        backend="file",
        directory=Path("/var/lib/netswapd/swap"),
        description="netswap per-node swap",
        max_nodes=16,
        reserve_inflight=32,
        reserve_request=128 << 10,
        max_connections=4,
        detach_grace=30.0,
        node_networks=(),
        nodes=((ipaddress.ip_network("::1/128"), "localhost"),
               (ipaddress.ip_network("127.0.0.0/8"), "localhost")),
        allow=EVERYONE,
        allow_uids=None,
        bind="address",
        secrets=(),
        wipe=False,
    )
    assert cfg.network == config.NetworkConfig(priority=6, dscp=46, mark=0, shape=False,
                                               interface="")
    assert cfg.pressure == config.PressureConfig(
        enabled=True, interval=1.0, psi_enter=10.0, psi_exit=5.0,
        available_enter=256 * MiB, available_exit=512 * MiB,
    )
    assert cfg.protect == config.ProtectConfig(mlockall="best-effort", oom_score_adj=-1000,
                                               io_flusher="best-effort")
    assert cfg.exports == ()
    assert cfg.source == "<string>"


def test_result_is_frozen():
    cfg = config.parse({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.pool.size = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.daemon = None


def test_exports_are_typed_and_paths_resolved():
    cfg = config.parse(
        with_exports(
            {"name": "scratch", "path": "scratch.img", "size": "1GiB"},
            {"name": "abs", "path": "/srv/images/abs.img", "size": 8192, "read_only": True},
            {"name": "ram", "backend": "memory", "size": "256MiB", "description": "remote RAM"},
            daemon={"state_dir": "/srv/netswap"},
        )
    )
    assert cfg.exports == (
        config.ExportConfig("scratch", "file", Path("/srv/netswap/scratch.img"), GiB, False, "", EVERYONE, None, False),
        config.ExportConfig("abs", "file", Path("/srv/images/abs.img"), 8192, True, "", EVERYONE, None, False),
        config.ExportConfig("ram", "memory", None, 256 * MiB, False, "remote RAM", EVERYONE, None, False),
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:10809", ("127.0.0.1", 10809)),
        ("[::1]:10809", ("::1", 10809)),
        ("[0:0::1]:1", ("::1", 1)),  # canonical spelling, so duplicates are caught
        ("[::]:0", ("::", 0)),
        ("*:10809", ("", 10809)),
        (":10809", ("", 10809)),
        ("localhost:65535", ("localhost", 65535)),
        ("[fe80::1%eth0]:10809", ("fe80::1%eth0", 10809)),
    ],
)
def test_listen_addresses(text, expected):
    assert config.parse({"nbd": {"listen": [text]}}).nbd.listen == (expected,)


def test_listen_may_be_empty_and_unix_socket_disabled():
    nbd = config.parse({"nbd": {"listen": [], "unix_socket": ""}}).nbd
    assert nbd.listen == ()
    assert nbd.unix_socket is None


@pytest.mark.parametrize("size, expected", [("auto", None), ("128MiB", 128 * MiB),
                                            (32 * MiB, 32 * MiB)])
def test_pool_size_is_auto_or_a_size(size, expected):
    assert config.parse({"pool": {"size": size}}).pool.size == expected


def test_auto_pool_size_is_not_held_against_max_request():
    # "auto" is computed at start from the reservations, which cover the largest request.
    cfg = config.parse({"nbd": {"max_request": "128MiB"}, "pool": {"normal_budget": "128MiB"}})
    assert cfg.pool.size is None


def test_node_networks_are_parsed_into_networks():
    networks = config.parse({"swap": {"node_networks": [
        "10.0.0.0/24", "fd00:1::/64", "192.168.1.7", "2001:db8::1", "172.16.0.0/255.240.0.0",
    ]}}).swap.node_networks
    assert networks == (
        ipaddress.ip_network("10.0.0.0/24"),
        ipaddress.ip_network("fd00:1::/64"),
        ipaddress.ip_network("192.168.1.7/32"),  # a bare address is the one-host network
        ipaddress.ip_network("2001:db8::1/128"),
        ipaddress.ip_network("172.16.0.0/12"),
    )
    assert ipaddress.ip_address("10.0.0.9") in networks[0]


def test_new_sections_take_what_is_written():
    cfg = config.parse({
        "network": {"priority": 0, "dscp": 0, "mark": 2**32 - 1, "shape": True,
                    "interface": "bond0.100"},
        "pressure": {"enabled": False, "interval": "250ms", "psi_enter": 40, "psi_exit": 2.5,
                     "available_enter": 0, "available_exit": "1GiB"},
        "protect": {"mlockall": "required", "oom_score_adj": 0, "io_flusher": "off"},
    })
    assert cfg.network == config.NetworkConfig(0, 0, 2**32 - 1, True, "bond0.100")
    assert cfg.pressure == config.PressureConfig(False, 0.25, 40.0, 2.5, 0, GiB)
    assert cfg.protect == config.ProtectConfig("required", 0, "off")


def test_relative_state_dir_is_resolved_against_the_config_file(tmp_path):
    (tmp_path / "etc").mkdir()
    config_file = tmp_path / "etc" / "netswapd.toml"
    config_file.write_text('[daemon]\nstate_dir = "../state"\n')
    cfg = config.load(config_file)
    assert cfg.daemon.state_dir == tmp_path / "state"
    assert cfg.swap.directory == tmp_path / "state" / "swap"
    assert cfg.source == str(config_file)


def test_relative_state_dir_without_a_file_is_an_error():
    error = error_of({"daemon": {"state_dir": "state"}})
    assert error.key == "daemon.state_dir"
    assert "'state'" in str(error) and "absolute path" in str(error)
    cfg = config.parse({"daemon": {"state_dir": "state"}}, base_dir=Path("/etc"))
    assert cfg.daemon.state_dir == Path("/etc/state")


# ---------------------------------------------------------------------------------------------
# Errors: each names the key path, the value as written, and what is allowed.

ALL_SECTIONS = "daemon, pool, nbd, swap, network, pressure, protect, nfs, metrics, exports"

ERROR_CASES = [
    # (id, document, key, value, fragment of the allowed set)
    ("unknown top-level", {"deamon": {}}, "deamon", {}, ALL_SECTIONS),
    ("key above its section", {"workers": 4}, "workers", 4, ALL_SECTIONS),
    ("unknown nested", {"daemon": {"wrokers": 4}}, "daemon.wrokers", 4,
     "state_dir, log_level, workers, shutdown_timeout"),
    ("unknown in export", with_exports({"name": "a", "size": 4096, "backend": "memory",
                                        "readonly": True}),
     "exports[0].readonly", True, "name, backend, path, size, read_only, description"),
    ("section not a table", {"pool": "256MiB"}, "pool", "256MiB", "a table ([pool])"),
    ("exports not an array", {"exports": {"name": "a"}}, "exports", {"name": "a"},
     "[[exports]]"),
    ("export not a table", {"exports": ["scratch"]}, "exports[0]", "scratch",
     "a table ([[exports]])"),
    ("string for int", {"daemon": {"workers": "8"}}, "daemon.workers", "8",
     "an integer from 1 to 256"),
    ("float for int", {"daemon": {"workers": 8.0}}, "daemon.workers", 8.0,
     "an integer from 1 to 256"),
    ("bool for int", {"nbd": {"max_inflight": True}}, "nbd.max_inflight", True,
     "an integer from 1 to 1024"),
    ("string for bool", {"swap": {"enabled": "yes"}}, "swap.enabled", "yes", "true or false"),
    ("int for bool", {"swap": {"enabled": 1}}, "swap.enabled", 1, "true or false"),
    ("bad size string", {"pool": {"size": "1.5GiB"}}, "pool.size", "1.5GiB", "KiB"),
    ("bad size unit", {"swap": {"size": "1 gigabyte"}}, "swap.size", "1 gigabyte", "GiB"),
    ("bad duration", {"daemon": {"shutdown_timeout": "30"}}, "daemon.shutdown_timeout", "30",
     '"10s"'),
    ("zero duration", {"nbd": {"handshake_timeout": 0}}, "nbd.handshake_timeout", 0, "> 0"),
    ("workers 0", {"daemon": {"workers": 0}}, "daemon.workers", 0, "from 1 to 256"),
    ("workers 257", {"daemon": {"workers": 257}}, "daemon.workers", 257, "from 1 to 256"),
    ("inflight 2000", {"nbd": {"max_inflight": 2000}}, "nbd.max_inflight", 2000,
     "from 1 to 1024"),
    ("bad log level", {"daemon": {"log_level": "verbose"}}, "daemon.log_level", "verbose",
     '"debug", "info", "warning", "error"'),
    ("log level is case-sensitive", {"daemon": {"log_level": "INFO"}}, "daemon.log_level",
     "INFO", '"info"'),
    ("bad lock", {"pool": {"lock": "yes"}}, "pool.lock", "yes",
     '"required", "best-effort", "off"'),
    ("pool too small", {"pool": {"size": "512KiB"}}, "pool.size", "512KiB",
     '"auto", or a size >= 1MiB'),
    ("pool not page multiple", {"pool": {"size": 2 * MiB + 100}}, "pool.size", 2 * MiB + 100,
     "a multiple of 4096"),
    ("pool auto is case-sensitive", {"pool": {"size": "Auto"}}, "pool.size", "Auto",
     '"auto", or an integer number of bytes'),
    ("pool size a bool", {"pool": {"size": True}}, "pool.size", True, '"auto", or'),
    ("normal budget not page multiple", {"pool": {"normal_budget": 40 * MiB + 512}},
     "pool.normal_budget", 40 * MiB + 512, "a size >= 4KiB, a multiple of 4096"),
    ("headroom negative", {"pool": {"headroom": -1}}, "pool.headroom", -1, "KiB"),
    ("headroom not page multiple", {"pool": {"headroom": "6000"}}, "pool.headroom", "6000",
     "a multiple of 4096"),
    ("bad non_swap_exhausted", {"pool": {"non_swap_exhausted": "fail"}},
     "pool.non_swap_exhausted", "fail", '"wait", "enomem"'),
    ("max_request not power of two", {"nbd": {"max_request": "48MiB"}}, "nbd.max_request",
     "48MiB", "power-of-two size from 4KiB to 128MiB"),
    ("max_request too big", {"nbd": {"max_request": "256MiB"}, "pool": {"size": "1GiB"}},
     "nbd.max_request", "256MiB", "from 4KiB to 128MiB"),
    ("max_request too small", {"nbd": {"max_request": 2048}}, "nbd.max_request", 2048,
     "from 4KiB to 128MiB"),
    ("block_size_min not power of two", {"nbd": {"block_size_min": 3}}, "nbd.block_size_min",
     3, "a power of two from 1 to 65536"),
    ("block_size_min too big", {"nbd": {"block_size_min": 131072}}, "nbd.block_size_min",
     131072, "a power of two from 1 to 65536"),
    ("preferred below 512", {"nbd": {"block_size_preferred": 256}},
     "nbd.block_size_preferred", 256, "a power of two from 512"),
    ("preferred below min", {"nbd": {"block_size_min": 65536, "block_size_preferred": 4096}},
     "nbd.block_size_preferred", 4096, ">= max(nbd.block_size_min, 512)"),
    ("preferred above max_request", {"nbd": {"max_request": "4KiB",
                                             "block_size_preferred": 8192}},
     "nbd.block_size_preferred", 8192, "<= nbd.max_request"),
    ("pool smaller than max_request", {"pool": {"size": "16MiB"}}, "pool.size", "16MiB",
     "pool.size >= nbd.max_request"),
    ("normal budget smaller than max_request", {"pool": {"normal_budget": "16MiB"}},
     "pool.normal_budget", "16MiB", "pool.normal_budget >= nbd.max_request"),
    ("max_nodes 0", {"swap": {"max_nodes": 0}}, "swap.max_nodes", 0, "from 1 to 4096"),
    ("max_nodes 4097", {"swap": {"max_nodes": 4097}}, "swap.max_nodes", 4097,
     "from 1 to 4096"),
    ("reserve_inflight 0", {"swap": {"reserve_inflight": 0}}, "swap.reserve_inflight", 0,
     "from 1 to 1024"),
    ("reserve_inflight 1025", {"swap": {"reserve_inflight": 1025}}, "swap.reserve_inflight",
     1025, "from 1 to 1024"),
    ("max_connections 65", {"swap": {"max_connections": 65}}, "swap.max_connections", 65,
     "from 1 to 64"),
    ("reserve_request not power of two", {"swap": {"reserve_request": "96KiB"}},
     "swap.reserve_request", "96KiB", "a power-of-two size from 4KiB to 128MiB"),
    ("reserve_request too small", {"swap": {"reserve_request": 2048}},
     "swap.reserve_request", 2048, "a power-of-two size from 4KiB"),
    ("reserve_request above max_request", {"nbd": {"max_request": "64KiB"}},
     "swap.reserve_request", "128KiB", "swap.reserve_request <= nbd.max_request"),
    ("detach_grace zero", {"swap": {"detach_grace": 0}}, "swap.detach_grace", 0, "> 0"),
    ("detach_grace without unit", {"swap": {"detach_grace": "30"}}, "swap.detach_grace", "30",
     '"10s"'),
    ("node_networks not a list", {"swap": {"node_networks": "10.0.0.0/8"}},
     "swap.node_networks", "10.0.0.0/8", "a list of CIDR networks"),
    ("node_networks item not a string", {"swap": {"node_networks": [10]}},
     "swap.node_networks[0]", 10, "a list of CIDR networks"),
    ("node_networks not a network", {"swap": {"node_networks": ["10.0.0.0/24", "nodes"]}},
     "swap.node_networks[1]", "nodes", "IPv4 or IPv6"),
    ("node_networks prefix too long", {"swap": {"node_networks": ["10.0.0.0/33"]}},
     "swap.node_networks[0]", "10.0.0.0/33", "IPv4 or IPv6"),
    ("node_networks host bits", {"swap": {"node_networks": ["10.0.0.5/24"]}},
     "swap.node_networks[0]", "10.0.0.5/24", "host bits clear"),
    ("node_networks v6 host bits", {"swap": {"node_networks": ["fd00::1/64"]}},
     "swap.node_networks[0]", "fd00::1/64", "host bits clear"),
    ("node_networks zone", {"swap": {"node_networks": ["fe80::%eth0/64"]}},
     "swap.node_networks[0]", "fe80::%eth0/64", "CIDR networks"),
    ("node_networks duplicate", {"swap": {"node_networks": ["10.0.0.0/24",
                                                            "10.0.0.0/255.255.255.0"]}},
     "swap.node_networks[1]", "10.0.0.0/255.255.255.0", "no duplicates"),
    ("listen without port", {"nbd": {"listen": ["127.0.0.1"]}}, "nbd.listen[0]", "127.0.0.1",
     '"HOST:PORT" or "[IPV6]:PORT"'),
    ("listen unbracketed v6", {"nbd": {"listen": ["127.0.0.1:1", "::1:10809"]}},
     "nbd.listen[1]", "::1:10809", '"[IPV6]:PORT"'),
    ("listen host name", {"nbd": {"listen": ["example.com:10809"]}}, "nbd.listen[0]",
     "example.com:10809", '"localhost"'),
    ("listen port too big", {"nbd": {"listen": ["127.0.0.1:65536"]}}, "nbd.listen[0]",
     "127.0.0.1:65536", "PORT 0..65535"),
    ("listen port not a number", {"nbd": {"listen": ["127.0.0.1:nbd"]}}, "nbd.listen[0]",
     "127.0.0.1:nbd", "PORT 0..65535"),
    ("listen bracketed v4", {"nbd": {"listen": ["[127.0.0.1]:1"]}}, "nbd.listen[0]",
     "[127.0.0.1]:1", '"[IPV6]:PORT"'),
    ("listen duplicate", {"nbd": {"listen": ["*:1", ":1"]}}, "nbd.listen[1]", ":1",
     "no duplicates"),
    ("listen not a list", {"nbd": {"listen": "127.0.0.1:10809"}}, "nbd.listen",
     "127.0.0.1:10809", "a list of"),
    ("unix socket relative", {"nbd": {"unix_socket": "nbd.sock"}}, "nbd.unix_socket",
     "nbd.sock", 'an absolute path of at most 107 bytes, or "" to disable'),
    ("unix socket too long", {"nbd": {"unix_socket": "/run/" + "x" * 103}}, "nbd.unix_socket",
     "/run/" + "x" * 103, "at most 107 bytes"),
    ("swap.directory escapes", {"swap": {"directory": "../elsewhere"}}, "swap.directory",
     "../elsewhere", "strictly inside daemon.state_dir"),
    ("swap.directory absolute outside", {"swap": {"directory": "/tmp/swap"}}, "swap.directory",
     "/tmp/swap", "strictly inside daemon.state_dir"),
    ("swap.directory is state_dir", {"swap": {"directory": "a/.."}}, "swap.directory",
     "a/..", "strictly inside daemon.state_dir"),
    ("swap size not block multiple", {"nbd": {"block_size_min": 65536,
                                              "block_size_preferred": 65536},
                                      "swap": {"size": MiB + 4096}},
     "swap.size", MiB + 4096, "a multiple of nbd.block_size_min"),
    ("priority 8", {"network": {"priority": 8}}, "network.priority", 8, "from 0 to 7"),
    ("priority negative", {"network": {"priority": -1}}, "network.priority", -1,
     "from 0 to 7"),
    ("dscp 64", {"network": {"dscp": 64}}, "network.dscp", 64, "from 0 to 63"),
    ("dscp as string", {"network": {"dscp": "EF"}}, "network.dscp", "EF", "from 0 to 63"),
    ("mark above 32 bits", {"network": {"mark": 2**32}}, "network.mark", 2**32,
     "from 0 to 4294967295"),
    ("mark negative", {"network": {"mark": -1}}, "network.mark", -1, "from 0 to 4294967295"),
    ("shape not bool", {"network": {"shape": "yes"}}, "network.shape", "yes", "true or false"),
    ("interface too long", {"network": {"interface": "a" * 16}}, "network.interface",
     "a" * 16, "1 to 15 ASCII characters"),
    ("interface alias", {"network": {"interface": "eth0:1"}}, "network.interface", "eth0:1",
     'no whitespace, "/" or ":"'),
    ("interface path", {"network": {"interface": "../eth0"}}, "network.interface", "../eth0",
     'no whitespace, "/" or ":"'),
    ("interface dot-dot", {"network": {"interface": ".."}}, "network.interface", "..",
     'not "." or ".."'),
    ("interface space", {"network": {"interface": "eth 0"}}, "network.interface", "eth 0",
     "no whitespace"),
    ("interface not ASCII", {"network": {"interface": "eth\u20110"}}, "network.interface",
     "eth\u20110", "ASCII"),
    ("shape without interface", {"network": {"shape": True}}, "network.interface", "",
     "an interface name when network.shape = true"),
    ("psi_enter above 100", {"pressure": {"psi_enter": 100.5}}, "pressure.psi_enter", 100.5,
     "a number from 0 to 100"),
    ("psi_exit negative", {"pressure": {"psi_exit": -1}}, "pressure.psi_exit", -1,
     "a number from 0 to 100"),
    ("psi_enter nan", {"pressure": {"psi_enter": float("nan")}}, "pressure.psi_enter",
     float("nan"),
     "a number from 0 to 100"),
    ("psi_enter bool", {"pressure": {"psi_enter": True}}, "pressure.psi_enter", True,
     "a number from 0 to 100"),
    ("psi_enter string", {"pressure": {"psi_enter": "10%"}}, "pressure.psi_enter", "10%",
     "a number from 0 to 100"),
    ("psi_exit equal to psi_enter", {"pressure": {"psi_enter": 10, "psi_exit": 10.0}},
     "pressure.psi_exit", 10.0, "pressure.psi_exit < pressure.psi_enter"),
    ("psi_exit above psi_enter", {"pressure": {"psi_exit": 20}}, "pressure.psi_exit", 20,
     "pressure.psi_exit < pressure.psi_enter"),
    ("available_exit equal", {"pressure": {"available_exit": "256MiB"}},
     "pressure.available_exit", "256MiB", "pressure.available_exit > pressure.available_enter"),
    ("available_enter above exit", {"pressure": {"available_enter": "1GiB"}},
     "pressure.available_exit", "512MiB",
     "pressure.available_exit > pressure.available_enter"),
    ("available_enter bad size", {"pressure": {"available_enter": "lots"}},
     "pressure.available_enter", "lots", "KiB"),
    ("interval zero", {"pressure": {"interval": "0s"}}, "pressure.interval", "0s", "> 0"),
    ("pressure enabled not bool", {"pressure": {"enabled": "true"}}, "pressure.enabled",
     "true", "true or false"),
    ("mlockall bad", {"protect": {"mlockall": "yes"}}, "protect.mlockall", "yes",
     '"required", "best-effort", "off"'),
    ("mlockall bool", {"protect": {"mlockall": True}}, "protect.mlockall", True,
     '"required", "best-effort", "off"'),
    ("io_flusher bad", {"protect": {"io_flusher": "on"}}, "protect.io_flusher", "on",
     '"required", "best-effort", "off"'),
    ("oom_score_adj below -1000", {"protect": {"oom_score_adj": -1001}},
     "protect.oom_score_adj", -1001, "from -1000 to 1000"),
    ("oom_score_adj above 1000", {"protect": {"oom_score_adj": 1001}},
     "protect.oom_score_adj", 1001, "from -1000 to 1000"),
    ("oom_score_adj float", {"protect": {"oom_score_adj": -1000.0}},
     "protect.oom_score_adj", -1000.0, "from -1000 to 1000"),
    ("unknown key in protect", {"protect": {"mlock": "off"}}, "protect.mlock", "off",
     "mlockall, oom_score_adj, io_flusher"),
    ("export name missing", with_exports({"backend": "memory", "size": 4096}),
     "exports[0].name", None, "1 to 255 bytes of UTF-8"),
    ("export name empty", with_exports({"name": "", "backend": "memory", "size": 4096}),
     "exports[0].name", "", "1 to 255 bytes of UTF-8"),
    ("export name too long", with_exports({"name": "é" * 128, "backend": "memory",
                                           "size": 4096}),
     "exports[0].name", "é" * 128, "1 to 255 bytes of UTF-8"),
    ("export name NUL", with_exports({"name": "a\0b", "backend": "memory", "size": 4096}),
     "exports[0].name", "a\0b", "no NUL"),
    ("export name reserved", with_exports({"name": "swap/node1", "backend": "memory",
                                           "size": 4096}),
     "exports[0].name", "swap/node1", 'not starting with "swap/"'),
    ("export name duplicate", with_exports({"name": "a", "backend": "memory", "size": 4096},
                                           {"name": "b", "backend": "memory", "size": 4096},
                                           {"name": "a", "backend": "memory", "size": 8192}),
     "exports[2].name", "a", "unique among exports"),
    ("export size missing", with_exports({"name": "a", "backend": "memory"}),
     "exports[0].size", None, "a size >= 4KiB"),
    ("export size too small", with_exports({"name": "a", "backend": "memory", "size": 512}),
     "exports[0].size", 512, "a size >= 4KiB, a multiple of 4096"),
    ("export size not page multiple", with_exports({"name": "a", "backend": "memory",
                                                    "size": "10000"}),
     "exports[0].size", "10000", "a multiple of 4096"),
    ("export size not block multiple", with_exports({"name": "a", "backend": "memory",
                                                     "size": "8KiB"},
                                                    nbd={"block_size_min": 65536,
                                                         "block_size_preferred": 65536}),
     "exports[0].size", "8KiB", "a multiple of nbd.block_size_min"),
    ("export bad backend", with_exports({"name": "a", "backend": "nvme", "size": 4096}),
     "exports[0].backend", "nvme", '"file", "memory"'),
    ("file export without path", with_exports({"name": "a", "size": 4096}),
     "exports[0].path", None, "relative to daemon.state_dir or absolute"),
    ("memory export with path", with_exports({"name": "a", "backend": "memory",
                                              "path": "a.img", "size": 4096}),
     "exports[0].path", "a.img", 'no path for backend "memory"'),
    ("export path duplicate", with_exports({"name": "a", "path": "x.img", "size": 4096},
                                           {"name": "b", "path": "/var/lib/netswapd/x.img",
                                            "size": 4096}),
     "exports[1].path", "/var/lib/netswapd/x.img", "unique among exports"),
    ("export path in swap dir", with_exports({"name": "a", "path": "swap/node1",
                                              "size": 4096}),
     "exports[0].path", "swap/node1", "outside swap.directory"),
    ("export read_only not bool", with_exports({"name": "a", "backend": "memory",
                                                "size": 4096, "read_only": "no"}),
     "exports[0].read_only", "no", "true or false"),
]


@pytest.mark.parametrize(
    "document, key, value, allowed", [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_error_names_key_value_and_allowed(document, key, value, allowed):
    error = error_of(document, source="test.toml")
    message = str(error)
    assert isinstance(error, ValueError)
    assert error.key == key
    assert message.startswith(f"test.toml: {key}")
    if value is not None:  # None: the key is missing, so there is no value to show
        assert f"{key} = {value!r}" in message
    assert "allowed: " in message and allowed in message, message


def test_unknown_key_suggests_the_near_miss():
    assert "did you mean 'max_request'?" in str(error_of({"nbd": {"max_requests": "1MiB"}}))
    assert "under [daemon]" in str(error_of({"workers": 4}))


@pytest.mark.parametrize("key", ["size", "normal_budget"])
def test_pool_smaller_than_max_request_names_both_keys(key):
    message = str(error_of({"pool": {key: "16MiB"}, "nbd": {"max_request": "32MiB"}}))
    assert f"pool.{key} = '16MiB'" in message
    assert "nbd.max_request = '32MiB'" in message


def test_reserve_request_above_max_request_names_both_keys():
    message = str(error_of({"swap": {"reserve_request": "1MiB"},
                            "nbd": {"max_request": "512KiB"}}))
    assert "swap.reserve_request = '1MiB'" in message
    assert "nbd.max_request = '512KiB'" in message


def test_host_bits_error_shows_the_network_and_the_host():
    message = str(error_of({"swap": {"node_networks": ["10.0.0.5/24"]}}))
    assert '"10.0.0.0/24"' in message and '"10.0.0.5/32"' in message


def test_shape_without_interface_names_both_keys():
    message = str(error_of({"network": {"shape": True, "interface": ""}}))
    assert "network.interface = ''" in message and "network.shape = true" in message


def test_shape_with_interface():
    network = config.parse({"network": {"shape": True, "interface": "eth1", "mark": 1}}).network
    assert (network.shape, network.interface) == (True, "eth1")


@pytest.mark.parametrize("enter, exit", [(10, 5), (10.0, 5.5), (100, 0), (0.5, 0)])
def test_psi_thresholds_accept_integers_and_floats(enter, exit):
    pressure = config.parse({"pressure": {"psi_enter": enter, "psi_exit": exit}}).pressure
    assert (pressure.psi_enter, pressure.psi_exit) == (enter, exit)
    assert type(pressure.psi_enter) is float and type(pressure.psi_exit) is float


@pytest.mark.parametrize("document, key, other", [
    ({"pressure": {"psi_enter": 5, "psi_exit": 7.5}}, "pressure.psi_exit = 7.5",
     "pressure.psi_enter = 5"),
    ({"pressure": {"available_enter": "1GiB", "available_exit": "512MiB"}},
     "pressure.available_exit = '512MiB'", "pressure.available_enter = '1GiB'"),
])
def test_pressure_hysteresis_errors_name_both_keys(document, key, other):
    message = str(error_of(document))
    assert key in message and other in message


def test_pressure_thresholds_are_checked_even_when_disabled():
    # So that enabling the monitor later cannot turn up a broken pair.
    assert error_of({"pressure": {"enabled": False, "psi_exit": 50}}).key == "pressure.psi_exit"


def test_error_survives_pickling():
    # Errors cross process boundaries (multiprocessing, logging queues) intact.
    error = error_of({"daemon": {"workers": 0}}, source="x.toml")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert (copy.key, copy.value, copy.source) == ("daemon.workers", 0, "x.toml")
    missing = error_of(with_exports({"backend": "memory", "size": 4096}))
    assert str(pickle.loads(pickle.dumps(missing))) == str(missing)  # no "= <absent>"


def test_huge_values_are_abbreviated_in_errors():
    message = str(error_of({"daemon": {"log_level": "x" * 10_000}}))
    assert len(message) < 500


# ---------------------------------------------------------------------------------------------
# load(): file-level errors name the file.


def test_syntax_error_names_file_line_and_column(tmp_path):
    config_file = tmp_path / "netswapd.toml"
    config_file.write_text('[daemon]\nworkers = 4\nlog_level = \n')
    with pytest.raises(ConfigError) as caught:
        config.load(config_file)
    message = str(caught.value)
    assert message.startswith(f"{config_file}: TOML syntax error")
    assert "line 3" in message and "column" in message


def test_validation_error_names_file(tmp_path):
    config_file = tmp_path / "netswapd.toml"
    config_file.write_text('[[exports]]\nname = "swap/x"\nbackend = "memory"\nsize = 4096\n')
    with pytest.raises(ConfigError) as caught:
        config.load(config_file)
    assert str(caught.value).startswith(f"{config_file}: exports[0].name = 'swap/x'")
    assert caught.value.source == str(config_file)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        config.load(tmp_path / "absent.toml")
    assert str(tmp_path / "absent.toml") in str(caught.value)
    assert "cannot read" in str(caught.value)


def test_non_utf8_file_is_a_config_error(tmp_path):
    config_file = tmp_path / "latin1.toml"
    config_file.write_bytes(b'[swap]\ndescription = "caf\xe9"\n')
    with pytest.raises(ConfigError) as caught:
        config.load(config_file)
    assert str(config_file) in str(caught.value) and "UTF-8" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# The embedded default config (config/netswapd.toml).

DEFAULT_CONFIG = REPO / "config" / "netswapd.toml"


def test_default_config_loads_with_the_documented_values():
    cfg = config.load(DEFAULT_CONFIG)
    assert cfg.daemon.state_dir == Path("/var/lib/netswapd")
    assert cfg.pool == DEFAULT_POOL
    assert cfg.nbd.listen == (("127.0.0.1", 10809), ("::1", 10809))
    assert cfg.nbd.unix_socket == Path("/run/netswapd/nbd.sock")
    assert (cfg.swap.enabled, cfg.swap.size, cfg.swap.backend) == (True, GiB, "file")
    assert cfg.swap.directory == Path("/var/lib/netswapd/swap")
    scratch, ram = cfg.exports
    assert (scratch.name, scratch.backend, scratch.path, scratch.size, scratch.read_only) == (
        "scratch", "file", Path("/var/lib/netswapd/scratch.img"), GiB, False)
    assert scratch.description
    assert ram == config.ExportConfig("ram", "memory", None, 256 * MiB, False, "remote RAM", EVERYONE, None, False)
    assert cfg.source == str(DEFAULT_CONFIG)


def test_default_config_spells_out_every_default():
    # Deleting any line of the default file must change nothing (exports aside: they are
    # examples), so the file is an honest description of what an empty file means.
    cfg, defaults = config.load(DEFAULT_CONFIG), config.parse({})
    for section in ("daemon", "pool", "nbd", "swap", "network", "pressure", "protect"):
        assert getattr(cfg, section) == getattr(defaults, section), section


def test_default_config_sets_every_key_with_a_comment():
    text = DEFAULT_CONFIG.read_text()
    document = tomllib.loads(text)
    present = {f"{section}.{key}" for section, table in document.items()
               if section != "exports" for key in table}
    present |= {f"exports[].{key}" for export in document["exports"] for key in export}
    assert present == set(config.KEYS)

    # Every key up to the first export's last line (which documents the export keys) sits
    # directly under a comment saying why an operator would change it; later exports are
    # examples and may be terse.
    second_export = [m.start() for m in re.finditer(r"^\[\[exports\]\]", text, re.M)][1]
    lines = text[:second_export].splitlines()
    assert any(line.startswith("read_only =") for line in lines)  # the cut kept export 1
    for above, line in zip(lines, lines[1:]):
        if re.match(r"[a-z_]+ *=", line):
            assert above.startswith("#"), f"no comment above {line!r}"


# ---------------------------------------------------------------------------------------------
# The configuration reference (docs/config-reference.md) is generated from the schema.

DOCS = REPO / "docs" / "config-reference.md"


def test_reference_table_is_current():
    # Regenerate with: PYTHONPATH=daemon python3 -m netswap.config
    assert config.reference_table() in DOCS.read_text()


def test_reference_table_has_one_row_per_key():
    rows = [line for line in config.reference_table().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(config.KEYS)


def test_metrics_listen_defaults_and_may_be_empty():
    assert config.parse({}).metrics.listen == (("127.0.0.1", 9810),)
    assert config.parse({"metrics": {"listen": []}}).metrics.listen == ()
    with pytest.raises(config.ConfigError) as err:
        config.parse({"metrics": {"listen": ["127.0.0.1:99999"]}})
    assert "metrics.listen" in str(err.value)


def test_shaping_needs_a_mark():
    with pytest.raises(config.ConfigError) as err:
        config.parse({"network": {"shape": True, "interface": "eth0"}})
    assert "network.mark" in str(err.value) and "network.shape" in str(err.value)
    assert config.parse({"network": {"shape": True, "interface": "eth0", "mark": 7}}).network.mark == 7


# ---------------------------------------------------------------------------------------------
# Keys that moved to [swap]: the old name still reads, with a warning naming the new one.

NODES = {"alpha": ["10.0.0.0/24"], "beta": ["fd00::/64", "10.0.1.7"]}


def test_old_nfs_nodes_is_read_as_swap_nodes_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="netswap.config"):
        cfg = config.parse({"nfs": {"nodes": NODES}}, source="netswapd.toml")
    assert cfg.swap == config.parse({"swap": {"nodes": NODES}}).swap
    assert cfg.swap.node_of("10.0.0.9") == "alpha"
    (record,) = caplog.records
    message = record.getMessage()
    assert "netswapd.toml" in message and "nfs.nodes" in message and "swap.nodes" in message


def test_swap_nodes_alone_gives_no_warning(caplog):
    with caplog.at_level("WARNING", logger="netswap.config"):
        config.parse({"swap": {"nodes": NODES}})
    assert caplog.records == []


def test_old_and_new_name_with_one_value_is_read_with_a_warning(caplog):
    # Equal once read: two spellings of one network are one value.
    old = {"alpha": ["10.0.0.0/255.255.255.0"], "beta": ["fd00::/64", "10.0.1.7"]}
    with caplog.at_level("WARNING", logger="netswap.config"):
        cfg = config.parse({"swap": {"nodes": NODES}, "nfs": {"nodes": old}})
    assert cfg.swap.nodes == config.parse({"swap": {"nodes": NODES}}).swap.nodes
    assert "swap.nodes" in caplog.text


def test_old_and_new_name_with_different_values_is_an_error():
    error = error_of({"swap": {"nodes": NODES}, "nfs": {"nodes": {"alpha": ["10.0.0.0/24"]}}},
                     source="netswapd.toml")
    assert error.key == "nfs.nodes"
    assert "swap.nodes" in error.problem and "swap.nodes" in error.allowed
    assert str(error).startswith("netswapd.toml: nfs.nodes = ")


def test_old_name_with_a_bad_value_is_an_error_naming_the_old_key():
    error = error_of({"nfs": {"nodes": {"alpha": ["10.0.0.5/24"]}}})
    assert error.key == "nfs.nodes.alpha[0]" and "host bits" in error.problem


def test_nodes_by_address_and_by_source_port():
    cfg = config.parse({"swap": {"nodes": NODES}})
    assert cfg.swap.node_of("10.0.1.7") == "beta"
    assert cfg.swap.node_of("::ffff:10.0.0.3") == "alpha"  # an IPv4 client on a v6 socket
    assert cfg.swap.node_of("10.0.2.1") is None
    assert cfg.nfs.node_port_allowed(1023) and cfg.nfs.node_port_allowed(None)
    assert not cfg.nfs.node_port_allowed(1024)
    assert config.parse({"nfs": {"node_ports": "any"}}).nfs.node_port_allowed(40000)


def test_nfs_record_timeout_defaults_to_30s_and_refuses_what_is_no_duration():
    assert config.parse({}).nfs.record_timeout == 30.0
    assert config.parse({"nfs": {"record_timeout": "500ms"}}).nfs.record_timeout == 0.5
    for value in (0, "30", "soon"):
        error = error_of({"nfs": {"record_timeout": value}})
        assert error.key == "nfs.record_timeout" and error.value == value, error
        assert "seconds > 0" in error.allowed
    error = error_of({"nfs": {"record_timout": "30s"}})  # a typo is no key
    assert "record_timout" in str(error) and "record_timeout" in str(error)
