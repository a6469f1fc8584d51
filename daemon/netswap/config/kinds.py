"""Value kinds: one per type of value a key can hold.

A kind checks and converts one raw TOML value, and says in words what it accepts (used verbatim
in errors and in the reference). Sizes and durations are the two value syntaxes that are more
than a TOML type. netswap-node's config (node/config.py) builds its own keys from these kinds,
so the two programs read sizes, durations and paths alike.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

from ..swap.nodes import NODE_NAME
from .errors import ConfigError, key_path

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


def describe_type(value) -> str:
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


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_power_of_two(n: int) -> bool:
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
    if is_integer(value):
        if value < 0:
            raise ConfigError(key, "is negative", value=value, allowed=SIZE_SYNTAX)
        return value
    if not isinstance(value, str):
        raise ConfigError(
            key, f"is {describe_type(value)}, not a size", value=value, allowed=SIZE_SYNTAX
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
    if is_integer(value) or isinstance(value, float):
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
            key, f"is {describe_type(value)}, not a duration", value=value,
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


class Kind:
    type_name: str  # the "type" column of the reference
    allowed: str  # the "allowed values" column, and the tail of every error about this key

    def convert(self, value, key: str):
        raise NotImplementedError

    def _reject(self, key: str, value, problem: str):
        raise ConfigError(key, problem, value=value, allowed=self.allowed)

    def _require_type(self, key, value, ok: bool, expected: str):
        if not ok:
            self._reject(key, value, f"is {describe_type(value)}, not {expected}")


class Boolean(Kind):
    type_name = "bool"
    allowed = "true or false"

    def convert(self, value, key):
        # Real TOML booleans only: "yes", 1 or "false" are far more often a mistake than intent.
        self._require_type(key, value, isinstance(value, bool), "a boolean")
        return value


class Integer(Kind):
    type_name = "int"

    def __init__(self, minimum: int, maximum: int, *, power_of_two: bool = False):
        self.minimum, self.maximum, self.power_of_two = minimum, maximum, power_of_two
        what = "a power of two" if power_of_two else "an integer"
        self.allowed = f"{what} from {minimum} to {maximum}"

    def convert(self, value, key):
        self._require_type(key, value, is_integer(value), "an integer")
        if not self.minimum <= value <= self.maximum:
            self._reject(key, value, "is out of range")
        if self.power_of_two and not is_power_of_two(value):
            self._reject(key, value, "is not a power of two")
        return value


class Number(Kind):
    """A TOML integer or float -> float; integers too, since "psi_enter = 10" means 10.0."""

    type_name = "float"

    def __init__(self, minimum: float, maximum: float):
        self.minimum, self.maximum = minimum, maximum
        self.allowed = f"a number from {minimum:g} to {maximum:g}"

    def convert(self, value, key):
        self._require_type(key, value, is_integer(value) or isinstance(value, float),
                           "a number")
        if not self.minimum <= value <= self.maximum:  # also refuses nan
            self._reject(key, value, "is out of range")
        return float(value)


class Choice(Kind):
    type_name = "str"

    def __init__(self, *options: str):
        self.options = options
        self.allowed = ", ".join(json.dumps(option) for option in options)

    def convert(self, value, key):
        self._require_type(key, value, isinstance(value, str), "a string")
        if value not in self.options:
            self._reject(key, value, "is not one of the choices")
        return value


class Text(Kind):
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


class InterfaceName(Kind):
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


class PathText(Kind):
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


class Size(Kind):
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
        if self.power_of_two and not is_power_of_two(size):
            self._reject(key, value, f"{size} bytes is not a power of two")
        return size


class Duration(Kind):
    type_name = "duration"
    allowed = DURATION_SYNTAX

    def convert(self, value, key):
        return parse_duration(value, key)


class WordOr(Kind):
    """A word (-> None: "auto", the daemon derives the value; "never", the thing is off) or
    a value of another kind."""

    def __init__(self, word: str, kind: Kind):
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


class UniqueStrings(Kind):
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


class ListenAddresses(UniqueStrings):
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
            host = ip_literal(ipaddress.IPv6Address, host_text)
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
                host = ip_literal(ipaddress.IPv4Address, host_text)
                if host is None:
                    # Host names other than localhost are refused: resolving them would make
                    # what the daemon listens on depend on DNS at boot time.
                    self._reject(key, text, f"{host_text!r} is not an IP address or \"localhost\"")
        if not re.fullmatch(r"[0-9]{1,5}", port_text, re.ASCII) or int(port_text) > 65535:
            self._reject(key, text, f"port {port_text!r} is not 0..65535")
        return host, int(port_text)


class Networks(UniqueStrings):
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


class NodeNetworks(Kind):
    """A table node name -> list of networks -> a tuple of (network, node), most specific
    network first, so that a lookup takes the first match."""

    type_name = "table of lists"
    allowed = ('a table of node = ["CIDR", ...] (node: a swap node name; networks as in '
               "swap.allow); a network may belong to one node only")

    def convert(self, value, key):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"is {describe_type(value)}, not a table", value=value,
                              allowed=self.allowed)
        owner: dict = {}
        for node, networks in value.items():
            item_key = key_path(key, str(node))
            if not NODE_NAME_RE.fullmatch(str(node)):
                raise ConfigError(item_key, "is not a swap node name", value=node,
                                  allowed=self.allowed)
            for network in Networks().convert(networks, item_key):
                if network in owner:
                    raise ConfigError(item_key, f"lists {network}, which belongs to node "
                                      f"{owner[network]!r} already", value=networks,
                                      allowed=self.allowed)
                owner[network] = str(node)
        return tuple(sorted(owner.items(), key=lambda item: -item[0].prefixlen))


class Uids(Kind):
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
            self._require_type(item_key, uid, is_integer(uid), "an integer")
            if not 0 <= uid <= 2**32 - 2:  # (uid_t)-1 is "no uid" to the kernel
                self._reject(item_key, uid, "is out of range")
            if uid in uids:
                self._reject(item_key, uid, "is listed twice")
            uids.append(uid)
        return tuple(uids)


# The swap node name rule, defined once in swap/nodes.py (which imports nothing of ours).
NODE_NAME_RE = NODE_NAME


class Secrets(Kind):
    """A table node name -> secret string -> a tuple of (node, secret bytes), sorted.

    Kept out of every repr (SwapConfig.secrets has repr=False) and never echoed in an error:
    a config error about a secret quotes the node, not the value.
    """

    type_name = "table of str"
    allowed = ("a table of node = \"secret\" (node: a swap node name; secret: 16 to 256 "
               "bytes of printable ASCII without \":\" or spaces)")

    def convert(self, value, key):
        if not isinstance(value, Mapping):  # the value may be a misplaced secret: not shown
            raise ConfigError(key, f"is {describe_type(value)}, not a table", allowed=self.allowed)
        pairs = []
        for node, secret in value.items():
            item_key = key_path(key, str(node))
            if not NODE_NAME_RE.fullmatch(str(node)):
                raise ConfigError(item_key, "is not a swap node name", allowed=self.allowed)
            if not isinstance(secret, str):
                raise ConfigError(item_key, f"is {describe_type(secret)}, not a string",
                                  allowed=self.allowed)
            # Printable ASCII without ":" (it ends the node part of "swap/<node>:<secret>")
            # and without spaces, so it survives every client's export-name handling.
            if not re.fullmatch(r"[!-9;-~]{16,256}", secret, re.ASCII):
                raise ConfigError(item_key, "is not 16 to 256 printable ASCII characters "
                                  "without \":\" or spaces (value not shown)", allowed=self.allowed)
            pairs.append((node, secret.encode()))
        return tuple(sorted(pairs))


def ip_literal(address_class, text: str) -> str | None:
    """The canonical spelling of an IP literal ("0::1" -> "::1"), or None if it is not one."""
    try:
        return str(address_class(text))
    except ValueError:
        return None


