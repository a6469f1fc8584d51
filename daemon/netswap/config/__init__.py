"""netswapd configuration: TOML in, typed, validated, frozen objects out.

    errors.py     ConfigError: names the file, the full key path, the value and what is allowed
    kinds.py      value kinds (sizes, durations, networks, paths, ...): check and convert a value
    schema.py     every key described once, as a field of the section object that holds it
    rules.py      rules between keys, and the builders that turn a checked table into a section
    document.py   load(path) and parse(mapping): the whole file, section by section
    reference.py  the Markdown reference of every key (`python3 -m netswap.config`)

Public API:
    load(path) -> Config                     read and validate a TOML file
    parse(mapping, source="<string>") -> Config
    parse_size(value, key) -> int            "64MiB" -> 67108864
    parse_duration(value, key) -> float      "500ms" -> 0.5
    format_size(n) -> str                    33554432 -> "32MiB"
    ConfigError                              ValueError: .key .value .problem .allowed .source
    Config, DaemonConfig, PoolConfig, NbdConfig, SwapConfig, NetworkConfig, PressureConfig,
    ProtectConfig, NfsConfig, MetricsConfig, ExportConfig
    KEYS, reference_table()                  the documented key paths; the Markdown reference
"""

from .document import load, parse
from .errors import ConfigError
from .kinds import DURATION_SYNTAX, SIZE_SYNTAX, format_size, parse_duration, parse_size
# The swap node name rule (swap/nodes.py), as tests/daemon/test_access.py reads it.
from .kinds import NODE_NAME_RE as _NODE_NAME_RE  # noqa: F401
from .reference import reference_table
from .schema import (
    KEYS,
    Config,
    DaemonConfig,
    ExportConfig,
    MetricsConfig,
    NbdConfig,
    NetworkConfig,
    NfsConfig,
    PoolConfig,
    PressureConfig,
    ProtectConfig,
    SwapConfig,
)

__all__ = [
    "DURATION_SYNTAX",
    "KEYS",
    "SIZE_SYNTAX",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "ExportConfig",
    "MetricsConfig",
    "NbdConfig",
    "NetworkConfig",
    "NfsConfig",
    "PoolConfig",
    "PressureConfig",
    "ProtectConfig",
    "SwapConfig",
    "format_size",
    "load",
    "parse",
    "parse_duration",
    "parse_size",
    "reference_table",
]
