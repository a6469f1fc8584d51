"""Durability: what the daemon acknowledged as durable survives `kill -9` and a restart.

Several libnbd connections per export issue random, overlapping WRITE / TRIM / WRITE_ZEROES /
FLUSH and FUA requests; the daemon is killed with SIGKILL at a random moment, restarted on the
same state directory, and every 512-byte unit of the export is checked against a model of
what it may legally hold (see Model).  A static file export and a per-node swap export run
side by side.  Seeded: the seed is printed, NETSWAP_DURABILITY_SEED replays a run.

What SIGKILL tests and what it cannot: the page cache survives the daemon's death, so this
catches a daemon that acknowledges before the data reached the file, loses or reorders
writes, tears a unit, or cannot come back on the state it left; it cannot catch a missing
fdatasync (that needs power loss).  The sync path's failures are tested in test_faults.py.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import struct
import threading
import time
from dataclasses import dataclass, field

from support.daemon import start_daemon
from support.libnbd import import_libnbd

nbd = import_libnbd()

UNIT = 512  # the model's granule; aligned units never straddle a page, so a write cannot tear one
STATIC_SIZE = 256 * 1024
SWAP_SIZE = 1 << 20  # the smallest swap.size the config allows
MAX_UNITS = 16  # longest request, in units: short enough for many overlaps in a small export
CONNECTIONS_PER_EXPORT = 3
INFLIGHT_PER_CONNECTION = 8
ROUNDS = 8
NEVER = float("inf")  # the ack time of a request never acknowledged

EXPORTS = """
    [[exports]]
    name = "disk"
    backend = "file"
    path = "disk.img"
    size = "256KiB"

    [[exports]]
    name = "ro"
    backend = "file"
    path = "ro.img"
    size = "1MiB"
    read_only = true
