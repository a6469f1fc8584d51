"""Assembles the daemon: config -> protection -> reserve tree -> pool -> exports -> server.

Order matters: the process is protected (mlockall, OOM score, IO_FLUSHER) and the pool is
sized from the reserve tree, mapped and locked before anything listens; the listeners come
last, so a failure to bind leaves nothing half-started. Faulting the pool in takes seconds
per GiB, so it runs in the background and the daemon listens at once: the pool hands out only
memory already faulted in and locked, and a node's attach waits until its reserve is backed
by memory faulted in (PoolGroup.connect), so a node can never attach to a daemon whose
reserve is not in place. Everything started is registered on one ExitStack, so every
way out (a start-up failure or a signal) undoes exactly what was done, in reverse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time

from . import __version__
from .access import BINDINGS_FILE, AccessControl, SwapBindings
from .config import Config, ConfigError, load
from .control import ControlServer
from .counters import Counters, declare
from .exports.registry import ExportError, ExportRegistry
from .metrics import DaemonCollector, serve
from .nbd.metrics import NbdCollector
from .nbd.server import NbdServer
from .nbd.tls import server_context
from .netpolicy import ShapeError, Shaper, swap_socket_policy
from .nfs.metrics import NfsCollector
from .nfs.service import NfsService
from .operations import Operations
from .pressure import PressureMonitor
from .protect import ProtectError, protect_process
from .reload import plan_reload
from .reserve.metrics import ReserveCollector
from .reserve.pool import LockError, Pool, PoolError
from .reserve.tree import build_tree, pool_size, render
from .swap.attach import WIPES, Lifecycle
from .swap.metrics import SwapCollector
from .systemd import Notifier, adopt_listen_fds, release_unclaimed_listeners
from .transport.listeners import ListenError
from .transport.metrics import TransportCollector
from .transport.sender import SEND_TIMEOUTS, ReplySender, SendPoller
from .transport.workers import WorkerPool

CONFIG_RELOADS = declare(
    "daemon", "reloads", "netswap_config_reloads_total",
    "Configuration reloads (SIGHUP, netswapctl reload), by result (applied, rejected).",
    label="result")

log = logging.getLogger("netswap")

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_SIGNALS = _STOP_SIGNALS | {signal.SIGHUP}


class StartError(Exception):
    """The daemon cannot start; the message says why (already formatted for the log)."""


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def config_summary(config: Config) -> str:
    """The effective configuration in one line, for the startup log."""
    return (
        f"state_dir={config.daemon.state_dir} workers={config.daemon.workers} "
        f"listen={[f'{h}:{p}' for h, p in config.nbd.listen]} unix={config.nbd.unix_socket} "
        f"max_request={config.nbd.max_request} max_inflight={config.nbd.max_inflight} "
        f"swap={'on' if config.swap.enabled else 'off'} (size {config.swap.size}, "
        f"max_nodes {config.swap.max_nodes}) exports={[e.name for e in config.exports]} "
        f"non_swap_exhausted={config.pool.non_swap_exhausted} "
        f"pressure={'on' if config.pressure.enabled else 'off'} "
        f"metrics={[f'{h}:{p}' for h, p in config.metrics.listen]} "
        f"tls={config.nbd.tls} unix_socket_tls={config.nbd.unix_socket_tls}"
    )


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.notifier = Notifier.from_environment()
        self.counters = Counters()
        self.started = time.monotonic()
        self._exit = contextlib.ExitStack()
        self._clean = True  # False once in-flight requests outlived the shutdown timeout

    # Start ------------------------------------------------------------------------

    def start(self) -> None:
        """Bring every part up in order; on failure undo what was done and raise StartError."""
        try:
            self._start()
        except BaseException:
            self._exit.close()
            raise

    def _start(self) -> None:
        config, undo = self.config, self._exit
        log.info("netswapd %s starting with %s: %s", __version__, config.source,
                 config_summary(config))
        try:
            self.protection = protect_process(config.protect)  # logs what took effect
        except ProtectError as exc:
            raise StartError(str(exc)) from exc

        self.tree = build_tree(config)
        try:
            self.pool = Pool(pool_size(config, self.tree), lock=config.pool.lock,
                             min_normal=config.pool.normal_budget, background=True)
        except ConfigError as exc:
            raise StartError(str(exc)) from exc
        except LockError as exc:
            raise StartError(f"pool.lock = {config.pool.lock!r}: {exc}") from exc
        except PoolError as exc:
            raise StartError(str(exc)) from exc
        log.info("pool: %d bytes, %s; prefaulting it in the background; reserve tree:\n%s",
                 self.pool.size, "locked" if self.pool.lock_applied else "NOT locked",
                 render(self.tree, with_usage=False))
        prefault = threading.Thread(target=self._watch_prefault, name="pool-prefault",
                                    daemon=True)
        prefault.start()

        os.makedirs(config.daemon.state_dir, mode=0o700, exist_ok=True)
        try:
            self.registry = ExportRegistry(
                config.exports, config.swap if config.swap.enabled else None,
                config.daemon.state_dir)
        except OSError as exc:
            raise StartError(f"cannot open exports: {exc}") from exc
        # Flushes every backend on the way out: what was acknowledged is on disk.
        undo.callback(self.registry.close)

        if config.network.shape:
            shaper = Shaper()
            try:
                shaper.install(config.network.interface, config.network.mark)
            except ShapeError as exc:
                raise StartError(f"network.shape on {config.network.interface!r}: {exc}") from exc
            undo.callback(shaper.remove)

        # Connects the unrouted group: waits until the pool has faulted in enough to back it.
        self.lifecycle = Lifecycle(self.pool, self.tree, config, self.counters)
        undo.callback(self.lifecycle.close)
        self._wipe_at_start()
        try:
            bindings = SwapBindings(config.daemon.state_dir / BINDINGS_FILE)
        except OSError as exc:
            raise StartError(str(exc)) from exc
        self.access = AccessControl(self.registry, self.lifecycle, config, self.counters, bindings)
        if config.swap.bind == "secret":
            _warn_if_readable(config.source, "swap.secrets")
        self.pressure = PressureMonitor(config.pressure) if config.pressure.enabled else None
        # The I/O workers serve NBD and NFS alike (one fair queue over every node); each
        # front end has its own send poller, so each cuts off stalled clients after its own
        # send_timeout. Stopped last, and only once no connection can use them any more.
        self.workers = WorkerPool(config.daemon.workers)
        undo.callback(self._stop_if_clean, self.workers)
        nbd_sends = self._send_poller(config.nbd.send_timeout)
        undo.callback(self._stop_if_clean, nbd_sends)
        try:
            adopt_listen_fds()  # the listeners below take these before binding their own
        except ValueError as exc:
            raise StartError(str(exc)) from exc
        undo.callback(release_unclaimed_listeners)
        try:
            self.server = NbdServer(config, self.pool, self.registry, self.lifecycle,
                                    self.workers, nbd_sends, self.counters, self.pressure,
                                    access=self.access)
        except ConfigError as exc:  # a TLS file that cannot be used
            raise StartError(str(exc)) from exc
        try:
            self.server.start()
        except ListenError as exc:
            raise StartError(str(exc)) from exc
        undo.callback(self._stop_server)
        self.nfs = None
        if config.nfs.enabled:
            self.nfs = self._start_nfs(config)
            undo.callback(self._stop_nfs)
        unclaimed = release_unclaimed_listeners()
        if unclaimed:
            raise StartError(f"systemd passed sockets no listener in the config takes (the socket "
                             f"unit and the config disagree): {', '.join(unclaimed)}")
        if self.pressure is not None:
            self.pressure.start()
            undo.callback(self.pressure.stop)

        nfs = self.nfs
        collectors = [
            ReserveCollector(self.pool, self.tree, self.counters),
            TransportCollector(self.counters),
            NbdCollector(self.counters, lambda: self.server.connection_count, self.registry),
            NfsCollector(self.counters, nfs),
            SwapCollector(self.counters, self.lifecycle, self.registry.swap_exports,
                          lambda: nfs.exports.swap if nfs is not None else None),
            DaemonCollector(self.counters, self.pressure, protection=self.protection),
        ]
        try:
            metrics = serve(collectors, config.metrics.listen)
        except OSError as exc:
            raise StartError(str(exc)) from exc
        if metrics is not None:
            undo.callback(metrics.stop)

        if config.daemon.control_socket is not None:
            operations = Operations(server=self.server, registry=self.registry,
                                    lifecycle=self.lifecycle, access=self.access, pool=self.pool, tree=self.tree,
                                    pressure=self.pressure, started=self.started, nfs=self.nfs)
            control = ControlServer(config.daemon.control_socket, operations.commands())
            try:
                control.start()
            except OSError as exc:
                raise StartError(str(exc)) from exc
            undo.callback(control.stop)

        log.info("listening on %s", ", ".join(self.server.addresses))
        self.notifier.ready(self._status())
        # Each ping must prove the data path still moves: a job reaches an I/O worker
        # within half the ping interval, or no ping (and systemd restarts a wedged daemon).
        interval = self.notifier.watchdog_interval or 0
        self.notifier.start_watchdog(lambda: self.server.healthy(interval / 2))
        undo.callback(self.notifier.stop_watchdog)

    def _watch_prefault(self) -> None:
        """Log the end of the pool's prefault (the pool is never closed while the daemon
        runs)."""
        self.pool.wait_prefaulted()
        stats = self.pool.prefault_stats()
        log.info("pool: %d bytes faulted in%s in %.2f s", self.pool.size,
                 " and locked" if self.pool.locked else "", stats["elapsed_ns"] / 1e9)

    def _send_poller(self, send_timeout: float) -> SendPoller:
        """A poller finishing a front end's replies, which disconnects a client that takes
        none of them for `send_timeout` seconds."""
        def timed_out(sender: ReplySender) -> None:
            self.counters.inc(SEND_TIMEOUTS)
            log.warning("%s: took no replies for %.0f s: disconnecting", sender.peer,
                        poller.send_timeout)
            sender.cut_off()

        poller = SendPoller(send_timeout, timed_out)
        return poller

    def _start_nfs(self, config) -> "NfsService":
        nfs_sends = self._send_poller(config.nfs.send_timeout)
        self._exit.callback(self._stop_if_clean, nfs_sends)
        try:
            service = NfsService(config, self.pool, self.counters, self.workers, nfs_sends,
                                 self.lifecycle, swap_socket_policy(config))
            service.start(wipe=config.swap.wipe)
        except (ListenError, OSError, ValueError) as exc:
            raise StartError(f"nfs: {exc}") from exc
        return service

    def _wipe_at_start(self) -> None:
        """wipe = true: what a previous run left (swap images, static exports) is discarded
        before any client can connect. A failure stops the start: the operator asked for
        that data to be gone, and serving it would break the promise."""
        wiped = []
        try:
            if self.config.swap.enabled and self.config.swap.wipe:
                for node in self.registry.discard_swap_images():
                    self.counters.inc(WIPES, f"swap/{node}")
                    wiped.append(f"swap/{node}")
            for spec in self.config.exports:
                if spec.wipe:
                    self.lifecycle.wipe(self.registry.lookup(spec.name), "daemon start")
        except OSError as exc:
            raise StartError(f"wipe at start: {exc}") from exc
        if wiped:
            log.info("wiped at start (swap.wipe): %s", ", ".join(wiped))

    def _status(self) -> str:
        return (f"serving {len(self.config.exports)} static exports, "
                f"{len(self.lifecycle.attached_nodes())} swap nodes attached, "
                f"pool {self.pool.size >> 20} MiB")

    # Run --------------------------------------------------------------------------

    def serve_until_stopped(self) -> bool:
        """Handle SIGHUP (reload) until SIGTERM/SIGINT; then stop. True if the stop was clean."""
        while True:
            signum = signal.sigwait(_SIGNALS)
            if signum == signal.SIGHUP:
                self.reload()
                continue
            log.info("received %s: stopping", signal.Signals(signum).name)
            break
        self.notifier.stopping("stopping: finishing in-flight requests")
        self._exit.close()
        self._log_final_counters()
        log.info("stopped")
        return self._clean

    def reload(self) -> None:
        """Re-read the config file; apply what can change live, keep the rest (and say so)."""
        self.notifier.reloading(f"reloading {self.config.source}")
        try:
            new = load(self.config.source)
            effective, restart = plan_reload(self.config, new)
            # Before anything changes: a certificate that cannot be used rejects the reload.
            tls_context = server_context(effective.nbd)
            added, removed = self.registry.reload(
                effective.exports, effective.swap if effective.swap.enabled else None)
        except (ConfigError, ExportError) as exc:
            self.counters.inc(CONFIG_RELOADS, "rejected")
            log.error("reload rejected, the running configuration stays: %s", exc)
            self.notifier.ready_after_reload(f"reload rejected: {exc}; running config unchanged")
            return
        self.server.apply_config(effective, tls_context)
        self.lifecycle.apply_config(effective)
        self.access.apply_config(effective)
        logging.getLogger().setLevel(getattr(logging, effective.daemon.log_level.upper()))
        self.config = effective
        self.counters.inc(CONFIG_RELOADS, "applied")
        log.info("reloaded %s: exports added %s, removed %s", new.source, added or "none",
                 removed or "none")
        if restart:
            log.warning("reload: %s changed but only take effect after a restart",
                        ", ".join(restart))
        self.notifier.ready_after_reload(self._status())

    # Stop ---------------------------------------------------------------------------

    def _stop_server(self) -> None:
        timeout = self.config.daemon.shutdown_timeout
        if not self.server.stop(timeout):
            self._clean = False
            log.warning("in-flight requests did not finish within %.0f s", timeout)

    def _stop_if_clean(self, part: WorkerPool | SendPoller) -> None:
        # After a stop that was not clean, connection threads may still submit and send:
        # the workers and pollers they use stay up (the process is about to exit anyway).
        if self._clean:
            part.stop()

    def _stop_nfs(self) -> None:
        timeout = self.config.daemon.shutdown_timeout
        if not self.nfs.stop(timeout):
            self._clean = False
            log.warning("NFS calls in flight did not finish within %.0f s", timeout)

    def _log_final_counters(self) -> None:
        # One machine-readable line with everything counted, for operators and tests alike.
        log.info("final counters: %s", json.dumps({
            "pool": self.pool.stats(),
            "events": {f"{name}{'{' + label + '}' if label else ''}": value
                       for (name, label), value in sorted(self.counters.snapshot().items())},
        }, sort_keys=True))


def _warn_if_readable(path: str, what: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # a config given as a string, or gone since it was read: nothing to check
    if mode & 0o077:
        log.warning("%s holds %s but is readable by group/others (mode %o): chmod 600 it",
                    path, what, mode & 0o777)


def run(config: Config) -> int:
    """Serve until SIGTERM or SIGINT; return the process exit status."""
    # Block the signals before any thread exists, so every thread inherits the mask and the
    # main thread alone takes them with sigwait. A Python handler would only run when the
    # main thread next wakes, and the kernel may deliver the signal to any thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    configure_logging(config.daemon.log_level)
    daemon = Daemon(config)
    try:
        daemon.start()
    except StartError as exc:
        log.error("%s", exc)
        return 2 if isinstance(exc.__cause__, ConfigError) else 1
    return 0 if daemon.serve_until_stopped() else 1


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
