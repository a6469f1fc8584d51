"""What NfsExports.resolve remembers between calls (handles, swap files, scratch paths) never
changes what a handle resolves to: real files under tmp_path, the real exports object, each
handle used once first so the remembered entry is what the second resolve meets."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from netswap import config
from netswap.nfs.exports import (
    NFS3ERR_ACCES, NFS3ERR_BADHANDLE, NFS3ERR_STALE, SCRATCH_EXPORT, SWAP_EXPORT, NfsError,
    NfsExports,
)
from netswap.nfs.handles import FileHandle, decode, encode
from netswap.rpc import message as rpc

ALPHA, BETA = "127.0.0.1", "127.0.0.2"


@pytest.fixture
def exports(tmp_path):
    cfg = config.parse({
        "daemon": {"state_dir": str(tmp_path / "state")},
        "nfs": {"enabled": True, "swap_size": "1MiB",
                "nodes": {"alpha": [f"{ALPHA}/32"], "beta": [f"{BETA}/32"]}},
    })
    (tmp_path / "state").mkdir()
    served = NfsExports(cfg, tmp_path / "state")
    yield served
    served.close()


def scratch_file(exports, name: str, data: bytes):
    """(path, handle) of a new scratch file, resolved once (now remembered)."""
    directory = exports.roots[exports.config.scratch_export][1]
    path = directory / name
    path.write_bytes(data)
    root = exports.resolve(exports.root_handle(exports.config.scratch_export), ALPHA)
    handle = exports.handle_for(exports.lookup(root, name, ALPHA))
    assert exports.resolve(handle, ALPHA).path == path
    return path, handle


def swap_handle(exports, peer: str) -> bytes:
    root = exports.resolve(exports.root_handle(exports.config.swap_export), peer)
    return exports.handle_for(exports.lookup(root, exports.node_of(peer), peer))


def status(call) -> int:
    with pytest.raises(NfsError) as caught:
        call()
    return caught.value.status


def test_a_scratch_file_replaced_under_its_name_makes_the_old_handle_stale(exports):
    path, handle = scratch_file(exports, "a", b"old")
    replacement = path.with_name("a.new")
    replacement.write_bytes(b"new")
    os.replace(replacement, path)  # same name, another inode
    assert status(lambda: exports.resolve(handle, ALPHA)) == NFS3ERR_STALE


def made_again(path, data: bytes, handle: bytes, exports) -> None:
    """Remove the scratch file at `path` and make another under its name; skip unless the
    file system gave the new file the old one's inode number (what the test is about; ext4
    does at once). The old handle is used in between, as a client would: the daemon keeps a
    file it served open, holding its inode (and number) until a call finds it gone."""
    path.unlink()
    assert status(lambda: exports.resolve(handle, ALPHA)) == NFS3ERR_STALE
    path.write_bytes(data)
    if path.stat().st_ino != decode(exports.key, handle).fileid:
        pytest.skip("this file system did not reuse the inode number")


@pytest.mark.parametrize("remembered", [True, False], ids=["remembered", "scanned"])
def test_a_scratch_file_removed_and_made_again_under_its_inode_number_is_stale(
        exports, tmp_path, remembered):
    path, handle = scratch_file(exports, "a", b"old")
    made_again(path, b"new", handle, exports)
    if not remembered:  # a restart: nothing remembered, the directory is scanned
        exports.close()
        exports = NfsExports(config.parse({
            "daemon": {"state_dir": str(tmp_path / "state")}, "nfs": {"enabled": True}}),
            tmp_path / "state")
    try:
        assert status(lambda: exports.resolve(handle, ALPHA)) == NFS3ERR_STALE
        root = exports.resolve(exports.root_handle(exports.config.scratch_export), ALPHA)
        fresh = exports.handle_for(exports.lookup(root, "a", ALPHA))
        assert fresh != handle and exports.resolve(fresh, ALPHA).path.read_bytes() == b"new"
    finally:
        if not remembered:
            exports.close()


def test_a_served_scratch_file_stays_open_until_the_last_call_holding_it_ends(exports):
    """READ and WRITE use the descriptor resolve() keeps open. A call still holding it when
    the file is found gone (and dropped) keeps it usable; the last release closes it."""
    path, handle = scratch_file(exports, "a", b"data")
    node = exports.resolve(handle, ALPHA)
    fd = node.scratch.acquire(write=True)
    assert fd is not None and exports.resolve(handle, ALPHA).scratch is node.scratch
    path.unlink()
    assert status(lambda: exports.resolve(handle, ALPHA)) == NFS3ERR_STALE  # dropped now
    assert node.scratch.acquire() is None  # no new call takes it
    assert os.pread(fd, 4, 0) == b"data"  # the one holding it still reads its file
    node.scratch.release()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by that last release


def test_a_scratch_file_that_cannot_be_opened_for_writing_is_still_served(exports):
    """A program running from the export cannot be opened read-write (ETXTBSY), but it is
    there: its handle resolves, read-only (not NFS3ERR_STALE)."""
    directory = exports.roots[exports.config.scratch_export][1]
    program = directory / "sleeper"
    shutil.copy(shutil.which("sleep"), program)
    program.chmod(0o755)
    running = subprocess.Popen([str(program), "60"])
    try:
        root = exports.resolve(exports.root_handle(exports.config.scratch_export), ALPHA)
        handle = exports.handle_for(exports.lookup(root, "sleeper", ALPHA))
        node = exports.resolve(handle, ALPHA)
        assert node.path == program and exports.resolve(handle, ALPHA).scratch is node.scratch
        assert node.scratch.acquire(write=True) is None
        fd = node.scratch.acquire()
        assert fd is not None and os.pread(fd, 4, 0) == b"\x7fELF"
        node.scratch.release()
    finally:
        running.kill()
        running.wait()


def test_a_renamed_scratch_file_is_still_found_by_its_handle(exports):
    path, handle = scratch_file(exports, "a", b"data")
    path.rename(path.with_name("b"))
    node = exports.resolve(handle, ALPHA)
    assert node.path == path.with_name("b") and node.path.read_bytes() == b"data"
    assert node.export_id == SCRATCH_EXPORT and not node.is_dir


def test_a_removed_scratch_file_makes_its_handle_stale(exports):
    path, handle = scratch_file(exports, "a", b"data")
    path.unlink()
    assert status(lambda: exports.resolve(handle, ALPHA)) == NFS3ERR_STALE


def test_a_scratch_handle_resolution_carries_the_stat_it_was_checked_with(exports):
    path, handle = scratch_file(exports, "a", b"12345")
    node = exports.resolve(handle, ALPHA)
    assert node.st is not None and node.st.st_size == 5 and node.st.st_ino == path.stat().st_ino


def test_a_scrub_makes_a_remembered_swap_handle_stale(exports):
    handle = swap_handle(exports, ALPHA)
    assert exports.resolve(handle, ALPHA).swap_owner == "alpha"
    exports.swap.scrub("alpha")
    assert status(lambda: exports.resolve(handle, ALPHA)) == NFS3ERR_STALE
    fresh = swap_handle(exports, ALPHA)
    assert fresh != handle and exports.resolve(fresh, ALPHA).swap_owner == "alpha"


def test_a_remembered_swap_handle_is_refused_to_another_node(exports):
    handle = swap_handle(exports, ALPHA)
    for _ in range(2):  # first and remembered
        assert exports.resolve(handle, ALPHA).swap_owner == "alpha"
        assert status(lambda: exports.resolve(handle, BETA)) == NFS3ERR_ACCES


def test_a_swap_handle_is_stale_once_the_swap_export_is_no_longer_served(exports, tmp_path):
    handle = swap_handle(exports, ALPHA)
    exports.close()
    without_swap = NfsExports(config.parse({
        "daemon": {"state_dir": str(tmp_path / "state")},
        "nfs": {"enabled": True, "swap_export": ""},
    }), tmp_path / "state")  # the same key: the handle's MAC still holds
    try:
        assert status(lambda: without_swap.resolve(handle, ALPHA)) == NFS3ERR_STALE
        made_up = encode(without_swap.key, FileHandle(SWAP_EXPORT, 12345, 7))
        assert status(lambda: without_swap.resolve(made_up, ALPHA)) == NFS3ERR_STALE
    finally:
        without_swap.close()


def test_a_handle_differing_in_one_byte_from_a_remembered_one_is_refused(exports):
    handle = swap_handle(exports, ALPHA)
    exports.resolve(handle, ALPHA)
    for index in range(len(handle)):
        forged = bytearray(handle)
        forged[index] ^= 1
        assert status(lambda: exports.resolve(bytes(forged), ALPHA)) == NFS3ERR_BADHANDLE


# -- parse_call's fast path --------------------------------------------------------------------


def _call(cred, verifier=(0, b"")) -> bytes:
    header = rpc.call_header(42, 100003, 3, 6, cred)
    flavor, body = verifier
    # call_header ends with an AUTH_NONE verifier; swap in the one asked for.
    header = header[:-8] + flavor.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body
    return header + b"ARGS"


@pytest.mark.parametrize("cred", [None, rpc.AuthSys(1, "node", 0, 0, (0, 5)),
                                  rpc.AuthSys(7, "other", 1000, 100)])
def test_parse_call_gives_the_credential_of_each_call(cred):
    for _ in range(2):  # the second time from the remembered credentials
        call = rpc.parse_call(_call(cred))
        assert (call.xid, call.prog, call.vers, call.proc) == (42, 100003, 3, 6)
        assert call.cred == cred and bytes(call.args) == b"ARGS"


def test_parse_call_refuses_a_verifier_it_cannot_check_after_a_good_call():
    cred = rpc.AuthSys(1, "node", 0, 0)
    rpc.parse_call(_call(cred))
    with pytest.raises(rpc.AuthFailure) as caught:
        rpc.parse_call(_call(cred, verifier=(1, bytes(8))))
    assert caught.value.reason == "auth_badverf"


def test_parse_call_refuses_a_malformed_auth_sys_body_every_time():
    record = bytearray(_call(rpc.AuthSys(1, "node", 0, 0)))
    record[7 * 4 + 3] += 4  # the credential claims 4 more bytes than its fields hold
    record[8 * 4:8 * 4] = bytes(4)
    for _ in range(2):
        with pytest.raises(rpc.AuthFailure) as caught:
            rpc.parse_call(bytes(record))
        assert caught.value.reason == "auth_badcred"
