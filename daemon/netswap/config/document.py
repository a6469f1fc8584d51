"""Reading a config: a TOML file or an already-parsed document in, a validated Config out."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError
from .kinds import describe_type
from .rules import (
    build_daemon,
    build_exports,
    build_metrics,
    build_nbd,
    build_network,
    build_nfs,
    build_pool,
    build_pressure,
    build_protect,
    build_swap,
    move_keys,
)
from .schema import TOP_LEVEL, Config, reject_unknown_keys


def parse(mapping: Mapping, source: str = "<string>", *, base_dir: Path | None = None) -> Config:
    """Validate an already-parsed TOML document. Missing keys take their defaults.

    base_dir is what a relative daemon.state_dir is resolved against (load() passes the
    config file's directory); without it a relative state_dir is an error.
    """
    if base_dir is not None:
        base_dir = Path(base_dir).absolute()
    try:
        if not isinstance(mapping, Mapping):
            raise ConfigError(None, f"the document is {describe_type(mapping)}, not a table")
        reject_unknown_keys(mapping, "", TOP_LEVEL)
        mapping = move_keys(mapping, source)
        # Order matters: later sections are checked against earlier ones.
        daemon = build_daemon(mapping.get("daemon", {}), base_dir)
        nbd, nbd_written = build_nbd(mapping.get("nbd", {}))
        pool = build_pool(mapping.get("pool", {}), nbd, nbd_written)
        swap = build_swap(mapping.get("swap", {}), daemon.state_dir, nbd, nbd_written)
        network = build_network(mapping.get("network", {}))
        pressure = build_pressure(mapping.get("pressure", {}))
        protect = build_protect(mapping.get("protect", {}))
        nfs = build_nfs(mapping.get("nfs", {}), daemon.state_dir)
        metrics = build_metrics(mapping.get("metrics", {}))
        exports = build_exports(mapping.get("exports", []), daemon.state_dir, swap, nbd)
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
