"""Event counters of the daemon and per-request statistics.

An event is declared once, in the module that counts it (`declare`): its counter key, the
Prometheus series it is exported as, its help text, its label and the subsystem whose
collector exports it. Counting takes the declaration, never a string, so a counter nobody
exports cannot be made by a typo, and every declared event is exported.

The data path only increments; readers (logs, the Prometheus collectors) take a snapshot.
Locks keep `+=` exact across worker threads; each is held for a few dictionary or list
updates, never across I/O, so a scrape that takes one delays a request by at most that.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from .oplabels import NBD_COMMAND_NAMES

# Upper bounds, in seconds, of the request latency histogram's buckets. A swap-in served from
# the page cache over a LAN takes tens of microseconds, one from a cold disk milliseconds, a
# request held back by an empty pool or a stalled client up to seconds: the buckets resolve
# each of those regimes.
LATENCY_BUCKETS = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
# The same bounds in nanoseconds, so the hot path compares integers from perf_counter_ns.
_BOUNDS_NS = tuple(round(bound * 1e9) for bound in LATENCY_BUCKETS)

# Commands outside the protocol's vocabulary share one entry: a client could otherwise make
# us keep (and export) a series per 16-bit command number.
UNKNOWN_OP = "unknown"


SUBSYSTEMS = ("reserve", "transport", "nbd", "nfs", "swap", "daemon")


@dataclass(frozen=True)
class Event:
    """A countable event: `key` in Counters (and in the C loops' counts), exported as
    `metric` with `help`, labelled `label` (None: no label, exported even at 0), by the
    collector of `subsystem`."""

    key: str
    metric: str
    help: str
    label: Optional[str]
    subsystem: str


# Every declared event by key, in declaration order; filled as the declaring modules load.
EVENTS: dict[str, Event] = {}


def declare(subsystem: str, key: str, metric: str, help: str,
            label: Optional[str] = None) -> Event:
    """Declare an event counted by the calling module (at its top level)."""
    if subsystem not in SUBSYSTEMS:
        raise ValueError(f"event {key!r}: unknown subsystem {subsystem!r}")
    if key in EVENTS:
        raise ValueError(f"event {key!r} declared twice")
    event = EVENTS[key] = Event(key, metric, help, label, subsystem)
    return event


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: Counter[tuple[str, str]] = Counter()
        # C loops counting events too (add_live): read where they are at every get/snapshot.
        self._live: list = []
        self.requests = RequestStats()
        self.calls = CallStats()

    def inc(self, event: Event, label: str = "", amount: int = 1) -> None:
        with self._lock:
            self._values[(event.key, label)] += amount

    def get(self, event, label: str = "") -> int:
        """The count of `event` (an Event, or its key) with `label`."""
        name = getattr(event, "key", event)
        with self._lock:
            return self._values[(name, label)] + sum(
                source.counts().get((name, label), 0) for source in self._live)

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            values = Counter(self._values)
            for source in self._live:
                values.update(source.counts())
            return dict(values)

    def add_live(self, source) -> None:
        """Count what `source.counts()` ({(name, label): value}, values that only grow,
        kept by a C loop with no Python in between) as these counters too, until
        `retire_live`."""
        with self._lock:
            self._live.append(source)

    def retire_live(self, source) -> None:
        """`source` stops changing: fold it in (a reader sees it live or folded, never both)."""
        with self._lock:
            self._live.remove(source)
            self._values.update(source.counts())


@dataclass(frozen=True)
class OpSnapshot:
    """One (export, operation)'s statistics at one moment."""

    export: str
    op: str
    buckets: tuple[int, ...]  # per bucket of LATENCY_BUCKETS, then above the last; not cumulative
    latency_seconds: float  # sum of all latencies
    bytes: int  # range length of the requests that succeeded
    errors: dict[int, int]  # NBD error value -> requests answered with it

    @property
    def requests(self) -> int:
        return sum(self.buckets)


class _OpStats:
    """Counts of one (export, operation). Each has its own lock, so requests of different
    exports or operations never wait for each other."""

    __slots__ = ("_lock", "_export", "_op", "_buckets", "_latency_ns", "_bytes", "_errors", "live")

    def __init__(self, export: str, op: str) -> None:
        self._lock = threading.Lock()
        self._export = export
        self._op = op
        self._buckets = [0] * (len(_BOUNDS_NS) + 1)
        self._latency_ns = 0
        self._bytes = 0
        self._errors: dict[int, int] = {}
        # C request loops counting for this entry now (RequestStats.add_live; changed and
        # read under RequestStats' lock).
        self.live: list = []

    def observe(self, length: int, error: int, elapsed_ns: int) -> None:
        # bisect_left: the first bound >= elapsed, Prometheus' "le" (less or equal).
        index = bisect_left(_BOUNDS_NS, elapsed_ns)
        with self._lock:
            self._buckets[index] += 1
            self._latency_ns += elapsed_ns
            if error:
                self._errors[error] = self._errors.get(error, 0) + 1
            else:
                self._bytes += length

    def fold(self, source) -> None:
        """Add a C loop's statistics (see RequestStats.add_live) to these."""
        with self._lock:
            for index in range(len(self._buckets)):
                self._buckets[index] += source.buckets[index]
            self._latency_ns += source.latency_ns
            self._bytes += source.bytes

    def snapshot(self) -> OpSnapshot:
        with self._lock:
            buckets, latency_ns = list(self._buckets), self._latency_ns
            length, errors = self._bytes, dict(self._errors)
        for source in self.live:
            for index in range(len(buckets)):
                buckets[index] += source.buckets[index]
            latency_ns += source.latency_ns
            length += source.bytes
        return OpSnapshot(self._export, self._op, tuple(buckets), latency_ns / 1e9, length, errors)


class RequestStats:
    """Requests, bytes, errors and latency per export and NBD command.

    `observe` is called once per request, after its reply was sent. An entry is made on the
    first request of its (export, command) under a lock; every later request finds it with
    two dictionary reads and no shared lock. Entries are never removed: a counter that
    vanished would read as a reset to Prometheus, and the set is bounded by exports times
    commands.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # serialises creating entries; never taken per request
        self._exports: dict[str, dict[int, _OpStats]] = {}

    def observe(self, export: str, command: int, length: int, error: int, elapsed_ns: int) -> None:
        """One request to `export` finished: `length` bytes of range, NBD error `error` (0 on
        success), `elapsed_ns` from its header being parsed to its reply being sent."""
        ops = self._exports.get(export)
        stats = ops.get(command) if ops is not None else None
        if stats is None:
            stats = self._entry(export, command)
        stats.observe(length, error, elapsed_ns)

    def _entry(self, export: str, command: int) -> _OpStats:
        op = NBD_COMMAND_NAMES.get(command, UNKNOWN_OP)
        with self._lock:
            ops = self._exports.setdefault(export, {})
            if op == UNKNOWN_OP:
                # Stored under one key (-1), and looked up again on each such request: unknown
                # commands are rare and refused, so their slow path costs nothing that matters.
                command = -1
            stats = ops.get(command)
            if stats is None:
                # Published fully built: a reader of ops without the lock sees it or nothing.
                stats = ops[command] = _OpStats(export, op)
            return stats

    def add_live(self, export: str, command: int, source) -> None:
        """Count what `source` counts as requests of (export, command) too, until
        `retire_live`. A source is the C request loop's statistics of one connection and
        operation (`.buckets`, `.latency_ns`, `.bytes`; successes only), which that loop
        updates with no Python in between: a scrape reads them where they are."""
        stats = self._entry(export, command)
        with self._lock:
            stats.live.append(source)

    def retire_live(self, export: str, command: int, source) -> None:
        """`source` stops changing (its connection ended): fold it into the totals."""
        stats = self._entry(export, command)
        with self._lock:  # a scrape sees it either live or folded in, never both or neither
            stats.live.remove(source)
            stats.fold(source)

    def snapshot(self) -> list[OpSnapshot]:
        with self._lock:
            return [stats.snapshot() for ops in self._exports.values() for stats in ops.values()]


class CallStats:
    """Latency per RPC service (nfs, mount, portmap) and procedure, like RequestStats' per
    NBD command: from a call's record being received to its reply being sent. Procedure
    names come from the programs' fixed tables (unknown numbers share "unknown"), so the set
    of entries is bounded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # serialises creating entries; never taken per call
        self._entries: dict[tuple[str, str], _OpStats] = {}

    def observe(self, service: str, procedure: str, elapsed_ns: int) -> None:
        stats = self._entries.get((service, procedure))
        if stats is None:
            with self._lock:
                stats = self._entries.setdefault((service, procedure),
                                                 _OpStats(service, procedure))
        stats.observe(0, 0, elapsed_ns)

    def _entry(self, service: str, procedure: str) -> _OpStats:
        with self._lock:
            return self._entries.setdefault((service, procedure), _OpStats(service, procedure))

    def add_live(self, service: str, procedure: str, source) -> None:
        """As RequestStats.add_live, for a C loop's calls of (service, procedure)."""
        stats = self._entry(service, procedure)
        with self._lock:
            stats.live.append(source)

    def retire_live(self, service: str, procedure: str, source) -> None:
        stats = self._entry(service, procedure)
        with self._lock:
            stats.live.remove(source)
            stats.fold(source)

    def snapshot(self) -> list[OpSnapshot]:
        with self._lock:
            entries = list(self._entries.values())
            return [stats.snapshot() for stats in entries]
