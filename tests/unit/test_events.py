"""Event counters are declared beside the code that counts them and every one is exported.

The collectors are assembled as daemon.py assembles them, over an otherwise idle daemon's
state; every declared event is counted once and must come out of /metrics under its name.
"""

import importlib
import pkgutil
import re
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import netswap
from netswap import config as configuration
from netswap.counters import EVENTS, SUBSYSTEMS, Counters
from netswap.metrics import DaemonCollector
from netswap.nbd.metrics import NbdCollector
from netswap.nfs.metrics import NfsCollector
from netswap.reserve.metrics import ReserveCollector
from netswap.reserve.pool import Pool
from netswap.reserve.tree import build_tree, pool_size
from netswap.swap.metrics import SwapCollector
from netswap.transport.metrics import TransportCollector

PACKAGE = Path(netswap.__file__).parent


def import_everything() -> None:
    """Declarations happen at import: load every module of the daemon."""
    for module in pkgutil.walk_packages([str(PACKAGE)], "netswap."):
        if module.name not in ("netswap.__main__", "netswap.config.__main__"):
            importlib.import_module(module.name)


def test_no_counter_is_counted_by_a_bare_name():
    """counters.inc takes a declaration: a string key would be a counter nobody exports."""
    bare = re.compile(r"\.inc\(\s*[\"']")
    offenders = [f"{path.relative_to(PACKAGE)}:{number}"
                 for path in PACKAGE.rglob("*.py")
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if bare.search(line)]
    assert offenders == []


def test_every_declared_event_is_exported_by_its_subsystem():
    import_everything()
    assert {event.subsystem for event in EVENTS.values()} <= set(SUBSYSTEMS)
    # What the C loops count (nfs/fastloop.py's live counts) is declared too.
    assert {"nfs_calls", "nfs_bytes", "c_loop_handoffs"} <= set(EVENTS)

    counters = Counters()
    for event in EVENTS.values():
        counters.inc(event, "x" if event.label else "")
    config = configuration.parse({"daemon": {"state_dir": "/tmp/netswap-events-test"},
                                  "pool": {"normal_budget": "32MiB", "headroom": "1MiB"}})
    tree = build_tree(config)
    pool = Pool(pool_size(config, tree), lock="off", min_normal=config.pool.normal_budget)
    try:
        registry = CollectorRegistry(auto_describe=False)
        for collector in (
                ReserveCollector(pool, tree, counters),
                TransportCollector(counters),
                NbdCollector(counters, lambda: 0, SimpleNamespace(open_exports=list)),
                NfsCollector(counters, None),
                SwapCollector(counters,
                              SimpleNamespace(attached_nodes=dict, node_slots=lambda: None),
                              dict, lambda: None),
                DaemonCollector(counters)):
            registry.register(collector)
        exported = {}
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for sample in family.samples:
                exported[sample.name] = exported.get(sample.name, 0) + sample.value
    finally:
        pool.close()
    missing = [event.metric for event in EVENTS.values() if exported.get(event.metric) != 1]
    assert missing == []


def test_an_event_is_declared_once():
    import_everything()
    from netswap.counters import declare
    event = next(iter(EVENTS.values()))
    try:
        declare(event.subsystem, event.key, event.metric, event.help, event.label)
    except ValueError as exc:
        assert event.key in str(exc)
    else:
        raise AssertionError("a second declaration of an event was taken")
