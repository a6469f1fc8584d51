"""Memory pressure on this server, and netswapd's emergency mode.

netswapd serves swap: the nodes it serves swap hardest exactly when memory is short, and so may
this server. While memory here is short, netswapd is in emergency mode (non-swap exports are
throttled, swap proceeds; what to do is the caller's, through on_change). Two signals, either
of which starts it:

- PSI: the share of time in which some task stalled on memory ("some" in
  /proc/pressure/memory), as the kernel's 10-second average, avg10. It measures the cost of
  the shortage rather than guessing it from free-page counts.
- MemAvailable (psutil's `available`): the kernel's estimate of memory obtainable without
  swapping, for when the box runs low before anything stalls.

Emergency mode starts when avg10 >= psi_enter or available <= available_enter, and ends only
when avg10 < psi_exit and available > available_exit: the gap between the two thresholds
(hysteresis) keeps a reading that hovers at a threshold from flipping the mode every interval.
The rule is EmergencyRule.decide, a pure function of the readings.

PressureMonitor reads both every `interval` on its own thread. Where the kernel allows, it
also registers a PSI trigger (a poll(POLLPRI) wakeup when the "some" stall time in a 2-second
window reaches psi_enter percent of it). avg10 is an exponential average over 10 s: a stall
rate of 40% takes about 7 s to lift it past 20%, and a rate of 20% never does; the trigger
reports the stall rate of the last 2 s. A fired trigger counts as PSI at psi_enter for
TRIGGER_HOLD seconds (avg10's own horizon), so that emergency mode starts at once and does not
end before avg10 has caught up. How soon the kernel notices depends on the daemon's rights:
with CAP_SYS_RESOURCE it checks the trigger ten times per window, without it only on PSI's
2-second cycle. Measured on kernel 6.18 without it: bursts of 50-68% stall fire a 35% trigger
2-6 s in, while avg10 stays at 10-25%, but for 2 triggers in 10 the kernel raised no event
at all; avg10 then still starts emergency mode, later. MemAvailable has no notification,
so the periodic reads go on with or without triggers. Without PSI (a kernel without
CONFIG_PSI, or booted with psi=0) the monitor says so once and decides on available memory
alone.

Public API:
    Reading(psi_some_avg10, available_bytes, psi_triggered=False)
    EmergencyRule(psi_enter, psi_exit, available_enter, available_exit)
        .from_config(config), .decide(emergency, reading) -> bool, .why(...) -> str
    PressureMonitor(config, on_change=None, *, psi_path="/proc/pressure/memory")
        .start(), .stop(); .emergency .transitions .psi_some_avg10 .available_bytes
        .psi_available .psi_triggers .trigger_events .trigger_events_ignored
    parse_psi_some(text) -> PsiSome(avg10, total_us)
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import psutil

log = logging.getLogger("netswap.pressure")

MEMORY_PSI = "/proc/pressure/memory"
# The PSI trigger window. 2 s because a process without CAP_SYS_RESOURCE may only use
# multiples of 2 s (the kernel answers EINVAL otherwise), and because PSI aggregates every
# 2 s anyway.
TRIGGER_WINDOW_US = 2_000_000
# How long a fired trigger keeps counting as PSI at psi_enter: avg10's horizon, after which
# avg10 itself reflects the stall the trigger reported.
TRIGGER_HOLD = 10.0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


class PsiSome(NamedTuple):
    """The "some" line of a PSI file."""

    avg10: float  # percent of the last ~10 s in which some task stalled
    total_us: int  # stall time since boot (or since the cgroup was made), microseconds


def parse_psi_some(text: str) -> PsiSome:
    """The "some" line of a PSI file ("some avg10=1.23 avg60=... avg300=... total=...")."""
    for line in text.splitlines():
        kind, _, fields = line.partition(" ")
        if kind == "some":
            values = dict(field.split("=", 1) for field in fields.split())
            return PsiSome(float(values["avg10"]), int(values["total"]))
    raise ValueError(f"no 'some' line in PSI text {text!r}")


@dataclass(frozen=True)
class Reading:
    """One look at this server's memory."""

    psi_some_avg10: float | None  # percent; None where PSI is unavailable
    available_bytes: int
    psi_triggered: bool = False  # a PSI trigger fired within the last TRIGGER_HOLD seconds


