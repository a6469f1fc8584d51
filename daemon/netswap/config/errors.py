"""ConfigError: a configuration problem, located precisely enough for an operator to fix it.

Every problem with a netswapd or netswap-node config is one, naming the file, the full key path,
the offending value and what would be accepted.
"""

from __future__ import annotations

import json
import re
import reprlib


class _Absent:
    """Marks "no value": a key missing from the file, or an error about no particular value."""

    def __repr__(self) -> str:
        return "<absent>"

    def __reduce__(self):
        # Unpickle to the one instance, so that `value is ABSENT` holds in a ConfigError
        # that crossed a process boundary.
        return "ABSENT"


ABSENT = _Absent()

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

    def __init__(self, key, problem, *, value=ABSENT, allowed=None, source=None):
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
            if self.value is ABSENT:
                parts.append(self.key)
            else:
                parts.append(f"{self.key} = {_value_repr.repr(self.value)}")
        parts.append(self.problem)
        message = ": ".join(parts)
        if self.allowed:
            message += f"; allowed: {self.allowed}"
        return message



def key_path(prefix: str, name: str) -> str:
    """The full path of key `name` in table `prefix`, as errors name it."""
    # Quote keys that are not TOML bare keys, so `daemon."log level"` reads as one key.
    shown = name if re.fullmatch(r"[A-Za-z0-9_-]+", name, re.ASCII) else json.dumps(name)
    return f"{prefix}.{shown}" if prefix else shown
