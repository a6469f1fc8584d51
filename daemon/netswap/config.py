"""netswapd configuration: TOML in, typed, validated, frozen objects out.

Every key is described exactly once, in the schema tables below (_DAEMON, _POOL, _NBD, _SWAP,
_NETWORK, _PRESSURE, _PROTECT, _EXPORT): its kind (which type-checks, converts and
range-checks the raw TOML value), its default and its meaning. The validator, the error
messages and the configuration reference (the README's configuration reference, printed by
`python3 -m netswap.config`) are all driven by those tables, so they cannot drift apart.
Rules that relate two keys (pool.normal_budget >= nbd.max_request, paths inside
daemon.state_dir, unique export names) cannot be stated per key; they live in the _build_*
functions, each next to the section it completes.

Every problem is a ConfigError naming the file, the full key path, the offending value and
what would be accepted, so an operator can fix the file without reading this code.

Public API:
    load(path) -> Config                     read and validate a TOML file
    parse(mapping, source="<string>") -> Config
    parse_size(value, key) -> int            "64MiB" -> 67108864
    parse_duration(value, key) -> float      "500ms" -> 0.5
    ConfigError                              ValueError: .key .value .problem .allowed .source
    Config, DaemonConfig, PoolConfig, NbdConfig, SwapConfig, NetworkConfig, PressureConfig,
    ProtectConfig, ExportConfig
    KEYS, reference_table()                  the documented key paths; the Markdown reference
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import operator
import os
import re
import reprlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from decimal import Decimal
from pathlib import Path

__all__ = [
    "DURATION_SYNTAX",
    "KEYS",
    "SIZE_SYNTAX",
    "Config",
    "MetricsConfig",
    "NfsConfig",
    "ConfigError",
    "DaemonConfig",
    "ExportConfig",
    "NbdConfig",
    "NetworkConfig",
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

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


class _Absent:
    """Marks "no value": a key missing from the file, or an error about no particular value."""

    def __repr__(self) -> str:
        return "<absent>"

    def __reduce__(self):
        # Unpickle to the one instance, so that `value is _ABSENT` holds in a ConfigError
        # that crossed a process boundary.
        return "_ABSENT"


_ABSENT = _Absent()

# Values are echoed into error messages and logs; a misplaced table must not dump itself whole.
_value_repr = reprlib.Repr()
_value_repr.maxstring = 160
_value_repr.maxother = 160


class ConfigError(ValueError):
    """A configuration problem, located precisely enough for an operator to fix it.

    key      full key path, e.g. "exports[1].size"; None for file-level problems (syntax, I/O)
    value    the offending value as written (or the default it came from)
    problem  what is wrong with it
    allowed  what would have been accepted
    source   the file the value came from, or "<string>"; filled in by parse() and load()
    """

    def __init__(self, key, problem, *, value=_ABSENT, allowed=None, source=None):
        # args stays (key, problem) so that pickling (multiprocessing, logging handlers)
        # round-trips; the keyword attributes travel in __dict__.
        super().__init__(key, problem)
        self.key = key
        self.problem = problem
        self.value = value
        self.allowed = allowed
        self.source = source

    def __str__(self) -> str:
        parts = [self.source] if self.source else []
        if self.key is not None:
            if self.value is _ABSENT:
                parts.append(self.key)
            else:
                parts.append(f"{self.key} = {_value_repr.repr(self.value)}")
        parts.append(self.problem)
        message = ": ".join(parts)
        if self.allowed:
            message += f"; allowed: {self.allowed}"
        return message


def _describe_type(value) -> str:
    """The TOML name of a value's type, for "is a string, not an integer" messages."""
    # bool before int: bool is a subclass of int in Python but a distinct type in TOML.
    for python_type, toml_name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (Mapping, "a table"),
        (list, "an array"),
        (tuple, "an array"),
    ):
        if isinstance(value, python_type):
            return toml_name
    return f"a {type(value).__name__} (date/time or non-TOML value)"


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def format_size(n: int) -> str:
    """Bytes in the largest binary unit that divides them exactly: 33554432 -> "32MiB"."""
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n} bytes"


# ---------------------------------------------------------------------------------------------
# Sizes and durations: the two value syntaxes that are more than a TOML type.

# Case-sensitive on purpose: "KB" is 1000 to some readers and 1024 to others, and "mb" reads
# as megabits; a config that sizes locked memory and disk must not guess.
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": KiB, "KiB": KiB,
    "M": MiB, "MiB": MiB,
    "G": GiB, "GiB": GiB,
    "T": TiB, "TiB": TiB,
    "kB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
}
SIZE_SYNTAX = (
    'an integer number of bytes, or a string "<integer><unit>" with unit B, K/KiB, M/MiB, '
    "G/GiB, T/TiB (powers of 1024) or kB, MB, GB, TB (powers of 1000), e.g. \"64MiB\""
)
# [0-9] with re.ASCII, not \d: int() would happily accept non-ASCII digits such as "٤٠٩٦".
_SIZE_RE = re.compile(r"([0-9]+)\s*([A-Za-z]*)", re.ASCII)


def parse_size(value, key: str) -> int:
    """A size in bytes from a TOML integer or a string such as "64MiB", "4096", "1GB".

    Only whole numbers: "1.5GiB" is an error (write "1536MiB"), because a fractional size
    silently rounded is a size nobody asked for. Range checks are the caller's business.
    """
    if _is_integer(value):
        if value < 0:
            raise ConfigError(key, "is negative", value=value, allowed=SIZE_SYNTAX)
        return value
    if not isinstance(value, str):
        raise ConfigError(
            key, f"is {_describe_type(value)}, not a size", value=value, allowed=SIZE_SYNTAX
        )
    match = _SIZE_RE.fullmatch(value.strip())
    if match is None:
        if re.fullmatch(r"\s*[0-9]*\.[0-9]+\s*[A-Za-z]*\s*", value, re.ASCII):
            problem = 'is not a whole number; use a smaller unit ("1536MiB", not "1.5GiB")'
        else:
            problem = "is not a size"
        raise ConfigError(key, problem, value=value, allowed=SIZE_SYNTAX)
    digits, unit = match.groups()
    if unit not in _SIZE_UNITS:
        raise ConfigError(key, f"has unknown unit {unit!r}", value=value, allowed=SIZE_SYNTAX)
    return int(digits) * _SIZE_UNITS[unit]


_DURATION_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}
DURATION_SYNTAX = (
    'a number of seconds > 0, or a string "<number><unit>" with unit ms, s, m, h, '
    'e.g. "500ms", "10s", "2m"'
)
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)", re.ASCII)


