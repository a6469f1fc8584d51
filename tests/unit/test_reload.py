"""What a reload changes: the pure plan, and the export registry's swap of exports."""

from pathlib import Path

import pytest

from netswap import config as configuration
from netswap.exports.registry import ExportError, ExportRegistry, ExportSpec
from netswap.reload import plan_reload

MiB = 1 << 20


def parse(**sections):
    return configuration.parse({"daemon": {"state_dir": "/tmp/netswap-reload"}, **sections})


def test_live_keys_apply_and_restart_keys_are_kept_and_named():
    old = parse()
    new = parse(daemon={"state_dir": "/tmp/netswap-reload", "workers": 3, "log_level": "debug"},
                nbd={"max_inflight": 9, "listen": ["127.0.0.1:1"]},
                pool={"non_swap_exhausted": "enomem", "normal_budget": "128MiB"})
    effective, restart = plan_reload(old, new)
    assert restart == ["daemon.workers", "nbd.listen", "pool.normal_budget"]
    assert effective.daemon.workers == old.daemon.workers
    assert effective.nbd.listen == old.nbd.listen
    assert effective.pool.normal_budget == old.pool.normal_budget
    assert effective.daemon.log_level == "debug"
    assert effective.nbd.max_inflight == 9
    assert effective.pool.non_swap_exhausted == "enomem"


def test_every_nfs_key_needs_a_restart_and_a_reload_says_so():
    old = parse()
    new = parse(nfs={"swap_idle_timeout": "1m", "max_connections": 8, "portmapper": "off"})
    effective, restart = plan_reload(old, new)
    assert restart == ["nfs.max_connections", "nfs.portmapper", "nfs.swap_idle_timeout"]
    assert effective.nfs == old.nfs


def test_nothing_changed_needs_nothing():
    effective, restart = plan_reload(parse(), parse())
    assert restart == [] and effective == parse()


def spec(name, path, size=MiB, description=""):
    return ExportSpec(name=name, backend="file", path=path, size=size, read_only=False,
                      description=description)


def test_registry_reload_keeps_unchanged_replaces_changed_retires_removed(tmp_path: Path):
    a, b = spec("a", tmp_path / "a.img"), spec("b", tmp_path / "b.img")
    registry = ExportRegistry([a, b], None, tmp_path)
    try:
        export_a, export_b = registry.lookup("a"), registry.lookup("b")
        c = spec("c", tmp_path / "c.img")
        a2 = spec("a", tmp_path / "a.img", description="changed")
        added, removed = registry.reload([a2, c], None)
        assert (added, removed) == (["a", "c"], ["a", "b"])
        assert registry.lookup("b") is None and registry.lookup("c") is not None
        assert registry.lookup("a") is not export_a and registry.lookup("a").description == "changed"
        # Connections that still hold the old exports can keep using them.
        view = memoryview(bytearray(b"old conn"))
        export_b.backend.write_from(0, view, fua=False)
        added, removed = registry.reload([a2, c], None)
        assert (added, removed) == ([], [])
    finally:
        registry.close()


def test_registry_reload_that_cannot_open_changes_nothing(tmp_path: Path):
    a = spec("a", tmp_path / "a.img")
    registry = ExportRegistry([a], None, tmp_path)
    try:
        bad = ExportSpec(name="ro", backend="file", path=tmp_path / "missing.img", size=MiB,
                         read_only=True, description="")
        with pytest.raises(ExportError):
            registry.reload([a, bad], None)
        assert registry.lookup("a") is not None and registry.lookup("ro") is None
    finally:
        registry.close()