"""
SWAP_EXPORT = "swap/modelnode"


def unit_image(tag: int, unit: int) -> bytes:
    """What unit `unit` holds after the write tagged `tag`: unique per write and per unit, so a
    unit read back names the write it came from and a misplaced or torn unit is caught."""
    return bytes(UNIT) if tag == 0 else struct.pack("<QQ", tag, unit) * (UNIT // 16)


@dataclass
class Op:
    kind: str  # "write", "trim", "zero" (trim and zero read back as zeros: tag 0), "flush"
    first: int  # first unit
    count: int  # units
    tag: int
    fua: bool
    issued: float
    acked: float = NEVER


@dataclass
class Model:
    """The legal contents of one export across one kill.

    Times come from one counter shared by every connection: a request is stamped before it is
    sent and its completion after it is seen, so "A acked before B issued" in stamps means the
    server replied to A before it received B.

    A request is *durable* once acknowledged with FUA, or acknowledged before a FLUSH (on any
    connection: the exports advertise CAN_MULTI_CONN) was issued that was acknowledged.  A unit
    may then hold the value of any request on it that is not known to come before a durable
    one, i.e. not acknowledged before the latest-issued durable request on that unit was
    issued: the last durable value, anything written concurrently with or after it, acked or
    not.  The contents at the start of the round are durable at time -1.
    """

    units: int
    start: list[int]  # the tag each unit held at the start of the round
    ops: list[Op] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)

    def legal(self) -> list[set[int]]:
        flushed_before = max((op.issued for op in self.ops if op.kind == "flush"
                              and op.acked != NEVER), default=-1)
        touching: list[list[Op]] = [[] for _ in range(self.units)]
        for op in self.ops:
            if op.kind != "flush":
                for unit in range(op.first, op.first + op.count):
                    touching[unit].append(op)
        legal = []
        for unit, ops in enumerate(touching):
            durable = [op for op in ops if op.acked != NEVER and (op.fua or op.acked < flushed_before)]
            last_durable = max((op.issued for op in durable), default=-1)
            tags = {op.tag for op in ops if op.acked >= last_durable}
            if last_durable == -1:
                tags.add(self.start[unit])
            legal.append(tags)
        return legal

    def durable(self) -> int:
        flushed_before = max((op.issued for op in self.ops if op.kind == "flush"
                              and op.acked != NEVER), default=-1)
        return sum(op.kind != "flush" and op.acked != NEVER
                   and (op.fua or op.acked < flushed_before) for op in self.ops)

    def check(self, image: bytes) -> tuple[list[int], list[str]]:
        """The tags `image` holds, and a line per unit that breaks the model."""
        tags, problems = [], []
        for unit, allowed in enumerate(self.legal()):
            data = image[unit * UNIT : (unit + 1) * UNIT]
            tag = 0 if data == bytes(UNIT) else struct.unpack_from("<Q", data)[0]
            if data != unit_image(tag, unit):
                problems.append(f"unit {unit}: torn or misplaced data (starts {data[:16].hex()})")
            elif tag not in allowed:
                problems.append(f"unit {unit}: holds write {tag}, the model allows {sorted(allowed)}")
            tags.append(tag)
        return tags, problems


class Client(threading.Thread):
    """One connection issuing random requests, INFLIGHT_PER_CONNECTION at a time, until told
    to stop or the daemon dies under it."""

    def __init__(self, uri: str, model: Model, rng: random.Random, clock, tags, killed) -> None:
        super().__init__(daemon=True)
        self.uri, self.model, self.rng = uri, model, rng
        self.clock, self.tags, self.killed = clock, tags, killed
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        h = nbd.NBD()
        try:
            h.connect_uri(self.uri)
        except nbd.Error as exc:
            self.error = exc
            return
        inflight: dict[int, tuple[Op, object]] = {}
        try:
            while not self.stop.is_set():
                while len(inflight) < INFLIGHT_PER_CONNECTION:
                    op, buf = self._issue(h)
                    inflight[op.cookie] = (op, buf)
                h.poll(100)
                for cookie in list(inflight):
                    if h.aio_command_completed(cookie):
                        op, _ = inflight.pop(cookie)
                        op.acked = next(self.clock)
        except nbd.Error as exc:
            if not self.killed.is_set():
                self.error = exc
        # Requests still in flight were never acknowledged: op.acked stays NEVER.

    def _issue(self, h):
        rng, model = self.rng, self.model
        roll = rng.random()
        fua = rng.random() < 0.2
        count = rng.randint(1, MAX_UNITS)
        first = rng.randrange(model.units - count + 1)
        kind = ("flush" if roll < 0.08 else "trim" if roll < 0.16 else
                "zero" if roll < 0.24 else "write")
        op = Op(kind, first, count, next(self.tags) if kind == "write" else 0, fua,
                issued=next(self.clock))
        model.record(op)
        offset, length = first * UNIT, count * UNIT
        flags = nbd.CMD_FLAG_FUA if fua else 0
        buf = None
        if kind == "write":
            buf = nbd.Buffer.from_bytearray(bytearray(
                b"".join(unit_image(op.tag, unit) for unit in range(first, first + count))))
            op.cookie = h.aio_pwrite(buf, offset, flags=flags)
        elif kind == "trim":
            op.cookie = h.aio_trim(length, offset, flags=flags)
        elif kind == "zero":
            op.cookie = h.aio_zero(length, offset, flags=flags)
        else:
            op.fua = False
            op.cookie = h.aio_flush()
        return op, buf


def read_export(uri: str, size: int) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return h.pread(size, 0)
    finally:
        h.shutdown()


def test_acknowledged_durable_writes_survive_kill_9(tmp_path):
    seed = int(os.environ.get("NETSWAP_DURABILITY_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\ndurability seed {seed} (replay: NETSWAP_DURABILITY_SEED={seed})")
    rng = random.Random(seed)
    options = dict(exports=EXPORTS, swap_size="1MiB")
    clock, tags = itertools.count(), itertools.count(1)
    start_tags = {"disk": [0] * (STATIC_SIZE // UNIT), SWAP_EXPORT: [0] * (SWAP_SIZE // UNIT)}
    sizes = {"disk": STATIC_SIZE, SWAP_EXPORT: SWAP_SIZE}
    checked_ops = checked_units = durable_ops = 0
    began = time.monotonic()
    daemon = start_daemon(tmp_path, **options)
    try:
        for round_ in range(ROUNDS):
            killed = threading.Event()
            models = {name: Model(len(start_tags[name]), start_tags[name]) for name in sizes}
            clients = [Client(daemon.uri(name), models[name], random.Random(rng.random()),
                              clock, tags, killed)
                       for name in sizes for _ in range(CONNECTIONS_PER_EXPORT)]
            for client in clients:
                client.start()
            time.sleep(rng.uniform(0.05, 1.5))
            killed.set()
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait()
            for client in clients:
                client.join(30)
                assert not client.is_alive(), "a client hung after the daemon died"
                assert client.error is None, f"round {round_}: {client.error!r} before the kill"
            log = daemon.log()
            assert "Traceback" not in log, log

            daemon = start_daemon(tmp_path, **options)
            for name, model in models.items():
                acked = sum(op.acked != NEVER for op in model.ops)
                image = read_export(daemon.uri(name), sizes[name])
                start_tags[name], problems = model.check(image)
                assert not problems, (f"seed {seed} round {round_} export {name}: "
                                      + "\n".join(problems[:20]))
                durable = model.durable()
                print(f"round {round_} {name}: {len(model.ops)} requests, {acked} acknowledged, "
                      f"{durable} durable")
                checked_ops += len(model.ops)
                durable_ops += durable
                checked_units += model.units
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()
    assert "Traceback" not in daemon.log()
    print(f"{ROUNDS} kill rounds, {checked_ops} requests modelled ({durable_ops} durable), "
          f"{checked_units} units "
          f"checked, {time.monotonic() - began:.1f} s")


# -- a restart on the state a previous run left ------------------------------------------------

def image_of(tag_of_unit, units: int) -> bytes:
    return b"".join(unit_image(tag_of_unit(unit), unit) for unit in range(units))


def warnings_of(log: str) -> set[str]:
    """WARNING and ERROR messages without their timestamps."""
    return {line.split(" ", 2)[2] for line in log.splitlines()
            if " WARNING " in line or " ERROR " in line or " CRITICAL " in line}


def test_restart_on_existing_state_dir_keeps_every_export(tmp_path):
    import json
    from support.daemon import netswapctl

    options = dict(exports=EXPORTS, swap_size="1MiB")
    units = 512  # 256 KiB written per export
    settled = ["disk", "swap/alpha", "swap/beta", "swap/gamma"]
    first = start_daemon(tmp_path, **options)
    started_with = warnings_of(first.log())
    try:
        for number, name in enumerate(settled, start=1):
            h = nbd.NBD()
            h.connect_uri(first.uri(name))
            h.pwrite(image_of(lambda unit: number * 1000 + unit + 1, units), 0)
            h.flush()
            h.shutdown()
        # swap/delta is mid-write when the daemon is killed: a settled base, then a writer.
        h = nbd.NBD()
        h.connect_uri(first.uri("swap/delta"))
        h.pwrite(image_of(lambda unit: 9_000_000 + unit, units), 0, nbd.CMD_FLAG_FUA)
        written = []
        stop = threading.Event()

        def writer():
            rng, tag = random.Random(1), 10_000_000
            try:
                while not stop.is_set():
                    tag += 1
                    first_unit = rng.randrange(units - 128)
                    written.append(tag)
                    h.pwrite(b"".join(unit_image(tag, u) for u in range(first_unit, first_unit + 128)),
                             first_unit * UNIT)
            except nbd.Error:
                pass  # the daemon died under it

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        time.sleep(0.5)
        stop.set()  # the writer notices only after its current request: the kill comes first
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        thread.join(30)
        assert len(written) > 1, "the writer never got going"
    finally:
        first.stop()

    second = start_daemon(tmp_path, **options)
    try:
        listing = json.loads(netswapctl(second, "--json", "exports").stdout)["exports"]
        names = {row["name"] for row in listing}
        assert {"disk", "ro", "swap/alpha", "swap/beta", "swap/gamma", "swap/delta"} <= names, listing
        for number, name in enumerate(settled, start=1):
            expected = image_of(lambda unit: number * 1000 + unit + 1, units)
            assert read_export(second.uri(name), units * UNIT) == expected, name
        image = read_export(second.uri("swap/delta"), units * UNIT)
        legal = set(written)
        for unit in range(units):
            data = image[unit * UNIT : (unit + 1) * UNIT]
            tag = struct.unpack_from("<Q", data)[0]
            assert data == unit_image(tag, unit), f"swap/delta unit {unit} is torn"
            assert tag in legal or tag == 9_000_000 + unit, f"swap/delta unit {unit}: {tag}"
        log = second.log()
        assert warnings_of(log) <= started_with, warnings_of(log) - started_with
    finally:
        assert second.stop() == 0, second.log()
    assert "Traceback" not in second.log()
