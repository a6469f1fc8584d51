"""base:allocation and FAST_ZERO against a live netswapd: the real clients that use them
(nbdinfo --map, nbdcopy, qemu-img map, libnbd's zero with FAST_ZERO) on a file export, a
memory export and a node's swap export, and a raw client for the edge cases no library
sends (doc/proto.md, "Metadata querying", NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_FAST_ZERO)."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess

import pytest

from netswap.nbd import constants as C
from support.daemon import start_daemon, stop_clean
from support.libnbd import import_libnbd
from support.metrics import metric
from support.nbd_raw import (
    block_status,
    connect_raw,
    go,
    meta_context,
    read_option_reply,
    request,
    send_option,
    simple_reply,
    structured_reply,
    structured_transmission,
)
from support.wait import wait_until

nbd = import_libnbd()

KiB, MiB = 1 << 10, 1 << 20
ENOTSUP = errno.errorcode[C.ENOTSUP]  # how libnbd names the spec's ENOTSUP (Linux's 95)
SIZE = 64 * MiB  # every export of the test daemon
HOLE, DATA = C.STATE_HOLE | C.STATE_ZERO, 0
DATA_A = (4 * MiB, os.urandom(MiB))  # written to each export before its map is read
DATA_B = (40 * MiB, os.urandom(4 * KiB))
TRIMMED = (4 * MiB + 256 * KiB, 256 * KiB)  # inside DATA_A, trimmed on file exports
EXPORTS = ["disk", "ram", "swap/node-map"]


def run(*argv, timeout=300) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (argv, result.stdout, result.stderr)
    return result.stdout


def merged(extents):
    """(offset, length, status) runs with neighbours of equal status joined: a client may
    receive a map in several replies, and only what it says about each byte matters."""
    out = []
    for offset, length, status in extents:
        if out and out[-1][2] == status and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, status)
        else:
            out.append((offset, length, status))
    return out


def expected_map(trimmed: bool):
    """The runs of an export after write_data: holes where nothing was written."""
    (a, data_a), (b, data_b) = DATA_A, DATA_B
    runs = [(0, a, HOLE), (a, len(data_a), DATA), (a + len(data_a), b - a - len(data_a), HOLE),
            (b, len(data_b), DATA), (b + len(data_b), SIZE - b - len(data_b), HOLE)]
    if trimmed:
        start, length = TRIMMED
        runs[1:2] = [(a, start - a, DATA), (start, length, HOLE),
                     (start + length, a + len(data_a) - start - length, DATA)]
    return runs


def write_data(daemon, export: str, trim: bool | None = None) -> bool:
    """Write DATA_A and DATA_B (and trim TRIMMED where a trim makes a hole: file backends;
    a memory export under the daemon's mlockall keeps its pages); True if it trimmed."""
    h = nbd.NBD()
    h.connect_uri(daemon.uri(export))
    for offset, data in (DATA_A, DATA_B):
        h.pwrite(data, offset)
    trimmed = export != "ram" if trim is None else trim
    if trimmed:
        h.trim(TRIMMED[1], TRIMMED[0])
    h.flush()
    h.shutdown()
    return trimmed


def nbdinfo_map(uri: str):
    entries = json.loads(run("nbdinfo", "--map", "--json", uri))
    return merged([(e["offset"], e["length"], e["type"]) for e in entries])


@pytest.mark.parametrize("export", EXPORTS)
def test_nbdinfo_map_shows_written_and_sparse_ranges(daemon, export):
    trimmed = write_data(daemon, export)
    assert nbdinfo_map(daemon.uri(export)) == expected_map(trimmed)
    # The client's requests were answered, none refused.
    assert metric(daemon, "netswap_requests_total", export=export, op="block_status") > 0
    assert metric(daemon, "netswap_request_errors_total", export=export, op="block_status",
                  errno="EINVAL") == 0


def test_nbdinfo_map_of_a_fresh_export_is_one_hole(daemon):
    assert nbdinfo_map(daemon.uri("swap/node-fresh")) == [(0, SIZE, HOLE)]
    assert nbdinfo_map(daemon.unix_uri("ram")) == [(0, SIZE, HOLE)]


def test_nbdinfo_map_of_a_memory_swap_export(tmp_path):
    """swap.backend = "memory": a node's swap lives in server RAM, and its map comes from
    the page table as a memory export's does."""
    daemon = start_daemon(tmp_path, swap_options='backend = "memory"')
    try:
        assert nbdinfo_map(daemon.uri("swap/node-mem")) == [(0, SIZE, HOLE)]
        # Written and read back as memory exports are (write_data: no trim, as the test
        # daemon's mlockall keeps the pages of a trimmed range).
        assert not write_data(daemon, "swap/node-mem", trim=False)
        assert nbdinfo_map(daemon.uri("swap/node-mem")) == expected_map(trimmed=False)
        assert metric(daemon, "netswap_requests_total", export="swap/node-mem",
                      op="block_status") > 0
    finally:
        stop_clean(daemon)


@pytest.mark.parametrize("export", ["disk", "ram"])
def test_qemu_img_map(daemon, export):
    trimmed = write_data(daemon, export)
    entries = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", daemon.uri(export)))
    got = merged([(e["start"], e["length"], HOLE if not e["data"] and e["zero"] else DATA)
                  for e in entries])
    assert got == expected_map(trimmed)


def test_nbdcopy_to_a_file_keeps_the_holes(daemon, tmp_path):
    write_data(daemon, "disk")
    copy = tmp_path / "copy.img"
    # --sparse=0: nbdcopy's own zero detection off, so holes in the copy can only come from
    # the extents the server reported.
    run("nbdcopy", "--sparse=0", daemon.uri("disk"), str(copy))
    assert copy.stat().st_size == SIZE
    with open(copy, "rb") as f:
        for offset, data in (DATA_A, DATA_B):
            f.seek(offset)
            expected = bytearray(data)
            if offset == DATA_A[0]:
                start, length = TRIMMED[0] - offset, TRIMMED[1]
                expected[start : start + length] = bytes(length)
            assert f.read(len(data)) == bytes(expected)
    written = len(DATA_A[1]) - TRIMMED[1] + len(DATA_B[1])
    assert copy.stat().st_blocks * 512 <= written + MiB, copy.stat().st_blocks
    # nbdcopy read only the data, not the 64 MiB.
    read = metric(daemon, "netswap_request_bytes_total", export="disk", op="read")
    assert 0 < read <= written + MiB, read


def test_nbdcopy_between_exports_keeps_the_holes(daemon):
    write_data(daemon, "ram")
    run("nbdcopy", "--sparse=0", daemon.uri("ram"), daemon.uri("swap/node-copy"))
    # nbdcopy writes whole requests of its own (256 KiB) around the data it read, so the
    # copy's data runs may be longer than the source's; what matters is that the holes
    # stayed holes: not 64 MiB of data, and each data range of the source is data.
    data = [(offset, length) for offset, length, status in
            nbdinfo_map(daemon.uri("swap/node-copy")) if status == DATA]
    assert sum(length for _, length in data) <= len(DATA_A[1]) + len(DATA_B[1]) + MiB, data
    for offset, blob in (DATA_A, DATA_B):
        assert any(start <= offset and offset + len(blob) <= start + length
                   for start, length in data), (offset, data)
    h = nbd.NBD()
    h.connect_uri(daemon.uri("swap/node-copy"))
    for offset, data in (DATA_A, DATA_B):
        assert h.pread(len(data), offset) == data
    h.shutdown()


@pytest.fixture
def sparse_file(tmp_path):
    """A 16 MiB file of data runs and holes (truncate, punched), at file-system-block edges."""
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
        for offset, length in ((0, 64 * KiB), (MiB, MiB // 2), (8 * MiB - 4 * KiB, 8 * KiB),
                               (12 * MiB, 2 * MiB), (16 * MiB - 4 * KiB, 4 * KiB)):
            f.seek(offset)
            f.write(os.urandom(length))
        f.flush()
        os.fsync(f.fileno())
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(13 * MiB), "--length",
                    str(256 * KiB), str(path)], check=True)
    return path


