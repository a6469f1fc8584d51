"""Assembles the daemon: config -> protection -> reserve tree -> pool -> exports -> server.

Order matters: the process is protected (mlockall, OOM score, IO_FLUSHER) and the pool is
sized from the reserve tree and locked before anything listens, so a node can never attach
to a daemon whose reserve is not in place; the listeners come last, so a failure to bind
leaves nothing half-started.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal

from . import __version__
from .config import Config, ConfigError
from .counters import Counters
from .exports.lifecycle import Lifecycle
from .exports.registry import ExportRegistry
from .metrics import NetswapCollector, serve
from .nbd.server import ListenError, NbdServer
from .netpolicy import ShapeError, Shaper
from .pressure import PressureMonitor
from .protect import ProtectError, protect_process
from .reserve.pool import LockError, Pool
from .reserve.tree import build_tree, pool_size, render

log = logging.getLogger("netswap")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def run(config: Config) -> int:
    """Serve until SIGTERM or SIGINT; return the process exit status."""
    # Block the stop signals before any thread exists, so every thread inherits the mask and
    # the main thread alone takes them with sigwait. A Python handler would only run when
    # the main thread next wakes, and the kernel may deliver the signal to any thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    configure_logging(config.daemon.log_level)
    log.info("netswapd %s starting with %s", __version__, config.source)

    try:
        protect_process(config.protect)  # logs what took effect and what did not
    except ProtectError as exc:
        log.error("%s", exc)
        return 1

    tree = build_tree(config)
    try:
        size = pool_size(config, tree)
        pool = Pool(size, lock=config.pool.lock, min_normal=config.pool.normal_budget)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except LockError as exc:
        log.error("pool.lock = %r: %s", config.pool.lock, exc)
        return 1
    log.info("pool: %d bytes, %s; reserve tree:\n%s", pool.size,
             "locked" if pool.locked else "NOT locked", render(tree, with_usage=False))

    os.makedirs(config.daemon.state_dir, mode=0o700, exist_ok=True)
    swap = config.swap if config.swap.enabled else None
    try:
        registry = ExportRegistry(config.exports, swap, config.daemon.state_dir)
    except OSError as exc:
        log.error("cannot open exports: %s", exc)
        return 1

    shaper = None
    if config.network.shape:
        shaper = Shaper()
        try:
            shaper.install(config.network.interface, config.network.mark)
        except ShapeError as exc:
            log.error("network.shape on %r: %s", config.network.interface, exc)
            registry.close()
            return 1

    counters = Counters()
    lifecycle = Lifecycle(pool, tree, config, counters)
    pressure = PressureMonitor(config.pressure) if config.pressure.enabled else None
    server = NbdServer(config, pool, registry, lifecycle, counters, pressure)
    try:
        server.start()
    except ListenError as exc:
        log.error("%s", exc)
        if shaper is not None:
            shaper.remove()
        registry.close()
        return 1
    if pressure is not None:
        pressure.start()
    try:
        metrics = serve(NetswapCollector(pool, tree, counters, server, pressure), config.metrics.listen)
    except OSError as exc:
        log.error("%s", exc)
        server.stop(config.daemon.shutdown_timeout)
        if shaper is not None:
            shaper.remove()
        registry.close()
        return 1

    log.info("listening on %s", ", ".join(server.addresses))
    signum = signal.sigwait(_STOP_SIGNALS)
    log.info("received %s: stopping", signal.Signals(signum).name)

    if metrics is not None:
        metrics.stop()
    clean = server.stop(config.daemon.shutdown_timeout)
    if not clean:
        log.warning("in-flight requests did not finish within %.0f s", config.daemon.shutdown_timeout)
    if pressure is not None:
        pressure.stop()
    lifecycle.close()
    if shaper is not None:
        shaper.remove()
    registry.close()  # flushes every backend: what was acknowledged is on disk
    # One machine-readable line with everything counted, for operators and tests alike.
    log.info("final counters: %s", json.dumps({
        "pool": pool.stats(),
        "events": {f"{name}{'{' + label + '}' if label else ''}": value
                   for (name, label), value in sorted(counters.snapshot().items())},
    }, sort_keys=True))
    log.info("stopped")
    return 0 if clean else 1


def reserve_report(config: Config) -> str:
    """What `netswapd reserve` prints: the reserve tree, the pool it sizes, the protection."""
    tree = build_tree(config)
    size = pool_size(config, tree)
    lines = [
        render(tree),
        "",
        f"pool: {size} bytes = reserve tree {tree.total} + pool.headroom {config.pool.headroom}"
        if config.pool.size is None else f"pool: {size} bytes (pool.size; the tree needs {tree.total} + headroom)",
        f"watermark: {tree.find('unrouted').total} at start (unrouted)"
        + (f"; each attached node raises it by {tree.find('nbd').children[-1].each}"
           if config.swap.enabled else "; swap exports disabled"),
    ]
    # The same steps the daemon takes at start, so that what this command reports is what
    # this user, with these capabilities, would get.
    protection = protect_process(config.protect)
    state = dataclasses.replace(protection, problems=[]).summary()
    lines.append(f"protection (as this command got it): {state}")
    lines.extend(f"  {problem}" for problem in protection.problems)
    return "\n".join(lines)