@dataclass(frozen=True)
class EmergencyRule:
    """When emergency mode starts and ends; see the module docstring."""

    psi_enter: float
    psi_exit: float
    available_enter: int
    available_exit: int

    def __post_init__(self) -> None:
        # Without the gaps there is no hysteresis; the config (config/rules.py) enforces the same.
        if not self.psi_exit < self.psi_enter:
            raise ValueError(f"psi_exit {self.psi_exit} must be below psi_enter "
                             f"{self.psi_enter}")
        if not self.available_exit > self.available_enter:
            raise ValueError(f"available_exit {self.available_exit} must be above "
                             f"available_enter {self.available_enter}")

    @classmethod
    def from_config(cls, config) -> EmergencyRule:
        """From anything with the [pressure] attribute names (a PressureConfig)."""
        return cls(psi_enter=config.psi_enter, psi_exit=config.psi_exit,
                   available_enter=config.available_enter, available_exit=config.available_exit)

    def _pressure_high(self, reading: Reading) -> bool:
        return (reading.psi_triggered
                or (reading.psi_some_avg10 is not None
                    and reading.psi_some_avg10 >= self.psi_enter)
                or reading.available_bytes <= self.available_enter)

    def _pressure_gone(self, reading: Reading) -> bool:
        return (not reading.psi_triggered
                and (reading.psi_some_avg10 is None or reading.psi_some_avg10 < self.psi_exit)
                and reading.available_bytes > self.available_exit)

    def decide(self, emergency: bool, reading: Reading) -> bool:
        """Whether emergency mode holds after `reading`, given whether it held before."""
        if emergency:
            return not self._pressure_gone(reading)
        return self._pressure_high(reading)

    def why(self, emergency: bool, reading: Reading) -> str:
        """The readings against the thresholds that matter for a mode of `emergency`, for
        the log line of a transition into it."""
        if emergency:
            parts = []
            if reading.psi_triggered:
                parts.append(f"PSI trigger: memory stalls >= {self.psi_enter:g}% of "
                             f"{TRIGGER_WINDOW_US // 1_000_000} s")
            if reading.psi_some_avg10 is not None and reading.psi_some_avg10 >= self.psi_enter:
                parts.append(f"memory PSI some avg10 {reading.psi_some_avg10:.2f}% >= "
                             f"{self.psi_enter:g}%")
            if reading.available_bytes <= self.available_enter:
                parts.append(f"available {_mib(reading.available_bytes)} <= "
                             f"{_mib(self.available_enter)}")
            return ", ".join(parts)
        psi = ("no PSI" if reading.psi_some_avg10 is None else
               f"memory PSI some avg10 {reading.psi_some_avg10:.2f}% < {self.psi_exit:g}%")
        return (f"{psi}, available {_mib(reading.available_bytes)} > "
                f"{_mib(self.available_exit)}")


