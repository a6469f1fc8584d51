"""The portmapper side of NFS (issue 7, "optional portmapper v2"): clients that give no ports.

Real clients: `rpcinfo` (libtirpc) and libnfs's `nfs-ls` with URLs that carry no nfsport= or
mountport=, so they must ask port 111; a real `rpcbind` for the register mode. Port 111 and
rpcbind's /run files belong to the host, so those tests run in a private network namespace
(`ip netns`), with rpcbind in a private mount namespace whose /run is a directory of the
test's own. The daemon serves NFS and MOUNT on ports no client would guess (not 2049/20048),
so a listing proves the portmapper told the client where to go.

Raw sockets into the namespace come from a short-lived thread that setns()es into it: a
socket keeps the namespace it was made in, whichever thread then uses it.
"""

from __future__ import annotations

import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from netswap.rpc import constants as RC
from netswap.rpc import message as rpc
from netswap.rpc import portmap
from support.daemon import free_port, start_daemon, stop_clean
from support.metrics import metric_matching
from support.netns import FOREIGN, run, scrape

NFS_PORT, MOUNT_PORT = 2111, 21111  # inside the namespace: anything but the defaults
NFS_PROG, MOUNT_PROG, PMAP_PROG = 100003, 100005, 100000
TCP = 6


@pytest.fixture
def rpcbind(netns):
    """A real rpcbind on port 111 of the namespace; its /run is a private directory, where
    its AF_LOCAL socket is reachable from outside at `.socket`."""
    # Short: the socket's path must fit in sun_path (108 bytes).
    run_dir = Path(tempfile.mkdtemp(prefix="nsw-rpcb-"))
    process = subprocess.Popen(
        netns.exec("unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f"mount --bind {run_dir} /run && exec rpcbind -f"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while netns.run("rpcinfo", "-p", "127.0.0.1", check=False).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rpcbind did not start: {process.stderr.read()}")
            time.sleep(0.1)
        process.socket = run_dir / "rpcbind.sock"
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(run_dir, ignore_errors=True)


def start_in(netns, tmp_path, portmapper_options: str, nfs_host: str = "127.0.0.1"):
    daemon = start_daemon(tmp_path, prefix=netns.exec(), nfs_options=f"""
        enabled = true
        listen = ["{nfs_host}:{NFS_PORT}"]
        mount_listen = ["127.0.0.1:{MOUNT_PORT}"]
        swap_size = "4MiB"
        {portmapper_options}
        """)
    daemon.metrics = lambda: scrape(netns, daemon.metrics_port)
    (daemon.state_dir / "nfs-scratch").mkdir(exist_ok=True)
    (daemon.state_dir / "nfs-scratch" / "found-by-portmap.txt").write_text("hello\n")
    return daemon


def rpcinfo_mappings(netns) -> set[tuple[int, int, str, int]]:
    """(program, version, proto, port) rows of `rpcinfo -p 127.0.0.1`."""
    rows = set()
    for line in netns.run("rpcinfo", "-p", "127.0.0.1").stdout.splitlines()[1:]:
        prog, vers, proto, port = line.split()[:4]
        rows.add((int(prog), int(vers), proto, int(port)))
    return rows


def nfs_ls_without_ports(netns) -> str:
    return netns.run("nfs-ls", "nfs://127.0.0.1/scratch?version=3").stdout


# --------------------------------------------------------------------------- a raw client


class Closed(Exception):
    pass


class Client:
    def __init__(self, sock: socket.socket, host: str = "127.0.0.1", port: int = 111) -> None:
        self.sock = sock
        self.sock.connect((host, port))
        self.xid = 0

    def send(self, record: bytes) -> None:
        self.sock.sendall(rpc.fragment_header(len(record)) + record)

    def receive(self) -> rpc.Reply:
        header = self._exact(4)
        _, length = rpc.parse_fragment_header(header)
        return rpc.parse_reply(self._exact(length))

    def call(self, proc: int, args: bytes = b"", vers: int = 2, prog: int = PMAP_PROG):
        self.xid += 1
        self.send(rpc.call_header(self.xid, prog, vers, proc) + args)
        reply = self.receive()
        assert reply.xid == self.xid
        return reply

    def _exact(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise Closed()
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def mapping(prog: int, vers: int = 3, prot: int = TCP, port: int = 0) -> bytes:
    return struct.pack(">4I", prog, vers, prot, port)


def rpcb(prog: int, vers: int, netid: str, address: str, owner: str = "") -> bytes:
    out = struct.pack(">2I", prog, vers)
    for text in (netid, address, owner):
        data = text.encode()
        out += struct.pack(">I", len(data)) + data + bytes(-len(data) & 3)
    return out


def getport(client: Client, prog: int, vers: int = 3) -> int:
    reply = client.call(3, mapping(prog, vers))
    assert (reply.accepted, reply.stat) == (True, RC.SUCCESS)
    return struct.unpack(">I", reply.results)[0]


def answer_bool(reply) -> bool:
    assert (reply.accepted, reply.stat) == (True, RC.SUCCESS), reply
    (value,) = struct.unpack(">I", reply.results)
    return bool(value)


# --------------------------------------------------------------------------- serve


def test_rpcinfo_and_nfs_ls_find_the_ports_at_our_own_portmapper(netns, tmp_path):
    daemon = start_in(netns, tmp_path, 'portmapper = "serve"')
    try:
        rows = rpcinfo_mappings(netns)
        assert {(NFS_PROG, 3, "tcp", NFS_PORT), (MOUNT_PROG, 3, "tcp", MOUNT_PORT),
                (PMAP_PROG, 2, "tcp", 111)} <= rows, rows
        assert not any(proto == "udp" for _, _, proto, _ in rows)  # TCP only, as served
        assert "found-by-portmap.txt" in nfs_ls_without_ports(netns)
        # rpcinfo -p asks rpcbind v4 GETADDR first (then DUMPs over v2); libnfs GETPORTs.
        for procedure in ("getaddr", "dump", "getport"):
            assert metric_matching(daemon, "netswap_portmap_calls_total", procedure=procedure) >= 1, \
                procedure
    finally:
        log = stop_clean(daemon)
    assert "portmap served on 127.0.0.1:111" in log


def test_mount_nfs_asks_our_portmapper_for_both_ports(netns, tmp_path):
    # The node-side mount line without port= and mountport= (README, "Over NFSv3").
    daemon = start_in(netns, tmp_path, 'portmapper = "serve"')
    target = tmp_path / "mnt"
    target.mkdir()
    try:
        # ip netns exec runs it in a mount namespace of its own; unmounted in the same
        # shell all the same, should this kernel have NFS and the mount succeed.
        result = netns.run("sh", "-c", f"mount.nfs 127.0.0.1:/scratch {target} -v -o "
                           f"vers=3,proto=tcp,mountproto=tcp,nolock,soft,retry=0 && "
                           f"{{ ls {target}; umount {target}; }}", check=False)
        output = result.stdout + result.stderr
        assert f"prog {NFS_PROG} vers 3 prot TCP port {NFS_PORT}" in output, output
        assert f"prog {MOUNT_PROG} vers 3 prot TCP port {MOUNT_PORT}" in output, output
        # Without NFS in the kernel (CI containers) mount(2) fails after the lookups.
        assert ((result.returncode == 0 and "found-by-portmap.txt" in output)
                or "mount(2): No such device" in output), output
        assert metric_matching(daemon, "netswap_portmap_calls_total", procedure="getport") >= 2
    finally:
        stop_clean(daemon)


def test_a_served_portmapper_refuses_changes_relays_and_garbage_and_carries_on(netns, tmp_path):
    daemon = start_in(netns, tmp_path, f"""
        portmapper = "serve"
        portmapper_listen = ["127.0.0.1:111", "{FOREIGN}:111"]
        """)
    try:
        local = Client(netns.socket())
        foreign = Client(netns.socket(source=FOREIGN), host=FOREIGN)
        assert getport(local, NFS_PROG) == NFS_PORT

        # Nobody rebinds our programs: SET/UNSET answer FALSE, from a foreign address or
        # from loopback, in PMAP v2 and in rpcbind v4; the table is unchanged after.
        assert not answer_bool(foreign.call(1, mapping(NFS_PROG, port=4444)))
        assert not answer_bool(foreign.call(2, mapping(NFS_PROG)))
        assert not answer_bool(local.call(1, mapping(MOUNT_PROG, port=4444)))
        assert not answer_bool(local.call(
            1, rpcb(NFS_PROG, 3, "tcp", "127.0.0.1.17.92"), vers=4))
        assert not answer_bool(local.call(2, rpcb(MOUNT_PROG, 3, "tcp", ""), vers=4))
        assert (getport(local, NFS_PROG), getport(foreign, MOUNT_PROG)) == (NFS_PORT, MOUNT_PORT)
        assert getport(local, NFS_PROG, vers=2) == 0  # not served: port 0 (RFC 1833 §3.2)
        assert getport(local, 100021, vers=4) == 0    # NLM: not served

        # Truncated or overlong arguments: GARBAGE_ARGS, and the connection lives on.
        for proc, args, vers in ((3, mapping(NFS_PROG)[:8], 2),      # GETPORT cut short
                                 (1, mapping(NFS_PROG)[:12], 2),     # SET cut short
                                 (3, mapping(NFS_PROG) + b"xtra", 2),  # bytes left over
                                 (3, rpcb(NFS_PROG, 3, "tcp", "")[:14], 4),  # GETADDR
                                 (0, b"junk", 2)):                   # NULL takes nothing
            reply = local.call(proc, args, vers=vers)
            assert (reply.accepted, reply.stat) == (True, RC.GARBAGE_ARGS), (proc, args)
        # Relays and the unknown: PROC_UNAVAIL; versions outside 2..4: PROG_MISMATCH.
        callit = mapping(NFS_PROG)[:12] + struct.pack(">I", 0)  # prog, vers, proc, args<>
        assert local.call(5, callit).stat == RC.PROC_UNAVAIL
        assert local.call(10, b"", vers=4).stat == RC.PROC_UNAVAIL  # INDIRECT
        assert local.call(9, b"").stat == RC.PROC_UNAVAIL
        mismatch = local.call(0, b"", vers=5)
        assert (mismatch.stat, mismatch.mismatch) == (RC.PROG_MISMATCH, (2, 4))
        assert local.call(0, b"", prog=NFS_PROG, vers=3).stat == RC.PROG_UNAVAIL
        # rpcbind v4 GETADDR, as IPv6 clients and rpcinfo ask it.
        reply = local.call(3, rpcb(MOUNT_PROG, 3, "tcp", ""), vers=4)
        (length,) = struct.unpack(">I", reply.results[:4])
        assert bytes(reply.results[4:4 + length]) == \
            f"127.0.0.1.{MOUNT_PORT >> 8}.{MOUNT_PORT & 0xFF}".encode()

        # A record that is no call, and a forged 2 GiB one: the connection is closed.
        for hostile in (rpc.fragment_header(8) + struct.pack(">2I", 1, RC.REPLY),
                        struct.pack(">I", 0xFFFF_FFF0)):
            victim = Client(netns.socket())
            victim.sock.sendall(hostile)
            with pytest.raises((Closed, ConnectionResetError)):
                victim.receive()
            victim.close()

        # The daemon carries on: the old connection, a new one, and a real client.
        assert getport(local, MOUNT_PROG) == MOUNT_PORT
        assert getport(Client(netns.socket()), NFS_PROG) == NFS_PORT
        assert "found-by-portmap.txt" in nfs_ls_without_ports(netns)
        assert metric_matching(daemon, "netswap_access_denied_total", export_reason="portmap:set") == 3
        assert metric_matching(daemon, "netswap_access_denied_total", export_reason="portmap:unset") == 2
        assert metric_matching(daemon, "netswap_rpc_protocol_errors_total", reason="garbage_args") == 5
        assert metric_matching(daemon, "netswap_portmap_calls_total", procedure="callit") == 1
        local.close()
        foreign.close()
    finally:
        log = stop_clean(daemon)
    assert f"portmap {FOREIGN}: SET of program {NFS_PROG}" in log


def test_getaddr_answers_a_wildcard_listener_with_the_address_the_caller_reached(netns,
                                                                                  tmp_path):
    daemon = start_in(netns, tmp_path, 'portmapper = "serve"', nfs_host="*")
    try:
        client = Client(netns.socket())
        reply = client.call(3, rpcb(NFS_PROG, 3, "", ""), vers=3)  # netid "": the caller's
        (length,) = struct.unpack(">I", reply.results[:4])
        assert bytes(reply.results[4:4 + length]) == \
            f"127.0.0.1.{NFS_PORT >> 8}.{NFS_PORT & 0xFF}".encode()
        assert getport(client, NFS_PROG) == NFS_PORT
        client.close()
    finally:
        stop_clean(daemon)


def test_universal_addresses_follow_rfc_5665():
    assert portmap.universal_address("127.0.0.1", 2049) == ("tcp", "127.0.0.1.8.1")
    assert portmap.universal_address("", 111) == ("tcp", "0.0.0.0.0.111")
    assert portmap.universal_address("::1", 20048) == ("tcp6", "::1.78.80")
    assert portmap.Registration(1, 1, "tcp6", "::1.78.80").port == 20048


def test_serve_on_a_taken_port_fails_the_start_naming_the_key(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="nfs.portmapper_listen"):
            start_daemon(tmp_path, nfs_options=f"""
                enabled = true
                listen = ["127.0.0.1:{free_port()}"]
                mount_listen = ["127.0.0.1:{free_port()}"]
                portmapper = "serve"
                portmapper_listen = ["127.0.0.1:{port}"]
                """)


# --------------------------------------------------------------------------- register


def test_a_real_rpcbind_lists_our_ports_while_we_run_and_not_after(netns, rpcbind, tmp_path):
    # Another NFS server's MOUNT mapping, there before us (Debian's rpcbind takes a PMAP v2
    # SET from loopback): ours must not replace it, nor remove it at stop.
    other = Client(netns.socket())
    assert answer_bool(other.call(1, mapping(MOUNT_PROG, port=4000)))
    other.close()

    daemon = start_in(netns, tmp_path, f"""
        portmapper = "register"
        rpcbind_socket = "{rpcbind.socket}"
        """)
    try:
        rows = rpcinfo_mappings(netns)
        assert (NFS_PROG, 3, "tcp", NFS_PORT) in rows, rows
        assert (MOUNT_PROG, 3, "tcp", 4000) in rows and \
            (MOUNT_PROG, 3, "tcp", MOUNT_PORT) not in rows, rows
        assert metric_matching(daemon, "netswap_rpcbind_registration_failures_total",
                      reason="taken") == 1
        # nfs-ls finds NFS through rpcbind; MOUNT it would find at 4000, where no one
        # listens, so it gets the MOUNT port from the URL (the explicit form still works).
        listing = netns.run("nfs-ls",
                            f"nfs://127.0.0.1/scratch?version=3&mountport={MOUNT_PORT}").stdout
        assert "found-by-portmap.txt" in listing
    finally:
        log = stop_clean(daemon)
    rows = rpcinfo_mappings(netns)
    assert not any(prog == NFS_PROG for prog, *_ in rows), rows  # unregistered at stop
    assert (MOUNT_PROG, 3, "tcp", 4000) in rows, rows            # the other one untouched
    assert "rpcbind: registered NFS v3 on tcp 127.0.0.1" in log
    assert "rpcbind: unregistered NFS v3" in log


def test_both_ports_registered_make_a_portless_url_work(netns, rpcbind, tmp_path):
    daemon = start_in(netns, tmp_path, f"""
        portmapper = "register"
        rpcbind_socket = "{rpcbind.socket}"
        """)
    try:
        rows = rpcinfo_mappings(netns)
        assert {(NFS_PROG, 3, "tcp", NFS_PORT), (MOUNT_PROG, 3, "tcp", MOUNT_PORT)} <= rows
        assert "found-by-portmap.txt" in nfs_ls_without_ports(netns)
    finally:
        stop_clean(daemon)
    assert not {prog for prog, *_ in rpcinfo_mappings(netns)} & {NFS_PROG, MOUNT_PROG}


def test_a_registration_left_by_a_killed_daemon_is_taken_over(netns, rpcbind, tmp_path):
    options = f"""
        portmapper = "register"
        rpcbind_socket = "{rpcbind.socket}"
        """
    for run_dir in ("first", "second"):
        (tmp_path / run_dir).mkdir()
    first = start_in(netns, tmp_path / "first", options)
    first.stop(sig=signal.SIGKILL)  # no UNSET
    assert (NFS_PROG, 3, "tcp", NFS_PORT) in rpcinfo_mappings(netns)
    second = start_in(netns, tmp_path / "second", options)
    try:
        # rpcbind answers a SET of the very same address TRUE: the restart owns it again.
        assert metric_matching(second, "netswap_rpcbind_registration_failures_total",
                      reason="taken") == 0
        assert "found-by-portmap.txt" in nfs_ls_without_ports(netns)
    finally:
        log = stop_clean(second)
    assert "rpcbind: unregistered MOUNT v3" in log
    assert not {prog for prog, *_ in rpcinfo_mappings(netns)} & {NFS_PROG, MOUNT_PROG}


def test_register_without_rpcbind_starts_with_a_warning_and_serves(tmp_path):
    nfs_port, mount_port = free_port(), free_port()
    daemon = start_daemon(tmp_path, nfs_options=f"""
        enabled = true
        listen = ["127.0.0.1:{nfs_port}"]
        mount_listen = ["127.0.0.1:{mount_port}"]
        portmapper = "register"
        rpcbind_socket = "{tmp_path / 'no-rpcbind.sock'}"
        """)
    try:
        assert metric_matching(daemon, "netswap_rpcbind_registration_failures_total",
                      reason="unreachable") == 2  # NFS and MOUNT
        listing = run("nfs-ls", f"nfs://127.0.0.1/scratch?version=3&nfsport={nfs_port}"
                                f"&mountport={mount_port}")
        assert listing.returncode == 0
    finally:
        log = stop_clean(daemon)
    assert "WARNING netswap.nfs: rpcbind: cannot reach" in log