def parse_duration(value, key: str) -> float:
    """Seconds (> 0) from a TOML number or a string such as "500ms", "10s", "2m", "1h".

    A string must carry a unit: "10" could mean seconds or milliseconds depending on who
    wrote it; a bare TOML number is always seconds.
    """
    if _is_integer(value) or isinstance(value, float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match is None:
            raise ConfigError(key, "is not a duration", value=value, allowed=DURATION_SYNTAX)
        number, unit = match.groups()
        if not unit:
            raise ConfigError(
                key,
                "has no unit (a bare number must be a TOML number, not a string)",
                value=value,
                allowed=DURATION_SYNTAX,
            )
        if unit not in _DURATION_UNITS:
            raise ConfigError(
                key, f"has unknown unit {unit!r}", value=value, allowed=DURATION_SYNTAX
            )
        # Decimal so that "100ms" is exactly the float nearest 0.1, not 100 * 0.001.
        seconds = float(Decimal(number) * _DURATION_UNITS[unit])
    else:
        raise ConfigError(
            key, f"is {_describe_type(value)}, not a duration", value=value,
            allowed=DURATION_SYNTAX,
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(
            key, "is not a finite duration > 0", value=value, allowed=DURATION_SYNTAX
        )
    return seconds


# ---------------------------------------------------------------------------------------------
# Kinds: one per value type. A kind checks and converts one raw value, and says in words what
# it accepts (used verbatim in errors and in the reference table).


class _Kind:
    type_name: str  # the "type" column of the reference
    allowed: str  # the "allowed values" column, and the tail of every error about this key

    def convert(self, value, key: str):
        raise NotImplementedError

    def _reject(self, key: str, value, problem: str):
        raise ConfigError(key, problem, value=value, allowed=self.allowed)

    def _require_type(self, key, value, ok: bool, expected: str):
        if not ok:
            self._reject(key, value, f"is {_describe_type(value)}, not {expected}")


class _Boolean(_Kind):
    type_name = "bool"
    allowed = "true or false"

    def convert(self, value, key):
        # Real TOML booleans only: "yes", 1 or "false" are far more often a mistake than intent.
        self._require_type(key, value, isinstance(value, bool), "a boolean")
        return value


class _Integer(_Kind):
    type_name = "int"

    def __init__(self, minimum: int, maximum: int, *, power_of_two: bool = False):
        self.minimum, self.maximum, self.power_of_two = minimum, maximum, power_of_two
        what = "a power of two" if power_of_two else "an integer"
        self.allowed = f"{what} from {minimum} to {maximum}"

    def convert(self, value, key):
        self._require_type(key, value, _is_integer(value), "an integer")
        if not self.minimum <= value <= self.maximum:
            self._reject(key, value, "is out of range")
        if self.power_of_two and not _is_power_of_two(value):
            self._reject(key, value, "is not a power of two")
        return value


class _Number(_Kind):
    """A TOML integer or float -> float; integers too, since "psi_enter = 10" means 10.0."""

    type_name = "float"

    def __init__(self, minimum: float, maximum: float):
        self.minimum, self.maximum = minimum, maximum
        self.allowed = f"a number from {minimum:g} to {maximum:g}"

    def convert(self, value, key):
        self._require_type(key, value, _is_integer(value) or isinstance(value, float),
                           "a number")
        if not self.minimum <= value <= self.maximum:  # also refuses nan
            self._reject(key, value, "is out of range")
        return float(value)


class _Choice(_Kind):
    type_name = "str"

    def __init__(self, *options: str):
        self.options = options
        self.allowed = ", ".join(json.dumps(option) for option in options)

    def convert(self, value, key):
        self._require_type(key, value, isinstance(value, str), "a string")
        if value not in self.options:
            self._reject(key, value, "is not one of the choices")
        return value


class _Text(_Kind):
    """Free text bound for the wire (export names, NBD_INFO_DESCRIPTION): length in UTF-8 bytes."""

    type_name = "str"

    def __init__(self, min_bytes: int, max_bytes: int, *, reserved_prefix: str | None = None):
        self.min_bytes, self.max_bytes = min_bytes, max_bytes
        self.reserved_prefix = reserved_prefix
        self.allowed = f"{min_bytes} to {max_bytes} bytes of UTF-8, no NUL"
        if reserved_prefix:
            self.allowed += f", not starting with {json.dumps(reserved_prefix)}"

    def convert(self, value, key):
        self._require_type(key, value, isinstance(value, str), "a string")
        try:
            length = len(value.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates: only reachable from Python callers
            length = None
        if length is None:
            self._reject(key, value, "is not encodable as UTF-8")
        if "\0" in value:
            self._reject(key, value, "contains a NUL character")
        if not self.min_bytes <= length <= self.max_bytes:
            self._reject(key, value, f"is {length} bytes long")
        if self.reserved_prefix and value.startswith(self.reserved_prefix):
            self._reject(key, value, f"starts with the reserved prefix {self.reserved_prefix!r}")
        return value


class _InterfaceName(_Kind):
    """A network interface name as the kernel accepts one (dev_valid_name), or "" for none.

    ASCII only: the kernel would take other bytes, but in a config file they are far more
    likely a pasted look-alike character than a real interface name.
    """

    type_name = "str"
    allowed = ('an interface name of 1 to 15 ASCII characters, no whitespace, "/" or ":", '
               'not "." or ".."; or "" for none')

    def convert(self, value, key):
        self._require_type(key, value, isinstance(value, str), "a string")
        # 15: IFNAMSIZ (16) less the NUL. "/" and "." / ".." would be path components under
        # /sys/class/net; ":" separates an alias label.
        if value and (not re.fullmatch(r"[!-~]{1,15}", value, re.ASCII)
                      or re.search(r"[/:]", value) or value in (".", "..")):
            self._reject(key, value, "is not a valid interface name")
        return value


class _PathText(_Kind):
    """A filesystem path, lexically normalised (no filesystem access, symlinks not followed).

    Whether a relative path is allowed, and what it is relative to, depends on the key; the
    builders resolve relative paths. Config parsing never touches the filesystem, so it gives
    the same answer on a build host as on the server.
    """

    type_name = "path"

    def __init__(self, allowed: str, *, absolute: bool = False, empty_is_none: bool = False,
                 max_bytes: int | None = None):
        self.allowed, self.absolute = allowed, absolute
        self.empty_is_none, self.max_bytes = empty_is_none, max_bytes

    def convert(self, value, key):
        self._require_type(key, value, isinstance(value, str), "a string")
        if value == "":
            if self.empty_is_none:
                return None
            self._reject(key, value, "is empty")
        if "\0" in value:
            self._reject(key, value, "contains a NUL character")
        if self.absolute and not os.path.isabs(value):
            self._reject(key, value, "is not an absolute path")
        path = Path(os.path.normpath(value))
        if self.max_bytes is not None and len(os.fsencode(path)) > self.max_bytes:
            self._reject(key, value, f"is longer than {self.max_bytes} bytes")
        return path


class _Size(_Kind):
    type_name = "size"

    def __init__(self, minimum: int, maximum: int | None = None, *, multiple_of: int = 1,
                 power_of_two: bool = False):
        self.minimum, self.maximum = minimum, maximum
        self.multiple_of, self.power_of_two = multiple_of, power_of_two
        what = "a power-of-two size" if power_of_two else "a size"
        if maximum is not None:
            self.allowed = f"{what} from {format_size(minimum)} to {format_size(maximum)}"
        elif minimum:
            self.allowed = f"{what} >= {format_size(minimum)}"
        else:
            self.allowed = what
        if multiple_of > 1:
            self.allowed += f", a multiple of {multiple_of}"

    def convert(self, value, key):
        size = parse_size(value, key)
        # No silent rounding to the page size: the operator would not get the size they wrote.
        if size < self.minimum or (self.maximum is not None and size > self.maximum):
            self._reject(key, value, f"{size} bytes is out of range")
        if size % self.multiple_of:
            self._reject(key, value, f"{size} bytes is not a multiple of {self.multiple_of}")
        if self.power_of_two and not _is_power_of_two(size):
            self._reject(key, value, f"{size} bytes is not a power of two")
        return size


class _Duration(_Kind):
    type_name = "duration"
    allowed = DURATION_SYNTAX

    def convert(self, value, key):
        return parse_duration(value, key)


class _WordOr(_Kind):
    """A word (-> None: "auto", the daemon derives the value; "never", the thing is off) or
    a value of another kind."""

    def __init__(self, word: str, kind: _Kind):
        self.word = word
        self.kind = kind
        self.type_name = f'"{word}" or {kind.type_name}'
        self.allowed = f'"{word}", or {kind.allowed}'

    def convert(self, value, key):
        if value == self.word:
            return None
        try:
            return self.kind.convert(value, key)
        except ConfigError as error:
            # The inner kind's allowed text may be more specific than its summary (the size
            # syntax after a parse error); keep it, and say that the word was an option too.
            error.allowed = f'"{self.word}", or {error.allowed}'
            raise


class _UniqueStrings(_Kind):
    """An array of strings -> a tuple of what _parse_one makes of each.

    Duplicates are errors, compared after parsing so that two spellings of one value count:
    a list that names something twice was not written as meant.
    """

    type_name = "list of str"

    def convert(self, value, key):
        self._require_type(key, value, isinstance(value, (list, tuple)), "an array")
        items = []
        for index, text in enumerate(value):
            item_key = f"{key}[{index}]"
            self._require_type(item_key, text, isinstance(text, str), "a string")
            item = self._parse_one(text, item_key)
            if item in items:
                self._reject(item_key, text, "is listed twice")
            items.append(item)
        return tuple(items)

    def _parse_one(self, text: str, key: str):
        raise NotImplementedError


class _ListenAddresses(_UniqueStrings):
    """TCP listen addresses -> tuple of (host, port); host "" means every address."""

    allowed = (
        'a list of "HOST:PORT" or "[IPV6]:PORT"; HOST is an IPv4 literal, "localhost", '
        'or "" / "*" for any address; PORT 0..65535; no duplicates'
    )

    def _parse_one(self, text, key) -> tuple[str, int]:
        if text.startswith("["):
            # "[v6]:port". Bracketed v4 ("[127.0.0.1]:1") is not a URL form anyone expects.
            host_text, bracket_colon, port_text = text[1:].partition("]:")
            if not bracket_colon:
                self._reject(key, text, 'is not "[IPV6]:PORT"')
            host = _ip_literal(ipaddress.IPv6Address, host_text)
            if host is None:
                self._reject(key, text, f"{host_text!r} is not an IPv6 address")
        else:
            host_text, colon, port_text = text.rpartition(":")
            if not colon:
                self._reject(key, text, "has no :PORT")
            if ":" in host_text:
                self._reject(key, text, 'is an unbracketed IPv6 address (write "[::1]:10809")')
            if host_text in ("", "*"):
                host = ""  # one spelling for "any", so consumers need not know about "*"
            elif host_text == "localhost":
                host = "localhost"
            else:
                host = _ip_literal(ipaddress.IPv4Address, host_text)
                if host is None:
                    # Host names other than localhost are refused: resolving them would make
                    # what the daemon listens on depend on DNS at boot time.
                    self._reject(key, text, f"{host_text!r} is not an IP address or \"localhost\"")
        if not re.fullmatch(r"[0-9]{1,5}", port_text, re.ASCII) or int(port_text) > 65535:
            self._reject(key, text, f"port {port_text!r} is not 0..65535")
        return host, int(port_text)


class _Networks(_UniqueStrings):
    """IP networks (v4 and v6 mixed) -> tuple of ipaddress.IPv4Network / IPv6Network.

    Host bits must be clear: "10.0.0.5/24" is refused rather than widened to 10.0.0.0/24,
    because these lists grant access (to the emergency reserve, say) and a slip should not
    silently grant it to a whole subnet. A bare address is the one-host network.
    """

    allowed = (
        'a list of CIDR networks, IPv4 or IPv6, e.g. "10.0.0.0/24", "fd00::/64", or a bare '
        "address for one host; host bits clear; no duplicates"
    )

    def _parse_one(self, text, key):
        if "%" in text:
            # A zone (fe80::%eth0/64) is a property of a link, not of the peers on it.
            self._reject(key, text, "has a zone index (%...); write the network without it")
        try:
            interface = ipaddress.ip_interface(text)
        except ValueError:
            self._reject(key, text, "is not an IPv4 or IPv6 network")
        network = interface.network
        if interface.ip != network.network_address:
            self._reject(key, text, f'has host bits set: the network is "{network}", the one '
                                    f'host "{interface.ip}/{network.max_prefixlen}"')
        return network


class _NodeNetworks(_Kind):
    """A table node name -> list of networks -> a tuple of (network, node), most specific
    network first, so that a lookup takes the first match."""

    type_name = "table of lists"
    allowed = ('a table of node = ["CIDR", ...] (node: a swap node name; networks as in '
               "swap.allow); a network may belong to one node only")

    def convert(self, value, key):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"is {_describe_type(value)}, not a table", value=value,
                              allowed=self.allowed)
        owner: dict = {}
        for node, networks in value.items():
            item_key = _key_path(key, str(node))
            if not _NODE_NAME_RE.fullmatch(str(node)):
                raise ConfigError(item_key, "is not a swap node name", value=node,
                                  allowed=self.allowed)
            for network in _Networks().convert(networks, item_key):
                if network in owner:
                    raise ConfigError(item_key, f"lists {network}, which belongs to node "
                                      f"{owner[network]!r} already", value=networks,
                                      allowed=self.allowed)
                owner[network] = str(node)
        return tuple(sorted(owner.items(), key=lambda item: -item[0].prefixlen))


class _Uids(_Kind):
    """"any" (-> None: no check) or a list of numeric uids -> a tuple of ints.

    Numbers only: a user name would make access depend on the passwd database at start, and
    SO_PEERCRED reports numbers.
    """

    type_name = '"any" or list of int'
    allowed = '"any", or a list of uids 0..4294967294 (numbers, not names); no duplicates'

    def convert(self, value, key):
        if value == "any":
            return None
        self._require_type(key, value, isinstance(value, (list, tuple)), '"any" or an array')
        uids = []
        for index, uid in enumerate(value):
            item_key = f"{key}[{index}]"
            self._require_type(item_key, uid, _is_integer(uid), "an integer")
            if not 0 <= uid <= 2**32 - 2:  # (uid_t)-1 is "no uid" to the kernel
                self._reject(item_key, uid, "is out of range")
            if uid in uids:
                self._reject(item_key, uid, "is listed twice")
            uids.append(uid)
        return tuple(uids)


# The per-node name rule of exports/registry.py, repeated here so that config parsing stays
# free of the exports package; tests/test_access.py checks that the two agree.
_NODE_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class _Secrets(_Kind):
    """A table node name -> secret string -> a tuple of (node, secret bytes), sorted.

    Kept out of every repr (SwapConfig.secrets has repr=False) and never echoed in an error:
    a config error about a secret quotes the node, not the value.
    """

    type_name = "table of str"
    allowed = ("a table of node = \"secret\" (node: a swap node name; secret: 16 to 256 "
               "bytes of printable ASCII without \":\" or spaces)")

    def convert(self, value, key):
        if not isinstance(value, Mapping):  # the value may be a misplaced secret: not shown
            raise ConfigError(key, f"is {_describe_type(value)}, not a table", allowed=self.allowed)
        pairs = []
        for node, secret in value.items():
            item_key = _key_path(key, str(node))
            if not _NODE_NAME_RE.fullmatch(str(node)):
                raise ConfigError(item_key, "is not a swap node name", allowed=self.allowed)
            if not isinstance(secret, str):
                raise ConfigError(item_key, f"is {_describe_type(secret)}, not a string",
                                  allowed=self.allowed)
            # Printable ASCII without ":" (it ends the node part of "swap/<node>:<secret>")
            # and without spaces, so it survives every client's export-name handling.
            if not re.fullmatch(r"[!-9;-~]{16,256}", secret, re.ASCII):
                raise ConfigError(item_key, "is not 16 to 256 printable ASCII characters "
                                  "without \":\" or spaces (value not shown)", allowed=self.allowed)
            pairs.append((node, secret.encode()))
        return tuple(sorted(pairs))


def _ip_literal(address_class, text: str) -> str | None:
    """The canonical spelling of an IP literal ("0::1" -> "::1"), or None if it is not one."""
    try:
        return str(address_class(text))
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# The schema. Defaults are written as they would be in the TOML file, go through the same
# kind as a user-supplied value, and are rendered verbatim into the reference.


class _Required:
    def __repr__(self) -> str:
        return "<required>"


_REQUIRED = _Required()  # the key must be present
_OPTIONAL = _ABSENT  # the key may be absent; its value is then None


@dataclass(frozen=True)
class _Field:
    name: str
    kind: _Kind
    default: object
    meaning: str
    also: str = ""  # rules involving other keys, for the reference (checked in _build_*)


_DAEMON = (
    _Field("state_dir", _PathText("a path; relative paths are resolved against the directory "
                                  "containing the config file"),
           "/var/lib/netswapd",
           "Directory holding export files, per-node swap files and daemon state."),
    _Field("log_level", _Choice("debug", "info", "warning", "error"), "info",
           "Least severe message that is logged."),
    _Field("workers", _Integer(1, 256), 8,
           "I/O threads shared by all connections."),
    _Field("shutdown_timeout", _Duration(), "30s",
           "On SIGTERM/SIGINT, how long in-flight requests may take to finish before "
           "connections are closed."),
    _Field("control_socket", _PathText('an absolute path of at most 107 bytes, or "" to disable',
                                       absolute=True, empty_is_none=True, max_bytes=107),
           "/run/netswapd/control.sock",
           "Unix socket netswapctl talks to (mode 0600: root only)."),
)

# How hard to insist on a protection the kernel may refuse for lack of rights or limits.
_INSISTENCE = _Choice("required", "best-effort", "off")

_POOL = (
    _Field("size", _WordOr("auto", _Size(MiB, multiple_of=4096)), "auto",
           "Size of the mlocked pool every request payload is carved from; the daemon's "
           'memory for request data never exceeds it. "auto" sizes it to the reservations '
           "(pool.normal_budget and the swap reserve) plus pool.headroom.",
           also="an explicit size must be >= nbd.max_request, and at start >= the "
                "reservations plus pool.headroom"),
    _Field("lock", _INSISTENCE, "required",
           'Whether the pool is mlocked: "required" refuses to start if it cannot be, '
           '"best-effort" logs a warning and continues, "off" never tries.'),
    _Field("normal_budget", _Size(4 * KiB, multiple_of=4096), "64MiB",
           "Pool memory shared by non-swap requests and by swap requests before they fall "
           "back to their reserve; attaching swap nodes never takes it.",
           also="and >= nbd.max_request"),
    _Field("headroom", _Size(0, multiple_of=4096), "8MiB",
           "Slack on top of the reservations the pool must cover, for allocator "
           "fragmentation."),
    _Field("non_swap_exhausted", _Choice("wait", "enomem"), "wait",
           'What a non-swap request gets when the normal budget is used up: "wait" queues it '
           'until memory is freed, "enomem" fails it at once with ENOMEM.'),
)

_TLS_MODE = _Choice("off", "optional", "require")
_TLS_FILE = _PathText('an absolute path, or "" for none', absolute=True, empty_is_none=True)

_NBD = (
    _Field("listen", _ListenAddresses(), ["127.0.0.1:10809", "[::1]:10809"],
           "TCP addresses to serve NBD on; an empty list serves TCP nowhere."),
    _Field("unix_socket", _PathText('an absolute path of at most 107 bytes, or "" to disable',
                                    absolute=True, empty_is_none=True,
                                    max_bytes=107),  # sun_path is 108 bytes including the NUL
           "/run/netswapd/nbd.sock",
           "Unix socket to serve NBD on, for local clients."),
    _Field("max_request", _Size(4 * KiB, 128 * MiB, power_of_two=True), "32MiB",
           "Largest READ/WRITE payload served (advertised as the maximum block size); "
           "larger requests are refused."),
    _Field("max_inflight", _Integer(1, 1024), 128,
           "Requests one connection may have in flight; with max_request, bounds how much of "
           "the pool one node can hold."),
    _Field("max_connections", _Integer(1, 65536), 1024,
           "Connections open at once, all clients together; past it new ones are closed at "
           "accept, so a connection flood cannot take threads and memory from attached nodes."),
    _Field("max_connections_per_client", _Integer(1, 65536), 64,
           "Connections open at once from one client address (a node with nbd-client -C N "
           "needs N); past it that client's new connections are closed at accept."),
    _Field("handshake_timeout", _Duration(), "10s",
           "Time a new connection has to finish NBD negotiation before it is dropped."),
    _Field("keepalive", _Duration(), "30s",
           "Idle time after which TCP keepalive probes a client; a client gone without a "
           "word (power loss, cable) is disconnected within about twice this, and its "
           "buffers and reserve go back."),
    _Field("send_timeout", _Duration(), "60s",
           "Time a client may take none of the replies queued for it before it is "
           "disconnected (its buffers and in-flight slots go back)."),
    _Field("c_loop", _Boolean(), True,
           "Serve plain READs and WRITEs on file exports in the C request loop, without the "
           "GIL (false: every request takes the Python path; for comparison and debugging)."),
    _Field("block_size_min", _Integer(1, 65536, power_of_two=True), 1,
           "Advertised minimum block size: the alignment clients must respect."),
    _Field("block_size_preferred", _Integer(512, 128 * MiB, power_of_two=True), 4096,
           "Advertised preferred block size: the alignment clients should use for speed.",
           also="and >= nbd.block_size_min and <= nbd.max_request"),
    _Field("tls", _TLS_MODE, "off",
           'TLS (NBD STARTTLS) on the TCP listeners: "off" refuses STARTTLS, "optional" '
           'lets each client choose, "require" serves no option but STARTTLS and ABORT '
           "before TLS.",
           also="not off: needs nbd.tls_certificate"),
    _Field("unix_socket_tls", _TLS_MODE, "off",
           "TLS on the Unix socket, as nbd.tls for TCP.",
           also="not off: needs nbd.tls_certificate"),
    _Field("tls_certificate", _TLS_FILE, "",
           "PEM file with the server's certificate (and any intermediates after it); read at "
           "start and on reload."),
    _Field("tls_key", _TLS_FILE, "",
           'PEM file with the certificate\'s private key, unencrypted; "" when the key is in '
           "nbd.tls_certificate."),
    _Field("tls_client_ca", _TLS_FILE, "",
           "PEM file of CA certificates that client certificates must chain to; set, every TLS "
           'client must present one; "" accepts TLS clients without a certificate.'),
)

_SWAP = (
    _Field("enabled", _Boolean(), True,
           'Whether a client asking for export "swap/<node>" gets its own swap export, '
           "created from this template."),
    _Field("size", _Size(MiB, multiple_of=4096), "1GiB",
           "Size of each node's swap export.",
           also="and a multiple of nbd.block_size_min"),
    _Field("backend", _Choice("file", "memory"), "file",
           "Where per-node swap data lives: a sparse file in directory, or server RAM "
           "(lost when the daemon stops)."),
    _Field("directory", _PathText("a path, relative to daemon.state_dir or absolute"), "swap",
           "Directory for per-node swap files.",
           also="and must resolve strictly inside daemon.state_dir"),
    _Field("description", _Text(0, 4096), "netswap per-node swap",
           "Description sent to clients (NBD_INFO_DESCRIPTION)."),
    _Field("max_nodes", _Integer(1, 4096), 16,
           "Swap nodes attached at once; the pool holds a reserve for each."),
    _Field("reserve_inflight", _Integer(1, 1024), 32,
           "Swap requests in flight per node that its reserve covers."),
    _Field("reserve_request", _Size(4 * KiB, 128 * MiB, power_of_two=True), "128KiB",
           "Request size the reserve covers: what a node's swap I/O is split into (its "
           "max_sectors_kb).",
           also="and <= nbd.max_request"),
    _Field("max_connections", _Integer(1, 64), 4,
           "Connections per node whose receive windows the reserve covers."),
    _Field("detach_grace", _Duration(), "30s",
           "How long a node's reserve stays connected after its last connection closes, so "
           "a reconnecting node finds it still there."),
    _Field("node_networks", _Networks(), [],
           "Peers whose connections are treated as swap (emergency) traffic from accept, "
           "before their export is known."),
    _Field("allow", _Networks(), ["0.0.0.0/0", "::/0"],
           "TCP clients that may open a swap/<node> export (and see them listed); the "
           "default lets anyone who reaches nbd.listen open any node's swap."),
    _Field("allow_uids", _Uids(), "any",
           "Unix-socket clients (by SO_PEERCRED uid) that may open a swap/<node> export."),
    _Field("bind", _Choice("address", "secret", "none"), "address",
           '"address": a node\'s swap is bound to the client address (Unix socket: uid) that '
           "first attached it, kept in daemon.state_dir, and refused to every other; "
           '"secret": a client must ask for "swap/<node>:<secret>" with the node\'s secret '
           'from secrets; "none": any allowed client may open any node\'s swap.'),
    _Field("secrets", _Secrets(), {},
           'Per-node secrets for bind = "secret" ([swap.secrets] node = "secret"); they '
           "cross the network in clear without TLS.",
           also='set if and only if bind = "secret"'),
    _Field("wipe", _Boolean(), False,
           "Discard a node's swap contents (punch holes, made durable) when it detaches for "
           "good (detach_grace over, an operator's detach, daemon stop) and every node's image "
           "at daemon start."),
)

_NETWORK = (
    _Field("priority", _Integer(0, 7), 6,
           "SO_PRIORITY of swap connections: the kernel's queueing priority for their "
           "packets (above 6 needs CAP_NET_ADMIN)."),
    _Field("dscp", _Integer(0, 63), 46,
           "DSCP of swap connections (IP_TOS / IPV6_TCLASS), for switches and routers; 46 is "
           "EF (expedited forwarding)."),
    _Field("mark", _Integer(0, 2**32 - 1), 0,
           "SO_MARK of swap connections, for firewall and routing rules; 0 leaves it unset."),
    _Field("shape", _Boolean(), False,
           "Install a root qdisc on interface that sends packets carrying mark first (an HTB "
           "with a top-priority class and a BPF mark filter); removed at exit.",
           also="needs a nonzero network.mark"),
    _Field("interface", _InterfaceName(), "",
           "The serving interface, for shape.",
           also="required (not empty) when network.shape = true"),
)

_PRESSURE = (
    _Field("enabled", _Boolean(), True,
           "Watch this server's memory pressure (PSI and MemAvailable) and run in "
           "emergency mode while it is high."),
    _Field("interval", _Duration(), "1s",
           "How often /proc/pressure/memory and MemAvailable are read when PSI triggers are "
           "unavailable."),
    _Field("psi_enter", _Number(0, 100), 10.0,
           'Memory PSI "some" avg10 (%) at or above which emergency mode starts.'),
    _Field("psi_exit", _Number(0, 100), 5.0,
           "Memory PSI avg10 (%) below which emergency mode may end.",
           also="and < pressure.psi_enter"),
    _Field("available_enter", _Size(0), "256MiB",
           "MemAvailable at or below which emergency mode starts."),
    _Field("available_exit", _Size(0), "512MiB",
           "MemAvailable above which emergency mode may end.",
           also="and > pressure.available_enter"),
)

_PROTECT = (
    _Field("mlockall", _INSISTENCE, "best-effort",
           "mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT), so the daemon's own code and "
           'heap are never swapped out: "required" refuses to start without it, '
           '"best-effort" warns, "off" never tries.'),
    _Field("oom_score_adj", _Integer(-1000, 1000), -1000,
           "Written to /proc/self/oom_score_adj; -1000 exempts the daemon from the OOM "
           "killer."),
    _Field("io_flusher", _INSISTENCE, "best-effort",
           "prctl(PR_SET_IO_FLUSHER): the kernel does not make the daemon's allocations wait "
           "on the swap I/O the daemon itself must complete (needs CAP_SYS_RESOURCE); "
           '"required" refuses to start without it, "best-effort" warns, "off" never tries.'),
)

_NFS_EXPORT_PATH = _Text(0, 1024)

_NFS = (
    _Field("enabled", _Boolean(), True,
           "Serve NFSv3 (and MOUNT v3) over TCP: a swap export of per-node swap files and a "
           "scratch export of ordinary files."),
    _Field("listen", _ListenAddresses(), ["127.0.0.1:2049"],
           "TCP addresses for NFSv3; an empty list serves NFS nowhere."),
    _Field("mount_listen", _ListenAddresses(), ["127.0.0.1:20048"],
           "TCP addresses for MOUNT v3 (clients give it as mountport=)."),
    _Field("swap_export", _NFS_EXPORT_PATH, "/swap",
           "Export path of the swap export (MNT argument); each node sees only its own file "
           'there, named after the node; "" disables it.'),
    _Field("swap_directory", _PathText("a path, relative to daemon.state_dir or absolute"),
           "nfs-swap", "Directory holding the per-node swap files.",
           also="and must resolve strictly inside daemon.state_dir"),
    _Field("swap_size", _Size(MiB, multiple_of=MiB), "256MiB",
           "Size of each node's swap file, fully allocated when the node first uses it "
           "(swapon refuses files with holes)."),
    _Field("scratch_export", _NFS_EXPORT_PATH, "/scratch",
           'Export path of a writable directory of ordinary files (a non-swap consumer); "" '
           "disables it."),
    _Field("scratch_directory", _PathText("a path, relative to daemon.state_dir or absolute"),
           "nfs-scratch", "Directory served as the scratch export.",
           also="and must resolve strictly inside daemon.state_dir"),
    _Field("nodes", _NodeNetworks(), {"localhost": ["127.0.0.0/8", "::1"]},
           "Which client addresses are which swap node ([nfs.nodes] node = [networks]); a "
           "client in none of them gets no swap file."),
    _Field("node_ports", _Choice("privileged", "any"), "privileged",
           'Which source ports make a connection from a node\'s address that node: '
           '"privileged" (below 1024: only root on the node can bind them, as the kernel '
           "client and libnfs run as root do) keeps an unprivileged user on the node from "
           "reading or writing its swap file, which holds every process's memory, or "
           'unmounting it; "any" trusts every port (as knfsd\'s insecure). Such a '
           "connection may still use the other exports."),
    _Field("swap_idle_timeout", _WordOr("never", _Duration()), "10m",
           "A node's reserve is attached on its MNT of the swap export or its first swap-file "
           "READ/WRITE/COMMIT, and detached on its UMNT or after this long without any "
           "(then swap.detach_grace as for NBD); an idle detach never wipes the file, a later "
           'swap-file call attaches again. "never": only UMNT detaches.'),
    _Field("max_io", _Size(8 * KiB, 16 * MiB, power_of_two=True), "1MiB",
           "Largest READ/WRITE (FSINFO rtmax/wtmax); records are capped just above it."),
    _Field("c_loop", _Boolean(), True,
           "Serve a swap node's plain READs and WRITEs of its own swap file in the C call "
           "loop, without the GIL (false: every call takes the Python path; for comparison "
           "and debugging)."),
    _Field("max_connections", _Integer(1, 65536), 1024,
           "NFS and MOUNT connections open at once, all clients together (a budget of its "
           "own, apart from nbd.max_connections); past it new ones are closed at accept."),
    _Field("max_connections_per_client", _Integer(1, 65536), 64,
           "NFS and MOUNT connections open at once from one client address (a Linux mount "
           "takes one, or nconnect=N, plus a short MOUNT one; each libnfs tool one of each); "
           "past it that client's new connections are closed at accept."),
    _Field("keepalive", _Duration(), "30s",
           "Idle time after which TCP keepalive probes an NFS client, as nbd.keepalive: a "
           "node gone without a word is disconnected within about twice this."),
    _Field("portmapper", _Choice("off", "serve", "register"), "register",
           "How clients find the NFS and MOUNT ports without port=/mountport=: "
           '"register" SETs them at the local rpcbind (nfs.rpcbind_socket) at start and UNSETs '
           'them at stop, only a warning if none answers; "serve" answers portmapper v2 itself '
           'on nfs.portmapper_listen (TCP; SET, UNSET and CALLIT refused); "off" neither.'),
    _Field("portmapper_listen", _ListenAddresses(), ["127.0.0.1:111"],
           'TCP addresses of the portmapper with nfs.portmapper = "serve" (clients ask port '
           "111)."),
    _Field("rpcbind_socket", _PathText("an absolute path of at most 107 bytes", absolute=True,
                                       max_bytes=107),
           "/run/rpcbind.sock",
           "The local rpcbind's AF_LOCAL socket, where nfs.portmapper = \"register\" "
           "registers (rpcbind takes SET only from local callers)."),
)

_METRICS = (
    _Field("listen", _ListenAddresses(), ["127.0.0.1:9810"],
           "Where Prometheus scrapes /metrics: the pool, the reserve tree, drops and server "
           "counters. The endpoint is a non-swap consumer: it never touches the reserve. An "
           "empty list serves no metrics."),
)

_EXPORT = (
    _Field("name", _Text(1, 255, reserved_prefix="swap/"), _REQUIRED,
           "Export name clients ask for.",
           also="and unique among exports"),
    _Field("backend", _Choice("file", "memory"), "file",
           "Where the export's data lives: the file at path, or server RAM (lost when the "
           "daemon stops)."),
    _Field("path", _PathText("a path, relative to daemon.state_dir or absolute"), _OPTIONAL,
           "Backing file of a file export.",
           also='required for backend "file", forbidden for "memory"; unique among exports; '
                "not inside swap.directory"),
    _Field("size", _Size(4096, multiple_of=4096), _REQUIRED,
           "Export size.",
           also="and a multiple of nbd.block_size_min"),
    _Field("read_only", _Boolean(), False,
           "Serve the export read-only (writes are refused)."),
    _Field("description", _Text(0, 4096), "",
           "Description sent to clients (NBD_INFO_DESCRIPTION)."),
    _Field("allow", _Networks(), ["0.0.0.0/0", "::/0"],
           "TCP clients that may open the export (and see it listed); the default lets "
           "anyone who reaches nbd.listen open it."),
    _Field("allow_uids", _Uids(), "any",
           "Unix-socket clients (by SO_PEERCRED uid) that may open the export."),
    _Field("wipe", _Boolean(), False,
           "Discard the export's contents (punch holes, made durable) at daemon start and "
           "whenever its last client disconnects.",
           also="not with read_only = true"),
)

# Fixed sections, in file and documentation order; "exports" is an array of tables.
_SECTIONS = {"daemon": _DAEMON, "pool": _POOL, "nbd": _NBD, "swap": _SWAP,
             "network": _NETWORK, "pressure": _PRESSURE, "protect": _PROTECT,
             "nfs": _NFS, "metrics": _METRICS}
_TOP_LEVEL = (*_SECTIONS, "exports")

KEYS: tuple[str, ...] = (
    *(f"{section}.{field.name}" for section, fields in _SECTIONS.items() for field in fields),
    *(f"exports[].{field.name}" for field in _EXPORT),
)


# ---------------------------------------------------------------------------------------------
# The typed result.


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path  # absolute
    log_level: str
    workers: int
    shutdown_timeout: float  # seconds
    control_socket: Path | None  # None: no control socket


@dataclass(frozen=True)
class PoolConfig:
    size: int | None  # bytes; None = "auto", computed from the reserve tree at start
    lock: str
    normal_budget: int  # bytes
    headroom: int  # bytes
    non_swap_exhausted: str  # "wait" | "enomem"


@dataclass(frozen=True)
class NbdConfig:
    listen: tuple[tuple[str, int], ...]  # (host, port); host "" = any address
    unix_socket: Path | None
    max_request: int  # bytes
    max_inflight: int
    max_connections: int
    max_connections_per_client: int
    handshake_timeout: float  # seconds
    keepalive: float  # seconds
    send_timeout: float  # seconds
    c_loop: bool
    block_size_min: int
    block_size_preferred: int
    tls: str  # "off" | "optional" | "require", TCP listeners
    unix_socket_tls: str  # the same, the Unix socket
    tls_certificate: Path | None
    tls_key: Path | None  # None: the key is in tls_certificate
    tls_client_ca: Path | None  # None: client certificates are not asked for

    def tls_mode(self, unix: bool) -> str:
        """The TLS mode of a connection accepted on the Unix socket or on TCP."""
        return self.unix_socket_tls if unix else self.tls


@dataclass(frozen=True)
class SwapConfig:
    enabled: bool
    size: int  # bytes
    backend: str
    directory: Path  # absolute, strictly inside daemon.state_dir
    description: str
    max_nodes: int
    reserve_inflight: int
    reserve_request: int  # bytes, a power of two
    max_connections: int
    detach_grace: float  # seconds
    node_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]  # host bits clear
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    allow_uids: tuple[int, ...] | None  # None: any uid
    bind: str  # "address" | "secret" | "none"
    secrets: tuple[tuple[str, bytes], ...] = dataclass_field(repr=False)  # (node, secret), sorted
    wipe: bool


@dataclass(frozen=True)
class NetworkConfig:
    priority: int  # SO_PRIORITY
    dscp: int  # the upper six bits of IP_TOS / IPV6_TCLASS
    mark: int  # SO_MARK; 0 = leave unset
    shape: bool
    interface: str  # "" = none; never "" when shape is true


@dataclass(frozen=True)
class PressureConfig:
    enabled: bool
    interval: float  # seconds
    psi_enter: float  # percent; psi_exit < psi_enter
    psi_exit: float
    available_enter: int  # bytes; available_exit > available_enter
    available_exit: int


@dataclass(frozen=True)
class ProtectConfig:
    mlockall: str  # "required" | "best-effort" | "off"
    oom_score_adj: int
    io_flusher: str  # "required" | "best-effort" | "off"


@dataclass(frozen=True)
class NfsConfig:
    enabled: bool
    listen: tuple[tuple[str, int], ...]
    mount_listen: tuple[tuple[str, int], ...]
    swap_export: str  # "" = none
    swap_directory: Path  # absolute
    swap_size: int  # bytes
    scratch_export: str  # "" = none
    scratch_directory: Path  # absolute
    nodes: tuple  # ((network, node), ...), most specific first
    max_io: int  # bytes
    swap_idle_timeout: float | None  # seconds; None = never
    c_loop: bool
    node_ports: str  # "privileged" | "any"
    max_connections: int  # NFS and MOUNT together
    max_connections_per_client: int
    keepalive: float  # seconds
    portmapper: str  # "off" | "serve" | "register"
    portmapper_listen: tuple[tuple[str, int], ...]
    rpcbind_socket: Path

    def node_of(self, address: str, port: int | None = None) -> str | None:
        """The swap node a client address is, or None; with the connection's source `port`,
        None also when node_ports = "privileged" and the port is not below 1024."""
        if port is not None and port >= 1024 and self.node_ports == "privileged":
            return None
        ip = ipaddress.ip_address(address)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for network, node in self.nodes:
            if ip.version == network.version and ip in network:
                return node
        return None


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[tuple[str, int], ...]  # (host, port) pairs, as nbd.listen


@dataclass(frozen=True)
class ExportConfig:
    name: str
    backend: str
    path: Path | None  # absolute for "file", None for "memory"
    size: int  # bytes
    read_only: bool
    description: str
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    allow_uids: tuple[int, ...] | None  # None: any uid
    wipe: bool


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


# ---------------------------------------------------------------------------------------------
# Validation.


def _key_path(prefix: str, name: str) -> str:
    # Quote keys that are not TOML bare keys, so `daemon."log level"` reads as one key.
    shown = name if re.fullmatch(r"[A-Za-z0-9_-]+", name, re.ASCII) else json.dumps(name)
    return f"{prefix}.{shown}" if prefix else shown


def _reject_unknown_keys(table: Mapping, prefix: str, known: tuple[str, ...]) -> None:
    for name, value in table.items():
        if name in known:
            continue
        problem = "unknown key"
        close = difflib.get_close_matches(str(name), known, n=1)
        if close:
            problem += f" (did you mean {close[0]!r}?)"
        elif not prefix:  # a key written above its [section] header, e.g. top-level "workers"
            owners = [s for s, fields in _SECTIONS.items() if name in {f.name for f in fields}]
            if owners:
                problem += f" (did you mean it under [{'] or ['.join(owners)}]?)"
        raise ConfigError(_key_path(prefix, str(name)), problem, value=value,
                          allowed=", ".join(known))


def _read_table(table, prefix: str, fields: tuple[_Field, ...], header: str = ""
                ) -> tuple[dict, dict]:
    """Check one TOML table against its fields; header is how the table is written in TOML.

    Returns (values, written): the converted values, and the raw values they came from
    (the default where the key was absent), so that errors about rules between keys can
    quote what the operator wrote rather than a byte count.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(prefix, f"is {_describe_type(table)}, not a table", value=table,
                          allowed=f"a table ({header or f'[{prefix}]'})")
    _reject_unknown_keys(table, prefix, tuple(field.name for field in fields))
    values, written = {}, {}
    for field in fields:
        key = _key_path(prefix, field.name)
        raw = table.get(field.name, field.default)
        if raw is _REQUIRED:
            raise ConfigError(key, "is required but missing", allowed=field.kind.allowed)
        written[field.name] = raw
        values[field.name] = None if raw is _OPTIONAL else field.kind.convert(raw, key)
    return values, written


def _under(base: Path, path: Path) -> Path:
    """path resolved against base, lexically: base / "../x" leaves base."""
    return Path(os.path.normpath(base / path))


def _check_multiple_of_block(size: int, key: str, written, nbd: NbdConfig) -> None:
    # NBD clients may only address whole minimum-size blocks; a ragged tail would be
    # unreachable, or reachable only through requests the server promised not to need.
    if size % nbd.block_size_min:
        raise ConfigError(
            key, f"{size} bytes is not a multiple of nbd.block_size_min ({nbd.block_size_min})",
            value=written, allowed="a multiple of nbd.block_size_min",
        )


# relation -> (test, what a failing value is, in words)
_RELATIONS = {
    ">=": (operator.ge, "smaller than"),
    "<=": (operator.le, "larger than"),
    ">": (operator.gt, "not larger than"),
    "<": (operator.lt, "not smaller than"),
}


def _require_relation(key: str, value, written, relation: str,
                      other_key: str, other_value, other_written, *, in_bytes: bool = False
                      ) -> None:
    """Enforce `key relation other_key`; the error quotes both keys as the operator wrote them.

    in_bytes adds the byte counts, since "256MiB" vs 268435456 is not comparable at a glance.
    """
    holds, failure = _RELATIONS[relation]
    if holds(value, other_value):
        return
    if in_bytes:
        problem = (f"{value} bytes is {failure} {other_key} = {other_written!r} "
                   f"({other_value} bytes)")
    else:
        problem = f"is {failure} {other_key} = {other_written!r}"
    raise ConfigError(key, problem, value=written, allowed=f"{key} {relation} {other_key}")


def _build_daemon(table, base_dir: Path | None) -> DaemonConfig:
    values, written = _read_table(table, "daemon", _DAEMON)
    state_dir = values["state_dir"]
    if not state_dir.is_absolute():
        if base_dir is None:
            raise ConfigError(
                "daemon.state_dir", "is relative, and there is no config file to resolve it "
                "against", value=written["state_dir"], allowed="an absolute path",
            )
        values["state_dir"] = _under(base_dir, state_dir)
    return DaemonConfig(**values)


def _build_pool(table, nbd: NbdConfig, nbd_written: dict) -> PoolConfig:
    values, written = _read_table(table, "pool", _POOL)
    # Every payload is one contiguous pool buffer, so a pool smaller than the largest request
    # would accept a client and then be unable to serve it; likewise a normal budget smaller
    # than one request would make a largest non-swap request wait forever (or always fail).
    # "auto" needs no check here: it is computed at start from the reserve tree, which
    # includes the budget.
    # (Whether an explicit size covers that tree is checked at start too: reserve/tree.py.)
    for name in ("size", "normal_budget"):
        if values[name] is not None:
            _require_relation(f"pool.{name}", values[name], written[name], ">=",
                              "nbd.max_request", nbd.max_request, nbd_written["max_request"],
                              in_bytes=True)
    return PoolConfig(**values)


def _build_nbd(table) -> tuple[NbdConfig, dict]:
    values, written = _read_table(table, "nbd", _NBD)
    preferred, minimum = values["block_size_preferred"], values["block_size_min"]
    # The NBD spec: preferred >= minimum and <= maximum (our maximum is max_request); the
    # 512 floor is the kind's range, as no client does useful I/O in smaller units.
    if not minimum <= preferred <= values["max_request"]:
        raise ConfigError(
            "nbd.block_size_preferred",
            f"is outside nbd.block_size_min = {minimum} .. nbd.max_request = "
            f"{written['max_request']!r} ({values['max_request']} bytes)",
            value=written["block_size_preferred"],
            allowed="a power of two >= max(nbd.block_size_min, 512) and <= nbd.max_request",
        )
    # Whether the files can be read and hold what they should is checked when the daemon
    # builds its TLS context (nbd/tls.py), as parsing never touches the filesystem.
    for mode_key in ("tls", "unix_socket_tls"):
        if values[mode_key] != "off" and values["tls_certificate"] is None:
            raise ConfigError(
                "nbd.tls_certificate", f"is empty, but nbd.{mode_key} = "
                f"{written[mode_key]!r} needs a certificate to present",
                value=written["tls_certificate"],
                allowed=f"an absolute path to a PEM certificate when nbd.{mode_key} is not \"off\"",
            )
    return NbdConfig(**values), written


def _build_swap(table, state_dir: Path, nbd: NbdConfig, nbd_written: dict) -> SwapConfig:
    values, written = _read_table(table, "swap", _SWAP)
    directory = _under(state_dir, values["directory"])
    # Per-node swap files are named after client-chosen node names and deleted on detach;
    # keeping them in their own subdirectory of state_dir keeps that churn away from
    # everything else the daemon owns.
    if directory == state_dir or not directory.is_relative_to(state_dir):
        raise ConfigError(
            "swap.directory", f"resolves to {str(directory)!r}, not inside daemon.state_dir "
            f"{str(state_dir)!r}", value=written["directory"],
            allowed="a directory strictly inside daemon.state_dir",
        )
    values["directory"] = directory
    _check_multiple_of_block(values["size"], "swap.size", written["size"], nbd)
    # reserve_request describes one request; one larger than any the server accepts
    # describes requests that cannot happen, most likely nbd.max_request lowered alone.
    _require_relation("swap.reserve_request", values["reserve_request"],
                      written["reserve_request"], "<=", "nbd.max_request", nbd.max_request,
                      nbd_written["max_request"], in_bytes=True)
    # Secrets that nothing checks would give a false sense of protection; secret binding
    # without secrets would refuse every node.
    if values["secrets"] and values["bind"] != "secret":
        raise ConfigError("swap.secrets", f"are set, but swap.bind = {written['bind']!r} "
                          "never checks them", allowed='secrets only with swap.bind = "secret"')
    if values["bind"] == "secret" and not values["secrets"]:
        raise ConfigError("swap.secrets", 'is empty, but swap.bind = "secret" refuses every '
                          "node without one", allowed='a secret per node with swap.bind = "secret"')
    return SwapConfig(**values)


def _build_network(table) -> NetworkConfig:
    values, written = _read_table(table, "network", _NETWORK)
    # Refused rather than ignored: an operator who asked for shaping and gets none finds out
    # only when swap traffic stalls behind bulk traffic.
    if values["shape"] and not values["interface"]:
        raise ConfigError(
            "network.interface", "is empty, but network.shape = true needs the interface to "
            "shape", value=written["interface"],
            allowed="an interface name when network.shape = true",
        )
    # The shaper tells swap packets from the rest by their mark: with none, nothing would
    # ever reach the first band.
    if values["shape"] and not values["mark"]:
        raise ConfigError(
            "network.mark", "is 0, but network.shape = true classifies swap packets by mark",
            value=written["mark"], allowed="a nonzero mark (1..4294967295) when network.shape = true",
        )
    return NetworkConfig(**values)


def _build_pressure(table) -> PressureConfig:
    values, written = _read_table(table, "pressure", _PRESSURE)
    # Hysteresis: emergency mode ends on the far side of a gap from where it starts, or a
    # reading hovering at one threshold would flip it on and off every interval. Checked even
    # when disabled, so that enabling the monitor later cannot turn up a broken pair.
    _require_relation("pressure.psi_exit", values["psi_exit"], written["psi_exit"], "<",
                      "pressure.psi_enter", values["psi_enter"], written["psi_enter"])
    _require_relation("pressure.available_exit", values["available_exit"],
                      written["available_exit"], ">", "pressure.available_enter",
                      values["available_enter"], written["available_enter"], in_bytes=True)
    return PressureConfig(**values)


def _build_protect(table) -> ProtectConfig:
    values, _ = _read_table(table, "protect", _PROTECT)  # no rules between its keys
    return ProtectConfig(**values)


def _build_nfs(table, state_dir: Path) -> NfsConfig:
    values, written = _read_table(table, "nfs", _NFS)
    for kind in ("swap", "scratch"):
        key = f"{kind}_export"
        path = values[key]
        # An export path is what clients MNT: absolute, normalised, one component or more.
        if path and (not path.startswith("/") or path == "/" or os.path.normpath(path) != path):
            raise ConfigError(f"nfs.{key}", "is not a normalised absolute path below /",
                              value=written[key], allowed='e.g. "/swap", or "" to disable')
        directory = _under(state_dir, values[f"{kind}_directory"])
        if directory == state_dir or not directory.is_relative_to(state_dir):
            raise ConfigError(f"nfs.{kind}_directory", f"resolves to {str(directory)!r}, not "
                              f"inside daemon.state_dir {str(state_dir)!r}",
                              value=written[f"{kind}_directory"],
                              allowed="a directory strictly inside daemon.state_dir")
        values[f"{kind}_directory"] = directory
    if values["swap_export"] and values["swap_export"] == values["scratch_export"]:
        raise ConfigError("nfs.scratch_export", "is the same path as nfs.swap_export",
                          value=written["scratch_export"], allowed="a different export path")
    if values["swap_directory"] == values["scratch_directory"]:
        raise ConfigError("nfs.scratch_directory", "is the same directory as "
                          "nfs.swap_directory", value=written["scratch_directory"],
                          allowed="a different directory")
    return NfsConfig(**values)


def _build_metrics(table) -> MetricsConfig:
    values, _ = _read_table(table, "metrics", _METRICS)
    return MetricsConfig(**values)


def _build_exports(array, state_dir: Path, swap: SwapConfig, nbd: NbdConfig):
    if not isinstance(array, (list, tuple)):
        raise ConfigError("exports", f"is {_describe_type(array)}, not an array of tables",
                          value=array, allowed="[[exports]] tables")
    exports: list[ExportConfig] = []
    owner_of_name: dict[str, str] = {}
    owner_of_path: dict[Path, str] = {}
    for index, table in enumerate(array):
        prefix = f"exports[{index}]"
        values, written = _read_table(table, prefix, _EXPORT, header="[[exports]]")

        name = values["name"]
        if name in owner_of_name:
            raise ConfigError(f"{prefix}.name", f"is already the name of {owner_of_name[name]}",
                              value=name, allowed="a name unique among exports")
        owner_of_name[name] = prefix

        path_key = f"{prefix}.path"
        if values["backend"] == "memory":
            if values["path"] is not None:
                raise ConfigError(path_key, 'is set, but backend "memory" has no backing file',
                                  value=written["path"],
                                  allowed='no path for backend "memory"')
        else:
            if values["path"] is None:
                raise ConfigError(path_key, f'is required for backend {values["backend"]!r}',
                                  allowed="a path, relative to daemon.state_dir or absolute")
            path = values["path"] = _under(state_dir, values["path"])
            # Two exports on one file would corrupt each other; a file inside the swap
            # directory could be taken, or deleted, as some node's swap file.
            if path in owner_of_path:
                raise ConfigError(path_key, f"is already the backing file of "
                                  f"{owner_of_path[path]}", value=written["path"],
                                  allowed="a path unique among exports")
            if path.is_relative_to(swap.directory):
                raise ConfigError(path_key, f"resolves to {str(path)!r}, inside swap.directory "
                                  f"{str(swap.directory)!r}", value=written["path"],
                                  allowed="a path outside swap.directory")
            owner_of_path[path] = prefix

        _check_multiple_of_block(values["size"], f"{prefix}.size", written["size"], nbd)
        if values["wipe"] and values["read_only"]:
            raise ConfigError(f"{prefix}.wipe", "is true, but the export is read_only",
                              value=written["wipe"], allowed="false for a read_only export")
        exports.append(ExportConfig(**values))
    return tuple(exports)


def parse(mapping: Mapping, source: str = "<string>", *, base_dir: Path | None = None) -> Config:
    """Validate an already-parsed TOML document. Missing keys take their defaults.

    base_dir is what a relative daemon.state_dir is resolved against (load() passes the
    config file's directory); without it a relative state_dir is an error.
    """
    if base_dir is not None:
        base_dir = Path(base_dir).absolute()
    try:
        if not isinstance(mapping, Mapping):
            raise ConfigError(None, f"the document is {_describe_type(mapping)}, not a table")
        _reject_unknown_keys(mapping, "", _TOP_LEVEL)
        # Order matters: later sections are checked against earlier ones.
        daemon = _build_daemon(mapping.get("daemon", {}), base_dir)
        nbd, nbd_written = _build_nbd(mapping.get("nbd", {}))
        pool = _build_pool(mapping.get("pool", {}), nbd, nbd_written)
        swap = _build_swap(mapping.get("swap", {}), daemon.state_dir, nbd, nbd_written)
        network = _build_network(mapping.get("network", {}))
        pressure = _build_pressure(mapping.get("pressure", {}))
        protect = _build_protect(mapping.get("protect", {}))
        nfs = _build_nfs(mapping.get("nfs", {}), daemon.state_dir)
        metrics = _build_metrics(mapping.get("metrics", {}))
        exports = _build_exports(mapping.get("exports", []), daemon.state_dir, swap, nbd)
    except ConfigError as error:
        error.source = source
        raise
    return Config(daemon=daemon, pool=pool, nbd=nbd, swap=swap, network=network,
                  pressure=pressure, protect=protect, nfs=nfs, metrics=metrics, exports=exports,
                  source=source)


def load(path: str | os.PathLike) -> Config:
    """Read and validate a TOML config file. Every failure, I/O included, is a ConfigError."""
    path = Path(path)
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        problem = f"cannot read: {error.strerror or error}"
        raise ConfigError(None, problem, source=source) from error
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(None, f"is not UTF-8 (byte {error.start})", source=source) from None
    except tomllib.TOMLDecodeError as error:
        # tomllib's message ends in "(at line L, column C)".
        raise ConfigError(None, f"TOML syntax error: {error}", source=source) from None
    # absolute(), not resolve(): relative paths follow the file as the operator named it.
    return parse(document, source=source, base_dir=path.absolute().parent)


# ---------------------------------------------------------------------------------------------
# The reference table (in README.md), generated from the schema.


def _toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # valid as a TOML basic string
    return str(value)


def reference_table() -> str:
    """The Markdown table of every key: key, type, default, allowed values, meaning."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = [
        "| key | type | default | allowed values | meaning |",
        "|---|---|---|---|---|",
    ]
    tables = [*_SECTIONS.items(), ("exports[]", _EXPORT)]
    for section, fields in tables:
        for field in fields:
            if field.default is _REQUIRED:
                default = "*required*"
            elif field.default is _OPTIONAL:
                default = "*none*"
            else:
                default = f"`{cell(_toml_literal(field.default))}`"
            allowed = field.kind.allowed + (f"; {field.also}" if field.also else "")
            rows.append(f"| `{section}.{field.name}` | {field.kind.type_name} | {default} "
                        f"| {cell(allowed)} | {cell(field.meaning)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference_table(), end="")
