"""FLUSH through the backend's group commit (cext/commit.c: served in the C loop, or by
exports/groupcommit.py's flushers in Python), against a real netswapd.

CAN_MULTI_CONN is advertised, so a FLUSH on one connection must cover the writes acknowledged
on every other: here the writes go over connection A (served by the C loop, or by Python
with c_loop off) and the FLUSHes over connection B. What is counted is the daemon's own
`netswap_export_flush_syncs_total`: a FLUSH after a write must run a sync (a write the
flusher did not see would let it answer from the last one, which does not cover it), and
FLUSHes with nothing written in between run none.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.daemon import start_daemon
from support.libnbd import import_libnbd
from support.metrics import metric
from support.wait import wait_until

nbd = import_libnbd()


def syncs(daemon) -> float:
    return metric(daemon, "netswap_export_flush_syncs_total", export="disk")


@pytest.mark.parametrize("c_loop", [True, False], ids=["c_loop", "python"])
def test_a_flush_on_one_connection_syncs_writes_acknowledged_on_another(tmp_path, c_loop):
    daemon = start_daemon(tmp_path, nbd_options=f"c_loop = {str(c_loop).lower()}")
    try:
        writer, flusher = nbd.NBD(), nbd.NBD()
        writer.connect_uri(daemon.uri("disk"))
        flusher.connect_uri(daemon.uri("disk"))
        assert flusher.can_multi_conn()
        flusher.flush()  # whatever the start left unsynced
        before = syncs(daemon)
        for _ in range(3):
            flusher.flush()
        assert syncs(daemon) == before  # nothing written: no sync
        for round_ in range(1, 4):
            writer.pwrite(bytes([round_]) * 65536, 65536 * round_)
            flusher.flush()
            assert syncs(daemon) == before + round_, "a write on the other connection " \
                "was not covered by a sync of its own"
            assert flusher.pread(65536, 65536 * round_) == bytes([round_]) * 65536
        if c_loop:  # its FLUSHes never left the C loop: the syncs counted are its own
            assert metric(daemon, "netswap_c_loop_handoffs_total", reason="python") == 0
            assert metric(daemon, "netswap_requests_total", export="disk", op="flush") == 7
        writer.shutdown()
        flusher.shutdown()
    finally:
        code = daemon.stop()
    log = daemon.log()
    assert "Traceback" not in log, log
    assert code == 0, log


def test_flushes_in_flight_together_all_succeed_behind_one_sync(tmp_path):
    daemon = start_daemon(tmp_path)
    try:
        handles = [nbd.NBD() for _ in range(3)]
        for h in handles:
            h.connect_uri(daemon.uri("disk"))
        handles[0].flush()
        before = syncs(daemon)
        handles[0].pwrite(b"x" * 4096, 0)
        cookies = [(h, h.aio_flush()) for h in handles for _ in range(16)]
        for h, cookie in cookies:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
        # The first sync covers the write; every FLUSH after it finds nothing new written.
        assert syncs(daemon) == before + 1
        assert metric(daemon, "netswap_request_errors_total", export="disk", op="flush",
                      errno="EIO") == 0
        for h in handles:
            h.shutdown()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()


def _c_flushers(daemon) -> int:
    """Threads of the daemon named as cext/commit.c names its flushers."""
    count = 0
    for comm in Path(f"/proc/{daemon.process.pid}/task").glob("*/comm"):
        try:
            count += comm.read_text().strip() == "nbd-flush"
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended while we looked
    return count


def test_c_flushers_are_few_and_end_when_the_flushes_stop(tmp_path):
    """FLUSHes from four connections at once are synced by the export's C flushers: at most
    4 threads (never one per FLUSH or per connection), none left once FLUSHes stop."""
    daemon = start_daemon(tmp_path)
    try:
        handles = [nbd.NBD() for _ in range(4)]
        for h in handles:
            h.connect_uri(daemon.uri("disk"))
        most = 0
        for round_ in range(200):
            cookies = []
            for i, h in enumerate(handles):
                h.pwrite(bytes([round_ % 256]) * 4096, 4096 * i)
                cookies += [(h, h.aio_flush()) for _ in range(4)]
            for h, cookie in cookies:
                while not h.aio_command_completed(cookie):
                    h.poll(-1)
            most = max(most, _c_flushers(daemon))
            if most and round_ >= 20:
                break
        assert 1 <= most <= 4, most
        assert metric(daemon, "netswap_c_loop_handoffs_total", reason="python") == 0
        wait_until(lambda: _c_flushers(daemon) == 0, timeout=30,
                   what="the C flushers ending without FLUSHes")
        handles[0].flush()  # and they come back when needed
        for h in handles:
            h.shutdown()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()
    assert "Traceback" not in daemon.log()