def test_nbdinfo_map_matches_nbdkits_file_plugin(tmp_path, sparse_file):
    """The same sparse file served by netswapd and by nbdkit's file plugin: nbdinfo --map
    prints the same map for both."""
    daemon = start_daemon(tmp_path, exports=f"""
        [[exports]]
        name = "sparse"
        backend = "file"
        path = "{sparse_file}"
        size = "16MiB"
        """)
    socket_path = tmp_path / "nbdkit.sock"
    nbdkit = subprocess.Popen(["nbdkit", "--foreground", "--unix", str(socket_path),
                               "--exit-with-parent", "file", f"file={sparse_file}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: socket_path.exists(), what="nbdkit listening")
        ours = run("nbdinfo", "--map", daemon.uri("sparse"))
        theirs = run("nbdinfo", "--map", f"nbd+unix:///?socket={socket_path}")
        print("netswapd:\n" + ours + "nbdkit file plugin:\n" + theirs)
        assert ours == theirs
        assert nbdinfo_map(daemon.uri("sparse")) == [
            (0, 64 * KiB, DATA), (64 * KiB, MiB - 64 * KiB, HOLE), (MiB, MiB // 2, DATA),
            (MiB + MiB // 2, 8 * MiB - 4 * KiB - MiB - MiB // 2, HOLE),
            (8 * MiB - 4 * KiB, 8 * KiB, DATA), (8 * MiB + 4 * KiB, 4 * MiB - 4 * KiB, HOLE),
            (12 * MiB, MiB, DATA), (13 * MiB, 256 * KiB, HOLE),
            (13 * MiB + 256 * KiB, 768 * KiB, DATA), (14 * MiB, 2 * MiB - 4 * KiB, HOLE),
            (16 * MiB - 4 * KiB, 4 * KiB, DATA)]
    finally:
        nbdkit.send_signal(signal.SIGTERM)
        nbdkit.wait(30)
        stop_clean(daemon)


# FAST_ZERO ------------------------------------------------------------------------------


def zero_error(call) -> str | None:
    try:
        call()
    except nbd.Error as exc:
        return exc.errno
    return None


@pytest.mark.parametrize("export", ["disk", "swap/node-fz"])
def test_fast_zero_on_files_is_done_by_the_file_system(daemon, export):
    h = nbd.NBD()
    h.connect_uri(daemon.uri(export))
    assert h.can_fast_zero()
    data = os.urandom(3 * MiB)
    h.pwrite(data, 0)
    # may_trim: a punched hole; NO_HOLE: fallocate's zero range; neither writes the zeros.
    h.zero(MiB, 0, nbd.CMD_FLAG_FAST_ZERO)
    h.zero(MiB, MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(3 * MiB, 0) == bytes(2 * MiB) + data[2 * MiB :]
    h.shutdown()
    # The punched MiB is a hole. (The zeroed range stays allocated, but ext4 reports an
    # unwritten extent as a hole, which the spec allows: so either length.)
    offset, length, status = nbdinfo_map(daemon.uri(export))[0]
    assert (offset, status) == (0, HOLE) and length in (MiB, 2 * MiB)
    assert metric(daemon, "netswap_request_errors_total", export=export, op="write_zeroes",
                  errno="ENOTSUP") == 0


def test_fast_zero_without_a_fast_path_fails_at_once_and_changes_nothing(daemon):
    h = nbd.NBD()
    h.connect_uri(daemon.uri("ram"))
    assert h.can_fast_zero()
    data = os.urandom(2 * MiB)
    h.pwrite(data, 0)
    # A memory export that must keep its pages (NO_HOLE) can only zero them by writing.
    assert zero_error(lambda: h.zero(MiB, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)) \
        == ENOTSUP
    assert h.pread(2 * MiB, 0) == data
    # Without the flag the same request zeroes the range.
    h.zero(MiB, 0, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(2 * MiB, 0) == bytes(MiB) + data[MiB:]
    h.shutdown()
    assert metric(daemon, "netswap_request_errors_total", export="ram", op="write_zeroes",
                  errno="ENOTSUP") == 1
    # An answer, not a storage failure: not counted or logged as one.
    assert metric(daemon, "netswap_backend_errors_total", request=f"write_zeroes:{C.ENOTSUP}") == 0
    assert "write_zeroes" not in "".join(line for line in daemon.log().splitlines()
                                         if " WARNING " in line)


@pytest.mark.parametrize("mlockall", ["off", "best-effort"])
def test_fast_zero_of_memory_releases_pages_unless_they_are_locked(tmp_path, mlockall):
    daemon = start_daemon(tmp_path, extra=f'\n[protect]\nmlockall = "{mlockall}"\n')
    try:
        locked = metric(daemon, "netswap_protection_enabled", what="mlockall") == 1
        if mlockall == "off":
            assert not locked
        h = nbd.NBD()
        h.connect_uri(daemon.uri("ram"))
        data = os.urandom(2 * MiB)
        h.pwrite(data, 0)
        error = zero_error(lambda: h.zero(MiB, 0, nbd.CMD_FLAG_FAST_ZERO))
        if locked:
            # The kernel will not release locked pages: zeroing them is a write.
            assert error == ENOTSUP and h.pread(2 * MiB, 0) == data
        else:
            assert error is None and h.pread(2 * MiB, 0) == bytes(MiB) + data[MiB:]
        h.shutdown()
        expected = [(0, 2 * MiB, DATA)] if locked else [(0, MiB, HOLE), (MiB, MiB, DATA)]
        assert nbdinfo_map(daemon.uri("ram"))[: len(expected)] == expected
    finally:
        stop_clean(daemon)


@pytest.mark.parametrize("export, offered", [("disk", True), ("ram", True),
                                             ("swap/node-ro", True), ("ro", False)])
def test_fast_zero_is_offered_where_write_zeroes_is(daemon, export, offered):
    h = nbd.NBD()
    h.connect_uri(daemon.uri(export))
    assert h.can_fast_zero() == h.can_zero() == offered
    h.shutdown()


# BLOCK_STATUS on the wire: the edge cases --------------------------------------------------


def test_contexts_are_listed_and_selected(daemon):
    sock = connect_raw(daemon)
    send_option(sock, C.OPT_STRUCTURED_REPLY)
    assert read_option_reply(sock)[1] == C.REP_ACK
    assert meta_context(sock, C.OPT_LIST_META_CONTEXT, b"disk") == [(0, "base:allocation")]
    assert meta_context(sock, C.OPT_LIST_META_CONTEXT, b"swap/node-raw", [b"base:"]) == [
        (0, "base:allocation")]
    assert meta_context(sock, C.OPT_LIST_META_CONTEXT, b"disk", [b"qemu:dirty-bitmap:a"]) == []
    selected = meta_context(sock, C.OPT_SET_META_CONTEXT, b"disk",
                            [b"qemu:allocation-depth", b"base:allocation"])
    assert [name for _, name in selected] == ["base:allocation"]
    sock.close()


def test_block_status_edge_cases(daemon):
    sock, contexts = structured_transmission(daemon, b"disk")
    ident = contexts["base:allocation"]
    request(sock, C.CMD_WRITE, MiB, 8 * KiB, cookie=1, payload=os.urandom(8 * KiB))
    assert structured_reply(sock)[:3] == (C.REPLY_FLAG_DONE, C.REPLY_TYPE_NONE, 1)
    everything = [(MiB, HOLE), (8 * KiB, DATA), (SIZE - MiB - 8 * KiB, HOLE)]

    assert block_status(sock, 0, SIZE, cookie=2) == (ident, everything)
    # Lengths never reach past the request, even where the run goes on.
    assert block_status(sock, MiB - 100, 200, cookie=3) == (ident, [(100, HOLE), (100, DATA)])
    assert block_status(sock, 2 * MiB, 4 * KiB, cookie=4) == (ident, [(4 * KiB, HOLE)])
    # The last byte of the export.
    assert block_status(sock, SIZE - 1, 1, cookie=5) == (ident, [(1, HOLE)])
    # REQ_ONE: exactly one descriptor, within the length asked.
    assert block_status(sock, 0, SIZE, cookie=6, flags=C.CMD_FLAG_REQ_ONE) == (
        ident, [(MiB, HOLE)])
    assert block_status(sock, MiB + 4 * KiB, 512, cookie=7, flags=C.CMD_FLAG_REQ_ONE) == (
        ident, [(512, DATA)])
    assert block_status(sock, MiB, SIZE - MiB, cookie=8,
                        flags=C.CMD_FLAG_REQ_ONE | C.CMD_FLAG_FUA) == (ident, [(8 * KiB, DATA)])
    # Beyond the end, zero length, flags BLOCK_STATUS does not take: EINVAL error chunks.
    refused = [
        (SIZE - 4 * KiB, 8 * KiB, 0), (SIZE, 1, 0), ((1 << 64) - 4 * KiB, 8 * KiB, 0),
        (0, 0, 0), (0, 0, C.CMD_FLAG_REQ_ONE),
        (0, 4 * KiB, C.CMD_FLAG_DF), (0, 4 * KiB, C.CMD_FLAG_NO_HOLE), (0, 4 * KiB, 0x20),
    ]
    for cookie, (offset, length, flags) in enumerate(refused, 100):
        assert block_status(sock, offset, length, cookie=cookie, flags=flags) == C.EINVAL, (
            offset, length, flags)
    # The stream stays in step.
    assert block_status(sock, 0, SIZE, cookie=9) == (ident, everything)
    request(sock, C.CMD_FLUSH, cookie=10)
    assert structured_reply(sock)[:3] == (C.REPLY_FLAG_DONE, C.REPLY_TYPE_NONE, 10)
    sock.close()
    assert metric(daemon, "netswap_request_errors_total", export="disk", op="block_status",
                  errno="EINVAL") == len(refused)
    log = daemon.log()
    assert "past the end" in log and "zero length" in log and "not allowed on block_status" in log
    assert log.count("rejected with error 22") >= len(refused)


def test_many_block_status_requests_in_flight(daemon):
    sock, contexts = structured_transmission(daemon, b"ram")
    cookies = range(1, 65)
    for cookie in cookies:
        request(sock, C.CMD_BLOCK_STATUS, cookie * 4096, 4096 * cookie, cookie=cookie)
    got = {}
    for _ in cookies:
        flags, rtype, cookie, payload = structured_reply(sock)
        assert rtype == C.REPLY_TYPE_BLOCK_STATUS and flags & C.REPLY_FLAG_DONE
        got[cookie] = struct.unpack(">III", payload)
    assert got == {cookie: (contexts["base:allocation"], 4096 * cookie, HOLE)
                   for cookie in cookies}
    sock.close()


def test_block_status_without_a_selected_context_is_einval(daemon):
    # Structured replies, but no SET_META_CONTEXT.
    sock, _ = structured_transmission(daemon, b"disk", queries=None)
    assert block_status(sock, 0, 4096, cookie=1) == C.EINVAL
    sock.close()
    # A SET that selected nothing.
    sock, contexts = structured_transmission(daemon, b"disk", queries=[b"base:"])
    assert contexts == {}
    assert block_status(sock, 0, 4096, cookie=2) == C.EINVAL
    sock.close()
    # base:allocation selected, but for another export than the one in transmission.
    sock, contexts = structured_transmission(daemon, b"disk", meta_export=b"ro")
    assert "base:allocation" in contexts
    assert block_status(sock, 0, 4096, cookie=3) == C.EINVAL
    sock.close()
    # Simple replies: the context cannot even be asked for, and the request is refused.
    sock = connect_raw(daemon)
    send_option(sock, C.OPT_SET_META_CONTEXT,
                struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 15) + b"base:allocation")
    assert read_option_reply(sock)[1] == C.REP_ERR_INVALID
    go(sock, b"disk")
    request(sock, C.CMD_BLOCK_STATUS, 0, 4096, cookie=4)
    assert simple_reply(sock) == (C.EINVAL, 4)
    sock.close()
    # A request is counted once its reply is out (Execution.replied): the last one may not
    # be yet when the client has read it.
    wait_until(lambda: metric(daemon, "netswap_request_errors_total", export="disk",
                              op="block_status", errno="EINVAL") == 4,
               what="the four refused BLOCK_STATUS requests counted")
    assert metric(daemon, "netswap_options_refused_total",
                  reason="needs_structured_replies") == 1


def test_block_status_on_a_read_only_export(daemon):
    sock, contexts = structured_transmission(daemon, b"ro")
    assert block_status(sock, 0, MiB, cookie=1) == (contexts["base:allocation"], [(MiB, DATA)])
    sock.close()
