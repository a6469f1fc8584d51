"""NFSv3 and MOUNT v3 against real clients: libnfs's nfs-ls, nfs-cat and nfs-cp.

The daemon serves a swap export (one fully allocated file per node; loopback clients are
node "localhost") and a scratch export of ordinary files, on ports of the test's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from support.daemon import stop_clean
from support.metrics import metric
from support.nfs import run, start_nfs, url
from support.wait import wait_until

MiB = 1 << 20
SWAP_SIZE = 8 * MiB
LIBNFS_CLIENTS = f"""
    swap_size = "{SWAP_SIZE // MiB}MiB"
    node_ports = "privileged"  # the default: libnfs as root binds ports below 1024
    """


@pytest.fixture
def nfs_daemon(tmp_path):
    daemon = start_nfs(tmp_path, LIBNFS_CLIENTS)
    yield daemon
    stop_clean(daemon)


def test_a_file_copied_in_and_out_of_the_scratch_export_is_unchanged(nfs_daemon, tmp_path):
    source = tmp_path / "in.bin"
    source.write_bytes(os.urandom(64 * MiB))
    run("nfs-cp", str(source), url(nfs_daemon, "/scratch/copy.bin"))
    listing = run("nfs-ls", url(nfs_daemon, "/scratch")).stdout.decode()
    assert "copy.bin" in listing, listing
    back = tmp_path / "out.bin"
    run("nfs-cp", url(nfs_daemon, "/scratch/copy.bin"), str(back))
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert digest(back) == digest(source)
    served = nfs_daemon.state_dir / "nfs-scratch" / "copy.bin"
    assert served.stat().st_size == 64 * MiB


def test_a_node_sees_and_reads_only_its_own_fully_allocated_swap_file(nfs_daemon):
    data = run("nfs-cat", url(nfs_daemon, "/swap/localhost")).stdout
    assert data == bytes(SWAP_SIZE)
    swap_file = nfs_daemon.state_dir / "nfs-swap" / "localhost"
    st = swap_file.stat()
    assert st.st_size == SWAP_SIZE and st.st_blocks * 512 >= SWAP_SIZE  # no holes
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (0, 0)
    listing = run("nfs-ls", url(nfs_daemon, "/swap")).stdout.decode().split()
    assert "localhost" in listing
    with pytest.raises(subprocess.CalledProcessError):  # another node's name is not there
        run("nfs-cat", url(nfs_daemon, "/swap/other-node"))


@pytest.mark.parametrize("garbage, reason", [
    (b"\x80\x00\x00\x05hello", "not_a_call"),  # a 5-byte record: no room for an xid
    (b"\xff\xff\xff\xff" + b"x" * 64, "record_too_large"),  # a forged 2 GiB record
    (b"\x80\x00\x00\x00", "empty_record"),
])
def test_garbage_records_close_only_their_connection(nfs_daemon, garbage, reason):
    free_before = metric(nfs_daemon, "netswap_pool_free_bytes")
    sock = socket.create_connection(("127.0.0.1", nfs_daemon.nfs_port))
    sock.sendall(garbage)
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass  # closed with data unread: a reset is a close too
    sock.close()
    assert metric(nfs_daemon, "netswap_rpc_protocol_errors_total", reason=reason) == 1
    assert metric(nfs_daemon, "netswap_pool_free_bytes") == free_before  # nothing held
    run("nfs-ls", url(nfs_daemon, "/scratch"))  # and the daemon serves on


# Writes into an existing file need the libnfs API (the CLI tools only create files): a child
# process drives Debian's libnfs13 through ctypes, so a crash in it cannot take pytest down.
_LIBNFS_WRITE = r"""
import ctypes, os, sys
lib = ctypes.CDLL("libnfs.so.13")
lib.nfs_init_context.restype = ctypes.c_void_p
lib.nfs_parse_url_full.restype = ctypes.c_void_p
lib.nfs_parse_url_full.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
lib.nfs_mount.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
lib.nfs_open.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                         ctypes.POINTER(ctypes.c_void_p)]
lib.nfs_pwrite.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                           ctypes.c_char_p]
lib.nfs_fsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
lib.nfs_close.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
lib.nfs_get_error.restype = ctypes.c_char_p
lib.nfs_get_error.argtypes = [ctypes.c_void_p]
lib.nfs_umount.argtypes = [ctypes.c_void_p]
url, name, offset = sys.argv[1].encode(), sys.argv[2].encode(), int(sys.argv[3])
unmount = sys.argv[4:] == ["umount"]
data = sys.stdin.buffer.read()
nfs = lib.nfs_init_context()
def check(result, what):
    if result < 0:
        sys.exit(f"{what}: {lib.nfs_get_error(nfs).decode()}")
    return result
