"""The configuration reference: a Markdown table of every key, generated from the schema.

docs/config-reference.md carries its output (tests/unit/test_config.py checks that it is current);
regenerate it with `python3 -m netswap.config`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from .schema import EXPORT, OPTIONAL, REQUIRED, SECTIONS


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
    tables = [*SECTIONS.items(), ("exports[]", EXPORT)]
    for section, fields in tables:
        for field in fields:
            if field.default is REQUIRED:
                default = "*required*"
            elif field.default is OPTIONAL:
                default = "*none*"
            else:
                default = f"`{cell(_toml_literal(field.default))}`"
            allowed = field.kind.allowed + (f"; {field.also}" if field.also else "")
            rows.append(f"| `{section}.{field.name}` | {field.kind.type_name} | {default} "
                        f"| {cell(allowed)} | {cell(field.meaning)} |")
    return "\n".join(rows) + "\n"
