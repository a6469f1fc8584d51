"""systemd unit files as systemd reads them."""

from __future__ import annotations

import subprocess


def unit_settings(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values, in order: a key may be given more than once."""
    settings: dict[tuple[str, str], list[str]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault((section, key.strip()), []).append(value.strip())
    return settings


def service_settings(text: str) -> dict[str, list[str]]:
    return {key: values for (section, key), values in unit_settings(text).items()
            if section == "Service"}


def timespan_seconds(span: str) -> float:
    # systemd-analyze parses the time span exactly as the manager will.
    out = subprocess.run(["systemd-analyze", "timespan", span], capture_output=True,
                         text=True, check=True).stdout
    usec = next(line.split(":", 1)[1] for line in out.splitlines() if "μs:" in line)
    return int(usec) / 1e6
