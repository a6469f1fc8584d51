"""Every command, flag and error path through libnbd (Debian's python3-libnbd), a client
no one here wrote, against a real netswapd."""

import errno
import hashlib
import os

import pytest

from support.libnbd import import_libnbd

nbd = import_libnbd()

MiB = 1 << 20


def connect(uri, structured=True, strict=True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if not strict:
        # Let libnbd send what the protocol forbids, so the server's checks are reached.
        h.set_strict_mode(0)
    h.connect_uri(uri)
    return h


@pytest.fixture(params=[True, False], ids=["structured", "simple"])
def structured(request):
    return request.param


def test_flags_advertised(daemon):
    h = nbd.NBD()
    h.set_full_info(True)  # ask for NAME and DESCRIPTION; the server sends only what is asked
    h.connect_uri(daemon.uri("disk"))
    assert h.get_size() == 64 * MiB
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
    assert h.can_cache() and h.can_multi_conn() and not h.is_read_only()
    assert h.get_export_name() == "disk"
    assert h.get_export_description() == "a file export"
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
    h.shutdown()


@pytest.mark.parametrize("export", ["disk", "ram", "swap/node-a"])
def test_every_command(daemon, export, structured):
    h = connect(daemon.uri(export), structured=structured)
    assert h.get_structured_replies_negotiated() == structured
    data = os.urandom(3 * MiB)
    h.pwrite(data, 5 * MiB)
    h.pwrite(data[:4096], 40 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(3 * MiB, 5 * MiB) == data
    h.trim(MiB, 5 * MiB)
    h.zero(MiB, 6 * MiB)
    h.zero(4096, 7 * MiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    h.cache(MiB, 0)
    got = h.pread(3 * MiB, 5 * MiB)
    # TRIM leaves contents unspecified; WRITE_ZEROES must read back as zeros.
    assert got[MiB : 2 * MiB + 4096] == bytes(MiB + 4096)
    assert got[2 * MiB + 4096 :] == data[2 * MiB + 4096 :]
    assert h.pread(4096, 40 * MiB) == data[:4096]
    h.shutdown()


def test_largest_request_32mib(daemon):
    h = connect(daemon.uri("disk"))
    data = os.urandom(32 * MiB)
    h.pwrite(data, 0)
    assert hashlib.sha256(h.pread(32 * MiB, 0)).digest() == hashlib.sha256(data).digest()
    h.shutdown()


def test_many_requests_in_flight_complete_out_of_order(daemon):
    h = connect(daemon.uri("disk"))
    blocks = {i: os.urandom(64 * 1024) for i in range(128)}
    cookies = [h.aio_pwrite(blocks[i], i * 64 * 1024) for i in range(128)]
    while h.aio_in_flight():
        h.poll(-1)
    for cookie in cookies:
        assert h.aio_command_completed(cookie)
    buffers = {i: nbd.Buffer(64 * 1024) for i in range(128)}
    for i, buf in buffers.items():
        h.aio_pread(buf, i * 64 * 1024)
    while h.aio_in_flight():
        h.poll(-1)
    for i, buf in buffers.items():
        assert buf.to_bytearray() == blocks[i]
    h.shutdown()


def test_multi_conn_flush_covers_writes_from_another_connection(daemon):
    a = connect(daemon.uri("disk"))
    b = connect(daemon.uri("disk"))
    data = os.urandom(MiB)
    a.pwrite(data, 0)
    b.flush()
    assert b.pread(MiB, 0) == data
    a.shutdown()
    b.shutdown()


def expect_error(call, code):
    with pytest.raises(nbd.Error) as err:
        call()
    # libnbd reports the errno by name ("EINVAL").
    assert err.value.errno == errno.errorcode[code], err.value
    return err.value


def test_error_paths(daemon, structured):
    h = connect(daemon.uri("disk"), structured=structured, strict=False)
    size = h.get_size()
    expect_error(lambda: h.pread(4096, size - 100), errno.EINVAL)
    expect_error(lambda: h.pwrite(b"x" * 4096, size - 100), errno.ENOSPC)
    expect_error(lambda: h.trim(4096, size), errno.EINVAL)
    expect_error(lambda: h.zero(4096, size), errno.ENOSPC)
    expect_error(lambda: h.cache(4096, size), errno.EINVAL)
    expect_error(lambda: h.pread(0, 0), errno.EINVAL)
    expect_error(lambda: h.pwrite(b"", 0), errno.EINVAL)
    expect_error(lambda: h.pread(4096, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL)
    expect_error(lambda: h.pread(4096, 0, nbd.CMD_FLAG_FAST_ZERO), errno.EINVAL)
    expect_error(lambda: h.block_status(4096, 0, lambda *args: 0), errno.EINVAL)  # no context
    # A rejected WRITE's payload is drained: the connection keeps working afterwards.
    expect_error(lambda: h.pwrite(os.urandom(MiB), size - 4096), errno.ENOSPC)
    h.pwrite(b"still in sync", 0)
    assert h.pread(13, 0) == b"still in sync"
    h.shutdown()


def test_oversized_read_is_refused_and_connection_survives(daemon):
    h = connect(daemon.uri("disk"), strict=False)
    expect_error(lambda: h.pread(33 * MiB, 0), errno.EINVAL)
    assert len(h.pread(4096, 0)) == 4096
    h.shutdown()


def test_read_only_export(daemon, structured):
    h = connect(daemon.uri("ro"), structured=structured, strict=False)
    assert h.is_read_only() and not h.can_trim()
    assert h.pread(1024, 0) == bytes(range(256)) * 4
    expect_error(lambda: h.pwrite(b"x" * 512, 0), errno.EPERM)
    expect_error(lambda: h.trim(512, 0), errno.EPERM)
    expect_error(lambda: h.zero(512, 0), errno.EPERM)
    assert h.pread(1024, 0) == bytes(range(256)) * 4
    h.shutdown()


def test_unknown_export_is_refused(daemon):
    for name in ["nope", "swap/../../etc", "swap/UPPER", "swap/" + "a" * 64, "swap/", "swap/a/b"]:
        h = nbd.NBD()
        with pytest.raises(nbd.Error) as err:
            h.connect_uri(daemon.uri(name))
        assert err.value.errno == "ENOENT", err.value  # libnbd's rendering of ERR_UNKNOWN
    swap_dir = daemon.state_dir / "swap"
    assert not swap_dir.exists() or list(swap_dir.iterdir()) == []


def test_per_node_swap_export_created_sparse_0600(daemon):
    h = connect(daemon.uri("swap/node-7"))
    assert h.get_size() == 64 * MiB
    h.pwrite(b"page" * 1024, 0)
    h.shutdown()
    files = list((daemon.state_dir / "swap").iterdir())
    assert [f.name for f in files] == ["node-7.img"]
    st = files[0].stat()
    assert st.st_mode & 0o777 == 0o600
    assert st.st_size == 64 * MiB and st.st_blocks * 512 < MiB


def test_unix_socket(daemon):
    h = nbd.NBD()
    h.connect_uri(daemon.unix_uri("disk"))
    h.pwrite(b"over unix", 0)
    assert h.pread(9, 0) == b"over unix"
    h.shutdown()


def test_ipv6_listener(daemon):
    h = nbd.NBD()
    h.connect_uri(f"nbd://[::1]:{daemon.port}/disk")
    assert h.get_size() == 64 * MiB
    h.shutdown()


def test_list_and_info_in_opt_mode(daemon):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(daemon.uri(""))
    listed = []
    h.opt_list(lambda name, description: listed.append((name, description)) or 0)
    assert {("disk", "a file export"), ("ram", "remote RAM"), ("ro", "read only")} <= set(listed)
    h.set_export_name("ram")
    h.opt_info()
    assert h.get_size() == 64 * MiB
    # A failed INFO leaves the handshake usable: the client may try another export.
    h.set_export_name("missing")
    with pytest.raises(nbd.Error):
        h.opt_info()
    h.set_export_name("disk")
    h.opt_go()
    assert h.get_size() == 64 * MiB
    h.shutdown()
