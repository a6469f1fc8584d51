"""Assembles the daemon: config -> pool -> exports -> NBD server, and runs it until a signal.

Order matters: the pool is locked before anything listens, so a node can never attach to a
daemon whose request memory is not in place; the listeners come last, so a failure to bind
leaves nothing half-started.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from . import __version__
from .config import Config
from .exports.registry import ExportRegistry
from .nbd.server import ListenError, NbdServer
from .reserve.pool import LockError, Pool

log = logging.getLogger("netswap")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run(config: Config) -> int:
    """Serve until SIGTERM or SIGINT; return the process exit status."""
    configure_logging(config.daemon.log_level)
    log.info("netswapd %s starting with %s", __version__, config.source)

    try:
        pool = Pool(config.pool.size, lock=config.pool.lock)
    except LockError as exc:
        log.error("pool.lock = %r: %s", config.pool.lock, exc)
        return 1
    log.info("pool: %d bytes, %s", pool.size, "locked" if pool.locked else "NOT locked")

    os.makedirs(config.daemon.state_dir, mode=0o700, exist_ok=True)
    swap = config.swap if config.swap.enabled else None
    try:
        registry = ExportRegistry(config.exports, swap, config.daemon.state_dir)
    except OSError as exc:
        log.error("cannot open exports: %s", exc)
        return 1

    server = NbdServer(config, pool, registry)
    try:
        server.start()
    except ListenError as exc:
        log.error("%s", exc)
        registry.close()
        return 1

    stop = threading.Event()

    def request_stop(signum, _frame) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    log.info("listening on %s", ", ".join(server.addresses))

    while not stop.wait(3600):
        pass

    clean = server.stop(config.daemon.shutdown_timeout)
    if not clean:
        log.warning("in-flight requests did not finish within %.0f s", config.daemon.shutdown_timeout)
    registry.close()  # flushes every backend: what was acknowledged is on disk
    log.info("stopped")
    return 0 if clean else 1