if not lib.nfs_parse_url_full(nfs, url):
    sys.exit("bad url: " + lib.nfs_get_error(nfs).decode())
check(lib.nfs_mount(nfs, b"127.0.0.1", b"/swap"), "mount")
fh = ctypes.c_void_p()
check(lib.nfs_open(nfs, b"/" + name, os.O_RDWR, ctypes.byref(fh)), "open")
done = 0
while done < len(data):
    done += check(lib.nfs_pwrite(nfs, fh, offset + done, len(data) - done, data[done:]), "pwrite")
check(lib.nfs_fsync(nfs, fh), "fsync")
check(lib.nfs_close(nfs, fh), "close")
if unmount:
    check(lib.nfs_umount(nfs), "umount")  # MOUNT UMNT of the export, over TCP
"""


def libnfs_write(daemon, data: bytes, offset: int, unmount: bool = False) -> None:
    """Write `data` into node localhost's swap file with libnfs's API, then (unmount) UMNT."""
    result = subprocess.run([sys.executable, "-c", _LIBNFS_WRITE, url(daemon, "/swap"),
                             "localhost", str(offset), *(["umount"] if unmount else [])],
                            input=data, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()


def test_libnfs_writes_into_the_existing_swap_file_and_reads_them_back(nfs_daemon):
    data = os.urandom(3 * MiB + 4096)
    offset = 1 * MiB
    libnfs_write(nfs_daemon, data, offset)
    back = run("nfs-cat", url(nfs_daemon, "/swap/localhost")).stdout
    assert len(back) == SWAP_SIZE  # the file did not grow or shrink
    assert back[offset:offset + len(data)] == data
    assert back[:offset] == bytes(offset)
    served = (nfs_daemon.state_dir / "nfs-swap" / "localhost").read_bytes()
    assert served[offset:offset + len(data)] == data  # on the server's file, not just a cache
    assert metric(nfs_daemon, "netswap_nfs_calls_total", procedure="write") >= 1
    # Per procedure, like the NBD side: payload bytes, and a latency histogram per service.
    assert metric(nfs_daemon, "netswap_nfs_bytes_total", procedure="write") == len(data)
    assert metric(nfs_daemon, "netswap_nfs_bytes_total", procedure="read") == SWAP_SIZE
    writes = metric(nfs_daemon, "netswap_rpc_call_duration_seconds_count", service="nfs",
                    procedure="write")
    assert writes == metric(nfs_daemon, "netswap_nfs_calls_total", procedure="write")
    assert metric(nfs_daemon, "netswap_rpc_call_duration_seconds_sum", service="nfs",
                  procedure="write") > 0
    assert metric(nfs_daemon, "netswap_rpc_call_duration_seconds_count", service="mount",
                  procedure="mnt") >= 2


def test_with_swap_wipe_a_node_that_detaches_for_good_finds_its_swap_file_zeroed(tmp_path):
    daemon = start_nfs(tmp_path, LIBNFS_CLIENTS, swap_options='wipe = true\ndetach_grace = "0.5s"')
    try:
        data = os.urandom(1 * MiB)
        libnfs_write(daemon, data, 0, unmount=True)
        swap_file = daemon.state_dir / "nfs-swap" / "localhost"
        # The client unmounted the swap export: after the grace period the node detaches
        # for good and is wiped.
        wait_until(lambda: "node 'localhost' detached" in daemon.log(), timeout=15,
                   what=daemon.log)
        assert metric(daemon, "netswap_nfs_node_releases_total", reason="umnt") == 1
        st = swap_file.stat()
        assert swap_file.read_bytes() == bytes(SWAP_SIZE)
        assert st.st_blocks * 512 >= SWAP_SIZE  # zeroed in place, still no holes
        assert metric(daemon, "netswap_wipes_total", export="nfs:localhost") == 1
    finally:
        code = daemon.stop()
    assert "Traceback" not in daemon.log(), daemon.log()
    assert code == 0, daemon.log()

    # What a run leaves behind (a daemon killed before the node detached) is wiped at the
    # next start, before any client can read it.
    swap_file.write_bytes(os.urandom(SWAP_SIZE))
    daemon = start_nfs(tmp_path, LIBNFS_CLIENTS, daemon.nfs_port, daemon.mount_port,
                       swap_options='wipe = true\ndetach_grace = "0.5s"')
    try:
        assert swap_file.read_bytes() == bytes(SWAP_SIZE)
        assert metric(daemon, "netswap_wipes_total", export="nfs:localhost") == 1
    finally:
        assert daemon.stop() == 0, daemon.log()


def _nfs_daemon(tmp_path, swap_options: str, nfs_extra: str):
    return start_nfs(tmp_path, LIBNFS_CLIENTS + nfs_extra, swap_options=swap_options)


def test_mnt_of_the_swap_export_attaches_the_node_and_only_umnt_releases_it(tmp_path):
    # NFS has no connection per swap device: a node's reserve must not follow its TCP
    # connections (the kernel closes and reopens them at will), but what it says and does.
    daemon = _nfs_daemon(tmp_path, 'detach_grace = "0.5s"', 'swap_idle_timeout = "never"')
    try:
        run("nfs-ls", url(daemon, "/swap"))  # MNT of /swap, a READDIR, then it disconnects
        assert metric(daemon, "netswap_node_attaches_total") == 1
        time.sleep(2)  # four grace periods with no connection at all
        assert metric(daemon, "netswap_node_detaches_total") == 0, daemon.log()
        data = os.urandom(64 * 1024)
        libnfs_write(daemon, data, 0, unmount=True)  # swap-file I/O, then UMNT /swap
        assert metric(daemon, "netswap_node_attaches_total") == 1  # still the same attach
        wait_until(lambda: metric(daemon, "netswap_node_detaches_total") == 1, timeout=15,
                   what=daemon.log)
        assert metric(daemon, "netswap_nfs_node_releases_total", reason="umnt") == 1
        # Without swap.wipe the file keeps what was written.
        swap_file = daemon.state_dir / "nfs-swap" / "localhost"
        assert swap_file.read_bytes()[:len(data)] == data
    finally:
        code = daemon.stop()
    assert "Traceback" not in daemon.log(), daemon.log()
    assert code == 0, daemon.log()


def test_an_idle_node_is_released_keeps_its_pages_under_wipe_and_attaches_again(tmp_path):
    daemon = _nfs_daemon(tmp_path, 'wipe = true\ndetach_grace = "0.5s"',
                         'swap_idle_timeout = "1s"')
    try:
        first, second = os.urandom(1 * MiB), os.urandom(1 * MiB)
        libnfs_write(daemon, first, 0)  # no UMNT: a Linux node's UMNT never reaches us
        wait_until(lambda: metric(daemon, "netswap_node_detaches_total") == 1, timeout=15,
                   what=daemon.log)
        assert metric(daemon, "netswap_nfs_node_releases_total", reason="idle") == 1
        # Idle is not gone: the node's swapped pages stay, even with swap.wipe.
        assert metric(daemon, "netswap_wipes_total", export="nfs:localhost") == 0
        swap_file = daemon.state_dir / "nfs-swap" / "localhost"
        assert swap_file.read_bytes()[:MiB] == first
        libnfs_write(daemon, second, 2 * MiB)  # its next swap-file call attaches it again
        assert metric(daemon, "netswap_node_attaches_total") == 2
        contents = swap_file.read_bytes()
        assert contents[:MiB] == first and contents[2 * MiB:3 * MiB] == second
    finally:
        code = daemon.stop()
    assert "Traceback" not in daemon.log(), daemon.log()
    assert code == 0, daemon.log()


def test_netswapctl_detach_of_an_nfs_node_releases_and_wipes_its_swap_file(tmp_path):
    daemon = _nfs_daemon(tmp_path, "", 'swap_idle_timeout = "never"')
    control = daemon.config_path.parent / "control.sock"

    def netswapctl(*args):
        return subprocess.run([sys.executable, "-m", "netswap.ctl", "--socket", str(control),
                               *args], capture_output=True, text=True, timeout=60)
    try:
        libnfs_write(daemon, os.urandom(1 * MiB), 0)
        status = json.loads(netswapctl("--json", "status").stdout)
        assert status["attached_nodes"] == {"localhost": 1}
        result = netswapctl("detach", "localhost", "--wipe")
        assert result.returncode == 0, result.stderr
        assert "reserve released, swap wiped" in result.stdout, result.stdout
        assert metric(daemon, "netswap_nfs_node_releases_total", reason="operator") == 1
        swap_file = daemon.state_dir / "nfs-swap" / "localhost"
        assert swap_file.read_bytes() == bytes(SWAP_SIZE)
        assert json.loads(netswapctl("--json", "status").stdout)["attached_nodes"] == {}
        libnfs_write(daemon, b"back", 0)  # the node carries on: attached again
        assert metric(daemon, "netswap_node_attaches_total") == 2
        missing = netswapctl("detach", "never-seen")
        assert missing.returncode == 1 and "no swap export" in missing.stderr
    finally:
        code = daemon.stop()
    assert "Traceback" not in daemon.log(), daemon.log()
    assert code == 0, daemon.log()


def test_a_node_attached_over_nfs_only_is_in_the_node_metrics(nfs_daemon):
    run("nfs-ls", url(nfs_daemon, "/swap"))  # MNT of /swap attaches it; READDIR opens its file
    labels = {"node": "localhost", "export": "nfs:localhost"}
    assert metric(nfs_daemon, "netswap_node_connections", **labels) == 1
    assert metric(nfs_daemon, "netswap_node_swap_size_bytes", **labels) == SWAP_SIZE
    # A swap file is fully allocated (swapon refuses holes).
    assert metric(nfs_daemon, "netswap_node_swap_used_bytes", **labels) >= SWAP_SIZE


def test_exposition_after_nfs_traffic_passes_promtool(nfs_daemon):
    run("nfs-cat", url(nfs_daemon, "/swap/localhost"))
    run("nfs-ls", url(nfs_daemon, "/scratch"))
    assert metric(nfs_daemon, "netswap_rpc_call_duration_seconds_count", service="nfs",
                  procedure="read") >= 1
    with socket.create_connection(("127.0.0.1", nfs_daemon.nfs_port)):  # open, idle
        wait_until(lambda: metric(nfs_daemon, "netswap_rpc_open_connections", service="nfs") == 1,
                   timeout=15, what="the open connection is not counted")
        assert metric(nfs_daemon, "netswap_rpc_open_connections", service="mount") == 0
    text = nfs_daemon.metrics()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


def test_a_node_swapping_over_nbd_and_nfs_has_one_reserve_and_wipe_covers_both(tmp_path):
    from support.libnbd import import_libnbd

    nbd = import_libnbd()
    daemon = _nfs_daemon(tmp_path, 'wipe = true\ndetach_grace = "0.5s"',
                         'swap_idle_timeout = "never"')
    try:
        handle = nbd.NBD()
        handle.connect_uri(daemon.uri("swap/localhost"))  # the same node, over NBD
        handle.pwrite(b"n" * 65536, 0)
        handle.flush()
        libnfs_write(daemon, b"f" * 65536, 0)  # and over NFS: attaches through its file
        assert metric(daemon, "netswap_node_attaches_total") == 1  # one reserve
        control = daemon.config_path.parent / "control.sock"
        status = json.loads(subprocess.run(
            [sys.executable, "-m", "netswap.ctl", "--socket", str(control), "--json", "status"],
            capture_output=True, text=True, timeout=60).stdout)
        assert status["attached_nodes"] == {"localhost": 2}  # its NBD connection, its NFS hold
        assert status["reserve_tree"].count("swap/localhost ") == 1, status["reserve_tree"]
        handle.shutdown()
        libnfs_write(daemon, b"f", 0, unmount=True)  # its UMNT: NFS lets go for good
        wait_until(lambda: metric(daemon, "netswap_node_detaches_total") == 1, timeout=15,
                   what=daemon.log)
        # Detached for good: both of its swap areas are wiped, not only the first attached.
        assert metric(daemon, "netswap_wipes_total", export="swap/localhost") == 1
        assert metric(daemon, "netswap_wipes_total", export="nfs:localhost") == 1
        assert (daemon.state_dir / "nfs-swap" / "localhost").read_bytes() == bytes(SWAP_SIZE)
    finally:
        code = daemon.stop()
    assert "Traceback" not in daemon.log(), daemon.log()
    assert code == 0, daemon.log()