class PressureMonitor:
    """Watches memory pressure on a thread and keeps `emergency` up to date.

    config: anything with the [pressure] attribute names (a PressureConfig): enabled,
    interval (seconds), psi_enter, psi_exit, available_enter, available_exit.
    on_change(emergency) is called on each transition, on the monitor's thread; it should be
    quick (flip a flag, wake someone), and an exception from it is logged, not fatal.
    psi_path may name another PSI file of the same format, such as a cgroup v2
    memory.pressure, to watch a cgroup instead of the whole server.

    The attributes are plain values that other threads may read at any time.
    """

    def __init__(self, config, on_change: Callable[[bool], None] | None = None, *,
                 psi_path: str = MEMORY_PSI) -> None:
        self.enabled = bool(config.enabled)
        self.interval = float(config.interval)
        self.rule = EmergencyRule.from_config(config)
        self.on_change = on_change
        self.psi_path = psi_path

        self.emergency = False
        self.transitions = 0
        self.psi_some_avg10: float | None = None
        self.available_bytes = 0
        self.psi_available = False  # PSI is being read
        self.psi_triggers = False  # a PSI trigger is registered
        self.trigger_events = 0  # times the trigger fired
        self.trigger_events_ignored = 0  # times it fired without the stall behind it

        self._psi_fd: int | None = None
        self._wake_fd: int | None = None
        self._last_trigger = -float("inf")  # time.monotonic() of the last trigger event
        self._trigger_stall_us = 0  # the trigger's threshold
        self._trigger_total_us = 0  # PSI's "some" total at the last event taken (or arming)
        self._entered_at = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Open PSI, register the trigger, and start watching. PSI's availability is known
        (psi_available, psi_triggers) when this returns; the first reading follows at once
        on the monitor's thread."""
        if self._thread is not None:
            raise RuntimeError("PressureMonitor already started")
        if not self.enabled:
            log.info("memory pressure monitor disabled (pressure.enabled = false)")
            return
        self._stopping = False
        self._open_psi()
        # stop() writes to this eventfd to end the wait at once instead of after interval.
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="netswap-pressure", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; returns once the monitor's thread has ended (at once unless an
        on_change call is running)."""
        if self._thread is None:
            return
        self._stopping = True
        os.eventfd_write(self._wake_fd, 1)
        self._thread.join()
        self._thread = None
        for fd in (self._psi_fd, self._wake_fd):
            if fd is not None:
                os.close(fd)
        self._psi_fd = self._wake_fd = None
        self.psi_triggers = False

    def __enter__(self) -> PressureMonitor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- PSI -----------------------------------------------------------------------------------

    def _open_psi(self) -> None:
        writable = True
        try:
            # Read-write: a trigger is registered by writing it to the file.
            fd = os.open(self.psi_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except PermissionError:
            writable = False
            try:
                fd = os.open(self.psi_path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                self._warn_no_psi(e)
                return
        except OSError as e:
            self._warn_no_psi(e)
            return
        try:
            parse_psi_some(os.pread(fd, 4096, 0).decode())
        except (OSError, ValueError) as e:
            # Some kernels keep the file but refuse to read it while PSI is disabled.
            os.close(fd)
            self._warn_no_psi(e)
            return
        self._psi_fd, self.psi_available = fd, True
        if writable:
            self._register_trigger()
        else:
            log.warning("%s is not writable, so no PSI trigger: reading it every %gs",
                        self.psi_path, self.interval)

    def _warn_no_psi(self, error: Exception) -> None:
        log.warning("memory PSI unavailable (%s: %s; a kernel without CONFIG_PSI or booted "
                    "with psi=0): emergency mode follows available memory only",
                    self.psi_path, error)

    def _register_trigger(self) -> None:
        stall_us = min(TRIGGER_WINDOW_US, max(1, round(self.rule.psi_enter / 100
                                                      * TRIGGER_WINDOW_US)))
        # The terminating NUL is part of the format: the kernel overwrites the last byte
        # written with one, so without it the window would lose its last digit.
        trigger = f"some {stall_us} {TRIGGER_WINDOW_US}\0".encode()
        total_us = self._read_psi_some().total_us
        try:
            os.write(self._psi_fd, trigger)
        except OSError as e:
            log.warning("PSI trigger %r refused (%s): reading %s every %gs instead",
                        trigger.rstrip(b"\0").decode(), errno.errorcode.get(e.errno, e),
                        self.psi_path, self.interval)
            return
        self.psi_triggers = True
        self._trigger_stall_us, self._trigger_total_us = stall_us, total_us
        log.info("PSI trigger registered: wake when memory stalls reach %d us in %d us",
                 stall_us, TRIGGER_WINDOW_US)

    def _read_psi_some(self) -> PsiSome:
        return parse_psi_some(os.pread(self._psi_fd, 4096, 0).decode())

    # -- the monitor thread --------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        if self.psi_triggers:
            poller.register(self._psi_fd, select.POLLPRI)
        timeout_ms = max(1, round(self.interval * 1000))
        while not self._stopping:
            try:
                self._observe()
            except Exception:  # the monitor must outlive one bad reading
                log.exception("memory pressure reading failed")
            for fd, events in poller.poll(timeout_ms):
                if fd == self._psi_fd:
                    self._on_trigger(poller, events)

    def _on_trigger(self, poller, events: int) -> None:
        if events & (select.POLLERR | select.POLLNVAL):
            # The kernel says the trigger's source is gone (e.g. the cgroup was removed).
            poller.unregister(self._psi_fd)
            self.psi_triggers = False
            log.warning("PSI trigger on %s lost: reading it every %gs", self.psi_path,
                        self.interval)
            return
        if not events & select.POLLPRI:
            return
        # Only an event with the stall behind it counts. A trigger registered without
        # CAP_SYS_RESOURCE starts from the wrong baseline (psi_trigger_create seeds its window
        # from the total of the privileged poller, which stays 0 unless a privileged trigger
        # exists, and evaluates it against the averaging total), so the first stall after
        # registration, however short, looks like all the stall since boot: seen here as an
        # event after 2.8 ms of stall on a 150 ms trigger. A real event means at least the
        # threshold in the last window, hence at least that since the previous real event.
        try:
            total_us = self._read_psi_some().total_us
        except (OSError, ValueError):
            total_us = self._trigger_total_us + self._trigger_stall_us  # take the kernel's word
        if total_us - self._trigger_total_us < self._trigger_stall_us:
            self.trigger_events_ignored += 1
            log.debug("PSI trigger event ignored: %d us of stall since the last one",
                      total_us - self._trigger_total_us)
            return
        self._trigger_total_us = total_us
        self._last_trigger = time.monotonic()
        self.trigger_events += 1

    def _read_psi(self) -> float | None:
        if not self.psi_available:
            return None
        try:
            return self._read_psi_some().avg10
        except (OSError, ValueError) as e:
            self.psi_available = False
            self._warn_no_psi(e)
            return None

    def _observe(self) -> None:
        now = time.monotonic()
        reading = Reading(
            psi_some_avg10=self._read_psi(),
            available_bytes=psutil.virtual_memory().available,
            psi_triggered=now - self._last_trigger < TRIGGER_HOLD,
        )
        self.psi_some_avg10, self.available_bytes = (reading.psi_some_avg10,
                                                     reading.available_bytes)
        emergency = self.rule.decide(self.emergency, reading)
        if emergency == self.emergency:
            return
        self.emergency = emergency
        self.transitions += 1
        if emergency:
            self._entered_at = now
            log.warning("memory pressure: entering emergency mode (%s)",
                        self.rule.why(True, reading))
        else:
            log.warning("memory pressure: leaving emergency mode after %.1fs (%s)",
                        now - self._entered_at, self.rule.why(False, reading))
        if self.on_change is not None:
            try:
                self.on_change(emergency)
            except Exception:
                log.exception("emergency mode callback failed")
