"""netswap-node's unit (systemd/netswap-node.service), its example config (config/node.toml)
and its configuration module (netswap.node.config): file, command line, defaults, and every
error naming key, value and what is allowed, as netswapd's do."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from netswap.config import ConfigError
from netswap.node import config as node_config
from netswap.node.config import (
    NODE_KEYS,
    NodeConfig,
    add_run_arguments,
    format_server,
    load_node_config,
    overrides_from,
    parse_node_config,
)
from support.daemon import REPO
from support.units import timespan_seconds, unit_settings

UNIT = REPO / "systemd" / "netswap-node.service"
EXAMPLE = REPO / "config" / "node.toml"
BINARY = "/usr/local/bin/netswap-node"


@pytest.fixture(autouse=True)
def hostname(monkeypatch):
    """A fixed host name, so that the default node.name does not depend on the machine."""
    monkeypatch.setattr(node_config.socket, "gethostname", lambda: "Node7.cluster.example")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def error_of(document=None, overrides=None, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_node_config({} if document is None else document, overrides, **kwargs)
    return caught.value


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The unit.


def settings(section: str) -> dict[str, list[str]]:
    return {key: values for (where, key), values in unit_settings(UNIT.read_text()).items()
            if where == section}


def test_unit_passes_systemd_analyze_verify(tmp_path):
    """Every key known to this systemd (252) and valid. verify insists that ExecStart='s
    program exists and is executable, and netswap-node is not installed here by make install:
    a stand-in takes its path, nothing else changes. Any output at all fails the test (an
    unknown key is only a warning)."""
    text = UNIT.read_text()
    assert text.count(BINARY) == 1
    stand_in = tmp_path / "netswap-node"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    copy = tmp_path / "netswap-node.service"
    copy.write_text(text.replace(BINARY, str(stand_in)))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_unit_orders_swap_early_and_stops_it_last():
    unit, install = settings("Unit"), settings("Install")
    assert unit["DefaultDependencies"] == ["no"]
    assert unit["Wants"] == ["network-online.target"]
    assert unit["After"] == ["network-online.target"]
    assert set(unit["Before"]) == {"swap.target", "shutdown.target"}
    assert unit["Conflicts"] == ["shutdown.target"]
    assert install["WantedBy"] == ["swap.target"]


def test_unit_service_settings():
    service = settings("Service")
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["ExecStart"] == [f"{BINARY} run --config {node_config.DEFAULT_CONFIG_PATH}"]
    assert "ExecStop" not in service  # SIGTERM: the agent's swapoff, then disconnect
    assert service["Restart"] == ["on-failure"]
    # 4: the device failed (server away past dead_conn_timeout); 5: the swap area is gone.
    assert set(service["RestartPreventExitStatus"][0].split()) == {"2", "4", "5"}
    assert service["OOMScoreAdjust"] == ["-1000"]
    assert service["LimitMEMLOCK"] == ["infinity"]
    caps = {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_IPC_LOCK", "CAP_SYS_RESOURCE"}
    assert set(service["CapabilityBoundingSet"][0].split()) == caps
    assert set(service["AmbientCapabilities"][0].split()) == caps


def test_unit_never_kills_the_agent_during_swapoff():
    """swapoff reads every swapped-out page back: the stop timeout outlasts a server away for
    the whole default dead_conn_timeout, and even past it nothing is SIGKILLed."""
    service = settings("Service")
    default = NodeConfig(servers=(("192.0.2.1", 10809),), name="n").dead_conn_timeout
    assert timespan_seconds(service["TimeoutStopSec"][0]) >= default + 10 * 60
    assert service["SendSIGKILL"] == ["no"]
    assert service.get("KillMode", ["control-group"]) == ["control-group"]
    # No RuntimeDirectory=: systemd would remove the failed agent's state at stop.
    assert "RuntimeDirectory" not in service


# ---------------------------------------------------------------------------------------------
# Defaults, file and command line.


def test_defaults():
    config = parse_node_config({"node": {"server": ["10.0.0.1"]}})
    assert config == NodeConfig(
        servers=(("10.0.0.1", 10809),), name="node7", protocol="nbd", connections=1,
        dead_conn_timeout=600.0, io_timeout=10.0, priority=100,
        state_dir=Path("/run/netswap-node"), log="stderr", min_free_kbytes="auto",
        nfs_mount=Path("/mnt/swap"), nfs_port=2049, mount_port=20048, mirror=False)
    # The dataclass's own defaults are the schema's, so code building one directly (tests)
    # gets what the agent would.
    assert NodeConfig(servers=config.servers, name="node7") == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.connections = 2


def test_a_file_with_every_key(tmp_path):
    path = write(tmp_path, """
        [node]
        server = ["swap1.example", "10.0.0.2"]
        name = "rack3-n12"
        protocol = "nbd"
        connections = 4
        dead_conn_timeout = "1h"
        io_timeout = 30
        priority = -1
        state_dir = "/run/ns//node/"
        log = "kmsg"
        min_free_kbytes = 65536
        nfs_mount = "/mnt/netswap"
        nfs_port = 3049
        mount_port = 30048
        mirror = true
    """)
    config = load_node_config(path, {})
    assert config == NodeConfig(
        servers=(("swap1.example", 10809), ("10.0.0.2", 10809)), name="rack3-n12",
        protocol="nbd", connections=4, dead_conn_timeout=3600.0, io_timeout=30.0,
        priority=-1, state_dir=Path("/run/ns/node"), log="kmsg", min_free_kbytes=65536,
        nfs_mount=Path("/mnt/netswap"), nfs_port=3049, mount_port=30048, mirror=True)


def test_mirror_defaults_to_a_short_dead_connection_timeout_and_an_explicit_one_wins():
    mirrored = parse_node_config({"node": {"server": ["10.0.0.1", "10.0.0.2"], "name": "n1",
                                           "mirror": True}})
    assert mirrored.mirror and mirrored.dead_conn_timeout == 5.0
    plain = parse_node_config({"node": {"server": ["10.0.0.1"], "name": "n1"}})
    assert not plain.mirror and plain.dead_conn_timeout == 600.0
    given = parse_node_config({"node": {"server": ["10.0.0.1", "10.0.0.2"], "name": "n1",
                                        "mirror": True, "dead_conn_timeout": "30s"}})
    assert given.dead_conn_timeout == 30.0
    args = parse_args("--server", "10.0.0.1", "--server", "10.0.0.2", "--mirror")
    assert overrides_from(args)["mirror"] is True
    assert load_node_config(None, overrides_from(args)).mirror


@pytest.mark.parametrize("node, problem", [
    ({"server": ["10.0.0.1"], "mirror": True}, "needs at least two servers"),
    ({"server": ["10.0.0.1", "10.0.0.2"], "mirror": True, "protocol": "nfs"},
     'needs node.protocol = "nbd"'),
])
def test_a_mirror_it_cannot_build_is_a_config_error_naming_the_key(node, problem):
    with pytest.raises(ConfigError) as raised:
        parse_node_config({"node": dict(node, name="n1")})
    assert "node.mirror = True" in str(raised.value) and problem in str(raised.value)


def test_command_line_wins_over_the_file(tmp_path):
    path = write(tmp_path, """
        [node]
        server = ["10.0.0.1", "10.0.0.2"]
        name = "from-file"
        connections = 4
        priority = 5
        io_timeout = "20s"
    """)
    args = parse_args("--config", str(path), "--server", "[fd00::9]:10810",
                      "--server", "10.0.0.3", "--connections", "2", "--io-timeout", "7",
                      "--dead-conn-timeout", "2m", "--log", "kmsg")
    overrides = overrides_from(args)
    # Only what was given, as it would be written in the file.
    assert overrides == {"server": ["[fd00::9]:10810", "10.0.0.3"], "connections": 2,
                         "io_timeout": 7, "dead_conn_timeout": "2m", "log": "kmsg"}
    config = load_node_config(args.config, overrides)
    # --server replaces the file's list; what the command line did not name, the file keeps.
    assert config.servers == (("fd00::9", 10810), ("10.0.0.3", 10809))
    assert (config.name, config.connections, config.priority) == ("from-file", 2, 5)
    assert (config.io_timeout, config.dead_conn_timeout, config.log) == (7.0, 120.0, "kmsg")


def test_every_run_option_overrides_its_key(tmp_path):
    args = parse_args("--server", "s", "--name", "n1", "--protocol", "nfs",
                      "--connections", "3", "--dead-conn-timeout", "90", "--io-timeout", "1.0",
                      "--priority", "-1", "--state-dir", "/run/x", "--log", "stderr")
    assert overrides_from(args) == {
        "server": ["s"], "name": "n1", "protocol": "nfs", "connections": 3,
        "dead_conn_timeout": 90, "io_timeout": 1.0, "priority": -1, "state_dir": "/run/x",
        "log": "stderr"}
    config = load_node_config(None, overrides_from(args))
    assert config.servers == (("s", 2049),) and config.state_dir == Path("/run/x")
    assert overrides_from(parse_args()) == {}


def test_argparse_refuses_what_it_can(capsys):
    for argv in (["--protocol", "iscsi"], ["--log", "syslog"], ["--connections", "two"]):
        with pytest.raises(SystemExit):
            parse_args(*argv)


def test_default_config_file_is_used_only_if_it_exists(tmp_path, monkeypatch):
    default = tmp_path / "etc-node.toml"
    monkeypatch.setattr(node_config, "DEFAULT_CONFIG_PATH", default)
    assert parse_args().config is None  # absent: no file, command line only
    assert load_node_config(parse_args("--server", "h").config,
                            overrides_from(parse_args("--server", "h"))).servers == (("h", 10809),)
    default.write_text('[node]\nserver = ["10.0.0.1"]\n')
    args = parse_args()
    assert Path(args.config) == default
    assert load_node_config(args.config, overrides_from(args)).servers == (("10.0.0.1", 10809),)
    # Named explicitly, a missing file is an error.
    with pytest.raises(ConfigError, match="cannot read"):
        load_node_config(parse_args("--config", str(tmp_path / "none.toml")).config, {})


def test_file_level_errors(tmp_path):
    error = pytest.raises(ConfigError, load_node_config, write(tmp_path, "[node\n"), {}).value
    assert str(error).startswith(f"{tmp_path / 'node.toml'}: TOML syntax error")
    (tmp_path / "node.toml").write_bytes(b'[node]\nname = "\xff"\n')
    assert "is not UTF-8" in str(pytest.raises(ConfigError, load_node_config,
                                               tmp_path / "node.toml", {}).value)


# ---------------------------------------------------------------------------------------------
# Errors: key, value, what is allowed; and where the value came from.

SERVER = {"server": ["10.0.0.1"]}

ERROR_CASES = [
    # (key, value, problem, what the allowed part says)
    ("connections", 99, "is out of range", "an integer from 1 to 16"),
    ("connections", 0, "is out of range", "an integer from 1 to 16"),
    ("connections", "4", "is a string, not an integer", "an integer from 1 to 16"),
    ("connections", True, "is a boolean, not an integer", "an integer from 1 to 16"),
    ("protocol", "iscsi", "is not one of the choices", '"nbd", "nfs"'),
    ("log", "syslog", "is not one of the choices", '"stderr", "kmsg"'),
    ("priority", -2, "is out of range", "an integer from -1 to 32767"),
    ("priority", 32768, "is out of range", "an integer from -1 to 32767"),
    ("dead_conn_timeout", 0, "is not a finite duration > 0", "a whole number of seconds"),
    ("dead_conn_timeout", "10", "has no unit", "a whole number of seconds"),
    ("dead_conn_timeout", "10 minutes", "has unknown unit 'minutes'", "with unit ms, s, m, h"),
    ("dead_conn_timeout", "1500ms", "not a whole number of seconds", "from 1 to 86400"),
    ("dead_conn_timeout", "25h", "out of range", "from 1 to 86400"),
    ("io_timeout", 0.5, "not a whole number of seconds", "a whole number of seconds"),
    ("io_timeout", -1, "is not a finite duration > 0", "a whole number of seconds"),
    ("io_timeout", [10], "is an array, not a duration", "a whole number of seconds"),
    ("name", "Node1", "is not a swap node name", "1 to 63 characters of a-z, 0-9"),
    ("name", "-node", "is not a swap node name", 'not starting or ending with "-"'),
    ("name", "n" * 64, "is not a swap node name", "1 to 63 characters"),
    ("name", "", "is not a swap node name", "1 to 63 characters"),
    ("name", 7, "is an integer, not a string", "a swap node name"),
    ("state_dir", "run/netswap-node", "is not an absolute path", "an absolute path"),
    ("state_dir", "", "is empty", "an absolute path"),
    ("nfs_mount", "mnt", "is not an absolute path", "an absolute path"),
    ("min_free_kbytes", -1, "is out of range", "or an integer from 0 to 2147483647"),
    ("min_free_kbytes", "64MiB", 'is a string, not "auto" or an integer', '"auto"'),
    ("nfs_port", 0, "is out of range", "an integer from 1 to 65535"),
    ("mount_port", 65536, "is out of range", "an integer from 1 to 65535"),
    ("mirror", "yes", "is a string, not a boolean", "true or false"),
    ("server", "10.0.0.1", "is a string, not an array", 'a non-empty list of "HOST"'),
]


@pytest.mark.parametrize("key, value, problem, allowed", ERROR_CASES,
                         ids=[f"{case[0]}={case[1]!r}"[:40] for case in ERROR_CASES])
def test_error_in_the_file_names_key_value_and_allowed(key, value, problem, allowed):
    error = error_of({"node": {**SERVER, key: value}}, source="node.toml")
    assert error.key == f"node.{key}" and error.source == "node.toml"
    message = str(error)
    assert message.startswith(f"node.toml: node.{key} = {value!r}: "), message
    assert problem in message and "; allowed: " in message and allowed in message, message


@pytest.mark.parametrize("key, value, problem, allowed", [
    case for case in ERROR_CASES if case[0] in ("connections", "priority", "name", "state_dir")])
def test_error_on_the_command_line_says_so(key, value, problem, allowed):
    error = error_of({"node": SERVER}, {key: value}, source="node.toml")
    assert str(error).startswith(f"command line: node.{key} = {value!r}: {problem}")
    assert allowed in str(error)


def test_connections_message_has_netswapds_form():
    assert str(error_of({"node": {**SERVER, "connections": 99}})) == (
        "<string>: node.connections = 99: is out of range; allowed: an integer from 1 to 16")


def test_missing_server():
    for document, source in (({}, "node.toml"), ({"node": {"server": []}}, "node.toml")):
        error = error_of(document, source=source)
        assert str(error).startswith("node.toml: node.server: at least one server is required")
        assert "--server" in str(error)
    error = pytest.raises(ConfigError, load_node_config, None, {}).value
    assert "node.server: at least one server is required" in str(error)


def test_unknown_keys_and_tables():
    error = error_of({"node": {**SERVER, "conections": 2}})
    assert error.key == "node.conections" and "did you mean 'connections'?" in str(error)
    assert "unknown key" in str(error_of({"node": {**SERVER, "port": 10809}}))
    # A key above the [node] header, a stray table, a netswapd config.
    assert "did you mean it under [node]?" in str(error_of({"priority": 5, "node": SERVER}))
    error = error_of({"node": SERVER, "agent": {"x": 1}})
    assert error.key == "[agent]" and "unknown table" in str(error)
    assert "did you mean [node]?" in str(error_of({"nodes": SERVER}))
    assert "netswapd" in str(error_of({"daemon": {"workers": 8}}))
    assert "netswapd" in str(error_of({"exports": [{"name": "a"}]}))
    assert "unknown key" in str(error_of({"node": SERVER, "verbose": True}))
    assert "is not a table" in str(error_of({"node": ["10.0.0.1"]}))
    # An override with no key behind it is a caller's mistake, still named.
    error = error_of({"node": SERVER}, {"servers": ["x"]})
    assert error.source == "command line" and "did you mean 'server'?" in str(error)


def test_overrides_of_none_are_not_given():
    config = parse_node_config({"node": {**SERVER, "priority": 3}}, {"priority": None})
    assert config.priority == 3


# ---------------------------------------------------------------------------------------------
# Servers.


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.1", ("10.0.0.1", 10809)),
    ("10.0.0.1:10810", ("10.0.0.1", 10810)),
    ("Swap-1.Cluster.example", ("swap-1.cluster.example", 10809)),
    ("localhost:1", ("localhost", 1)),
    ("[fd00::1]", ("fd00::1", 10809)),
    ("[fd00::1]:10810", ("fd00::1", 10810)),
    ("[FD00:0:0::1]:65535", ("fd00::1", 65535)),  # canonical spelling
    ("[::ffff:10.0.0.1]", ("::ffff:a00:1", 10809)),
    ("[fe80::1%eth0]:10809", ("fe80::1%eth0", 10809)),  # link-local, with its interface
])
def test_server_parsing(text, expected):
    config = parse_node_config({"node": {"server": [text]}})
    assert config.servers == (expected,)


@pytest.mark.parametrize("text, problem", [
    ("fd00::1", 'is an IPv6 address without brackets (write "[fd00::1]"'),
    ("fd00::1:10809", 'is an IPv6 address and port without brackets (write "[fd00::1]:10809")'),
    ("[fd00::1", 'has no closing "]"'),
    ("[10.0.0.1]:10809", "'10.0.0.1' is not an IPv6 address"),
    ("[fd00::1]10809", "after \"]\", not \":PORT\""),
    ("[fd00::1]:", "port '' is not 1..65535"),
    ("10.0.0.1:0", "port '0' is not 1..65535"),
    ("10.0.0.1:65536", "port '65536' is not 1..65535"),
    ("10.0.0.1:http", "port 'http' is not 1..65535"),
    ("10.0.0.300", "'10.0.0.300' is not an IPv4 address or a host name"),
    ("swap_1", "is not an IPv4 address or a host name"),
    ("-swap", "is not an IPv4 address or a host name"),
    ("\u212aswap", "is not an IPv4 address or a host name"),  # KELVIN SIGN, lower() "k"
    ("", "'' is not an IPv4 address or a host name"),
    (":10809", "'' is not an IPv4 address or a host name"),
    ("a:b:c", 'is not "HOST" or "HOST:PORT"'),
])
def test_server_errors_name_the_entry(text, problem):
    error = error_of({"node": {"server": ["10.0.0.9", text]}}, source="node.toml")
    assert error.key == "node.server[1]"
    assert str(error).startswith(f"node.toml: node.server[1] = {text!r}: "), str(error)
    assert problem in str(error) and "; allowed: " in str(error)


def test_server_duplicates_are_refused_after_parsing():
    error = error_of({"node": {"server": ["10.0.0.1", "10.0.0.1:10809"]}})
    assert error.key == "node.server[1]" and "is listed twice" in str(error)
    error = error_of({"node": {"server": ["[fd00::1]", "[fd00:0::1]:10809"]}})
    assert "is listed twice" in str(error)
    assert error_of({"node": {"server": ["10.0.0.1", 5]}}).key == "node.server[1]"


def test_nfs_servers_take_the_nfs_port_and_no_port_of_their_own():
    config = parse_node_config({"node": {"server": ["10.0.0.1", "[fd00::1]"],
                                         "protocol": "nfs", "nfs_port": 2050}})
    assert config.servers == (("10.0.0.1", 2050), ("fd00::1", 2050))
    error = error_of({"node": {"server": ["10.0.0.1:2049"], "protocol": "nfs"}})
    assert 'has a port, but node.protocol = "nfs"' in str(error)
    # The protocol from the command line decides about the file's servers too.
    error = error_of({"node": {"server": ["10.0.0.1:10809"]}}, {"protocol": "nfs"})
    assert error.key == "node.server[0]"


def test_format_server():
    assert format_server(("10.0.0.1", 10809)) == "10.0.0.1:10809"
    assert format_server(("fd00::1", 10809)) == "[fd00::1]:10809"
    assert format_server(("swap.example", 1)) == "swap.example:1"


# ---------------------------------------------------------------------------------------------
# Durations.


@pytest.mark.parametrize("value, seconds", [
    ("10m", 600.0), ("10s", 10.0), ("1h", 3600.0), ("2000ms", 2.0), ("1.5m", 90.0),
    (90, 90.0), (90.0, 90.0), ("86400s", 86400.0), (1, 1.0),
])
def test_duration_parsing(value, seconds):
    config = parse_node_config({"node": {**SERVER, "dead_conn_timeout": value,
                                         "io_timeout": value}})
    assert config.dead_conn_timeout == seconds == config.io_timeout
    assert isinstance(config.io_timeout, float)


@pytest.mark.parametrize("typed, seconds", [("600", 600.0), ("1.0", 1.0), ("10m", 600.0),
                                            ("30s", 30.0)])
def test_duration_on_the_command_line_may_be_bare_seconds(typed, seconds):
    overrides = overrides_from(parse_args("--dead-conn-timeout", typed))
    assert parse_node_config({"node": SERVER}, overrides).dead_conn_timeout == seconds


# ---------------------------------------------------------------------------------------------
# The node name.


def test_name_defaults_to_the_short_host_name_in_lower_case(monkeypatch):
    assert parse_node_config({"node": SERVER}).name == "node7"
    monkeypatch.setattr(node_config.socket, "gethostname", lambda: "(none)")
    error = error_of({"node": SERVER})
    assert error.key == "node.name" and error.value == "(none)"
    assert "set node.name or --name" in str(error) and "allowed: a swap node name" in str(error)
    # A name given is not checked against the host's.
    assert parse_node_config({"node": {**SERVER, "name": "n1"}}).name == "n1"


@pytest.mark.parametrize("name", ["a", "n1", "rack-3-node-12", "0", "a" * 63, "A", "a-",
                                  "a_b", "a.b", "a" * 64, "é", "node\n", ""])
def test_name_rule_is_the_servers(name):
    """The server's rule for the swap/<node> export names (exports/registry.py), not another."""
    from netswap.swap.nodes import valid_node

    try:
        parse_node_config({"node": {**SERVER, "name": name}})
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted == valid_node(name)


# ---------------------------------------------------------------------------------------------
# config/node.toml


def test_example_config_shows_every_key_at_its_default(tmp_path):
    """Every key is in the example, commented out; uncommented unchanged (with a server),
    they give the defaults, and the file as shipped needs only a server."""
    text = EXAMPLE.read_text()
    commented = re.findall(r"^#(\w+) = (.*)$", text, re.M)
    assert [f"node.{key}" for key, _ in commented] == list(NODE_KEYS)
    uncommented = re.sub(r"^#(\w+ = )", r"\1", text, flags=re.M)
    assert "\n[node]\n" in uncommented
    config = load_node_config(write(tmp_path, uncommented), {})
    assert config.servers == (("192.0.2.10", 10809), ("2001:db8::10", 10809))
    assert config.name == "node1"  # the example's; the default is the host's name
    expected = parse_node_config({"node": {"server": ["192.0.2.10", "[2001:db8::10]:10809"],
                                           "name": "node1"}})
    assert config == expected
    assert load_node_config(EXAMPLE, {"server": ["h"]}) == NodeConfig(
        servers=(("h", 10809),), name="node7")
