"""Rules between keys: what cannot be stated per key in the schema.

One builder per section turns its checked table into the section object, after the rules that
tie its keys to each other or to an earlier section (pool.normal_budget >= nbd.max_request,
paths inside daemon.state_dir, unique export names). Each error names both keys as the
operator wrote them. Keys that moved to another section are read under their old name too
(move_keys), with a warning that names the new one.
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError, key_path
from .kinds import describe_type
from .schema import (
    EXPORT,
    SECTIONS,
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
    read_table,
)


log = logging.getLogger(__name__)

# Keys that moved, old (section, name) -> new (section, name). What NBD and NFS share about
# swap nodes lives in [swap]; configs written before still load, and say what to change.
MOVED = {
    ("nfs", "nodes"): ("swap", "nodes"),
}


def move_keys(document: Mapping, source: str) -> Mapping:
    """The document with every key in MOVED under its new name, each one found logged as a
    warning that names the new key. Both names given, with values that differ once read, is
    an error naming both: which one was meant cannot be told."""
    moved = dict(document)
    for (old_section, name), (new_section, new_name) in MOVED.items():
        old_table = moved.get(old_section)
        if not isinstance(old_table, Mapping) or name not in old_table:
            continue  # a non-table is reported when the section is read
        old_key, new_key = key_path(old_section, name), key_path(new_section, new_name)
        new_table = moved.get(new_section, {})
        if not isinstance(new_table, Mapping):
            continue
        value = old_table[name]
        kind = next(k.kind for k in SECTIONS[new_section] if k.name == new_name)
        read = kind.convert(value, old_key)  # so that an error names the key as written
        if new_name in new_table and read != kind.convert(new_table[new_name], new_key):
            raise ConfigError(old_key, f"is set, and so is {new_key}, to something else; "
                              f"{old_key} is the old name of {new_key}",
                              value=value, allowed=f"{new_key} alone")
        log.warning("%s: %s is deprecated, it is now %s: move it there", source, old_key,
                    new_key)
        moved[old_section] = {k: v for k, v in old_table.items() if k != name}
        moved[new_section] = {**new_table, new_name: new_table.get(new_name, value)}
    return moved


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


def build_daemon(table, base_dir: Path | None) -> DaemonConfig:
    values, written = read_table(table, "daemon", SECTIONS["daemon"])
    state_dir = values["state_dir"]
    if not state_dir.is_absolute():
        if base_dir is None:
            raise ConfigError(
                "daemon.state_dir", "is relative, and there is no config file to resolve it "
                "against", value=written["state_dir"], allowed="an absolute path",
            )
        values["state_dir"] = _under(base_dir, state_dir)
    return DaemonConfig(**values)


def build_pool(table, nbd: NbdConfig, nbd_written: dict) -> PoolConfig:
    values, written = read_table(table, "pool", SECTIONS["pool"])
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


def build_nbd(table) -> tuple[NbdConfig, dict]:
    values, written = read_table(table, "nbd", SECTIONS["nbd"])
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


def build_swap(table, state_dir: Path, nbd: NbdConfig, nbd_written: dict) -> SwapConfig:
    values, written = read_table(table, "swap", SECTIONS["swap"])
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


def build_network(table) -> NetworkConfig:
    values, written = read_table(table, "network", SECTIONS["network"])
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


def build_pressure(table) -> PressureConfig:
    values, written = read_table(table, "pressure", SECTIONS["pressure"])
    # Hysteresis: emergency mode ends on the far side of a gap from where it starts, or a
    # reading hovering at one threshold would flip it on and off every interval. Checked even
    # when disabled, so that enabling the monitor later cannot turn up a broken pair.
    _require_relation("pressure.psi_exit", values["psi_exit"], written["psi_exit"], "<",
                      "pressure.psi_enter", values["psi_enter"], written["psi_enter"])
    _require_relation("pressure.available_exit", values["available_exit"],
                      written["available_exit"], ">", "pressure.available_enter",
                      values["available_enter"], written["available_enter"], in_bytes=True)
    return PressureConfig(**values)


def build_protect(table) -> ProtectConfig:
    values, _ = read_table(table, "protect", SECTIONS["protect"])  # no rules between its keys
    return ProtectConfig(**values)


def build_nfs(table, state_dir: Path) -> NfsConfig:
    values, written = read_table(table, "nfs", SECTIONS["nfs"])
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


def build_metrics(table) -> MetricsConfig:
    values, _ = read_table(table, "metrics", SECTIONS["metrics"])
    return MetricsConfig(**values)


def build_exports(array, state_dir: Path, swap: SwapConfig, nbd: NbdConfig):
    if not isinstance(array, (list, tuple)):
        raise ConfigError("exports", f"is {describe_type(array)}, not an array of tables",
                          value=array, allowed="[[exports]] tables")
    exports: list[ExportConfig] = []
    owner_of_name: dict[str, str] = {}
    owner_of_path: dict[Path, str] = {}
    for index, table in enumerate(array):
        prefix = f"exports[{index}]"
        values, written = read_table(table, prefix, EXPORT, header="[[exports]]")

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
