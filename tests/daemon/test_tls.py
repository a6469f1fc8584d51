"""NBD STARTTLS (issue 5, "TLS"): the sans-I/O option rules, the config and its files, and a
real netswapd serving real libnbd clients (nbdinfo, nbdcopy, the Python binding) and raw
sockets over TLS, with a throwaway CA made here by the openssl CLI."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from netswap import config
from netswap.nbd import constants as C
from netswap.nbd.errors import ProtocolError
from netswap.nbd.handshake import Abort, Ready, Reply, ServerHandshake, StartTls
from netswap.nbd.tls import TlsSession, server_context
from support.daemon import start_daemon, stop_clean
from support.handshake import EXPORTS, LIMITS, info_data, option, parse_replies
from support.libnbd import import_libnbd
from support.metrics import samples
from support.nbd_raw import (
    closed_by_server, connect_raw, read_option_reply, recv_exact, request, send_option,
    simple_reply, still_serving,
)
from support.threads import run_in_threads
from support.wait import wait_until


MiB = 1 << 20
OPENSSL = "openssl"


# ---------------------------------------------------------------------------------------------
# A throwaway PKI: a CA, a server certificate for localhost/127.0.0.1/::1, a client certificate
# from the same CA, and a rogue CA with its own client certificate.


def _openssl(*args, cwd):
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def _ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


def _issue(directory: Path, ca: str, name: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey",
             f"{ca}-key.pem", "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2",
             "-extfile", f"{name}.ext", cwd=directory)


class Pki:
    """Files, and libnbd certificate directories (tls-certificates=DIR) for each client."""

    def __init__(self, root: Path) -> None:
        self.root = root
        made = root / "made"
        made.mkdir()
        _ca(made, "ca")
        _ca(made, "rogue-ca")
        _issue(made, "ca", "server", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
                                     "extendedKeyUsage=serverAuth\n")
        _issue(made, "ca", "node1", "extendedKeyUsage=clientAuth\n")
        _issue(made, "rogue-ca", "intruder", "extendedKeyUsage=clientAuth\n")
        self.made = made
        self.certificate = made / "server-cert.pem"
        self.key = made / "server-key.pem"
        self.ca = made / "ca-cert.pem"
        # libnbd reads ca-cert.pem, and client-cert.pem / client-key.pem when present.
        self.trusting = self._client_dir("trusting", "ca")
        self.node1 = self._client_dir("node1", "ca", "node1")
        self.intruder = self._client_dir("intruder", "ca", "intruder")
        self.wrong_ca = self._client_dir("wrong-ca", "rogue-ca")

    def _client_dir(self, name: str, ca: str, client: str | None = None) -> Path:
        directory = self.root / name
        directory.mkdir()
        (directory / "ca-cert.pem").write_bytes((self.made / f"{ca}-cert.pem").read_bytes())
        if client:
            (directory / "client-cert.pem").write_bytes((self.made / f"{client}-cert.pem").read_bytes())
            (directory / "client-key.pem").write_bytes((self.made / f"{client}-key.pem").read_bytes())
        return directory


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_options(pki: Pki, tcp: str, unix: str = "off", client_ca: bool = False) -> str:
    lines = [f'tls = "{tcp}"', f'unix_socket_tls = "{unix}"',
             f'tls_certificate = "{pki.certificate}"', f'tls_key = "{pki.key}"']
    if client_ca:
        lines.append(f'tls_client_ca = "{pki.ca}"')
    return "\n".join(lines)


def nbds(daemon, export: str, certificates: Path) -> str:
    return f"nbds://127.0.0.1:{daemon.port}/{export}?tls-certificates={certificates}"


def nbdinfo(*args, timeout=60):
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=timeout)


def metric(daemon, name: str, **labels) -> float:
    return samples(daemon.metrics()).get((name, tuple(sorted(labels.items()))), 0)


def tls_client(pki: Pki, sock: socket.socket, certificates: Path | None = None,
               version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> ssl.SSLSocket:
    """The client side of TLS on a raw NBD socket after the STARTTLS ACK (as libnbd does)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.maximum_version = version
    if certificates is not None:
        context.load_cert_chain(certificates / "client-cert.pem", certificates / "client-key.pem")
    return context.wrap_socket(sock, server_hostname="localhost")


def starttls(sock: socket.socket) -> None:
    send_option(sock, C.OPT_STARTTLS)
    assert read_option_reply(sock) == (C.OPT_STARTTLS, C.REP_ACK, b"")


# ---------------------------------------------------------------------------------------------
# The option rules, without I/O.


def make(tls: str) -> ServerHandshake:
    hs = ServerHandshake(EXPORTS.get, lambda: [(e.name, e.description) for e in EXPORTS.values()],
                         LIMITS, tls=tls)
    hs.receive_data(struct.pack(">I", C.CLIENT_FLAG_FIXED_NEWSTYLE | C.CLIENT_FLAG_NO_ZEROES))
    return hs


def send(hs, opt, data=b""):
    hs.receive_data(option(opt, data))
    return hs.next_event()


def upgrade(hs) -> None:
    event = send(hs, C.OPT_STARTTLS)
    assert isinstance(event, StartTls)
    assert parse_replies(event.data) == [(C.OPT_STARTTLS, C.REP_ACK, b"")]
    hs.tls_established()


def test_off_refuses_starttls_by_policy_and_haggling_continues():
    hs = make("off")
    [(opt, rtype, message)] = parse_replies(send(hs, C.OPT_STARTTLS).data)
    assert (opt, rtype) == (C.OPT_STARTTLS, C.REP_ERR_POLICY) and message
    assert not hs.tls_active
    assert isinstance(send(hs, C.OPT_GO, info_data(b"disk")), Ready)


def test_optional_acks_starttls_and_waits_for_the_tls_handshake():
    hs = make("optional")
    event = send(hs, C.OPT_STARTTLS)
    assert isinstance(event, StartTls)
    assert parse_replies(event.data) == [(C.OPT_STARTTLS, C.REP_ACK, b"")]
    assert hs.next_event() is None  # nothing more until the transport says TLS is up
    with pytest.raises(ProtocolError) as err:
        hs.receive_data(option(C.OPT_LIST))  # a transport bug, or plain text: never parsed
    assert err.value.reason == "starttls_pipelined"


def test_optional_serves_plain_clients_too():
    hs = make("optional")
    assert isinstance(send(hs, C.OPT_LIST), Reply)
    assert isinstance(send(hs, C.OPT_GO, info_data(b"disk")), Ready)
    assert hs.tls_refusals == 0


def test_starttls_twice_and_starttls_with_data_are_invalid():
    hs = make("optional")
    [(_, rtype, _)] = parse_replies(send(hs, C.OPT_STARTTLS, b"x").data)
    assert rtype == C.REP_ERR_INVALID and not hs.tls_active
    upgrade(hs)
    assert hs.tls_active
    [(opt, rtype, message)] = parse_replies(send(hs, C.OPT_STARTTLS).data)
    assert (opt, rtype) == (C.OPT_STARTTLS, C.REP_ERR_INVALID) and message
    assert isinstance(send(hs, C.OPT_GO, info_data(b"disk")), Ready)


def test_bytes_pipelined_behind_starttls_are_a_protocol_error():
    hs = make("require")
    hs.receive_data(option(C.OPT_STARTTLS) + b"\x16\x03\x01")  # e.g. an early ClientHello
    with pytest.raises(ProtocolError) as err:
        hs.next_event()
    assert err.value.reason == "starttls_pipelined"


@pytest.mark.parametrize("opt, data", [
    (C.OPT_LIST, b""), (C.OPT_INFO, info_data(b"disk")), (C.OPT_GO, info_data(b"disk")),
    (C.OPT_GO, info_data(b"no-such-export")), (C.OPT_STRUCTURED_REPLY, b""),
    (C.OPT_SET_META_CONTEXT, b"xyz"), (0x7654321, b""),
])
def test_require_refuses_every_option_before_tls(opt, data):
    hs = make("require")
    event = send(hs, opt, data)
    assert isinstance(event, Reply)
    [(echo, rtype, message)] = parse_replies(event.data)
    assert (echo, rtype) == (opt, C.REP_ERR_TLS_REQD) and message
    assert hs.tls_refusals == 1 and not hs.done
    # After TLS the same option is served normally, and never gets ERR_TLS_REQD.
    upgrade(hs)
    replies = parse_replies(send(hs, opt, data).data)
    assert all(rtype != C.REP_ERR_TLS_REQD for _, rtype, _ in replies)


def test_require_closes_on_export_name_before_tls_and_acks_abort():
    hs = make("require")
    with pytest.raises(ProtocolError) as err:
        send(hs, C.OPT_EXPORT_NAME, b"disk")
    assert err.value.reason == "tls_required" and hs.tls_refusals == 1
    assert isinstance(send(make("require"), C.OPT_ABORT), Abort)


def test_require_serves_go_after_tls():
    hs = make("require")
    upgrade(hs)
    ready = send(hs, C.OPT_GO, info_data(b"disk"))
    assert isinstance(ready, Ready) and ready.export is EXPORTS["disk"]


def test_starttls_forgets_what_was_negotiated_in_the_clear():
    hs = make("optional")
    assert parse_replies(send(hs, C.OPT_STRUCTURED_REPLY).data)[0][1] == C.REP_ACK
    upgrade(hs)
    ready = send(hs, C.OPT_GO, info_data(b"disk"))
    # Structured replies were asked for before TLS only: the GO reply's flags say so.
    assert not ready.structured_replies and not ready.transmission_flags & C.TFLAG_SEND_DF
    hs = make("optional")
    upgrade(hs)
    send(hs, C.OPT_STRUCTURED_REPLY)
    ready = send(hs, C.OPT_GO, info_data(b"disk"))
    assert ready.structured_replies and ready.transmission_flags & C.TFLAG_SEND_DF


# ---------------------------------------------------------------------------------------------
# Config: the keys, and the files behind them.


def nbd_section(**keys):
    return config.parse({"nbd": keys}).nbd


def test_default_config_has_tls_off_and_builds_no_context():
    shipped = config.load(Path(__file__).resolve().parents[2] / "config" / "netswapd.toml")
    assert (shipped.nbd.tls, shipped.nbd.unix_socket_tls) == ("off", "off")
    assert server_context(shipped.nbd) is None


@pytest.mark.parametrize("mode_key", ["tls", "unix_socket_tls"])
def test_a_tls_mode_without_a_certificate_is_refused(mode_key):
    with pytest.raises(config.ConfigError) as err:
        nbd_section(**{mode_key: "require"})
    message = str(err.value)
    assert "nbd.tls_certificate" in message and f"nbd.{mode_key} = 'require'" in message


def test_a_tls_mode_must_be_one_of_three():
    with pytest.raises(config.ConfigError) as err:
        nbd_section(tls="on")
    assert "nbd.tls = 'on'" in str(err.value) and '"require"' in str(err.value)


def test_tls_files_must_be_absolute():
    with pytest.raises(config.ConfigError) as err:
        nbd_section(tls="optional", tls_certificate="server.pem")
    assert "nbd.tls_certificate = 'server.pem'" in str(err.value)


def _context_error(pki, tmp_path, **files) -> str:
    keys = {"tls": "require", "tls_certificate": str(pki.certificate), "tls_key": str(pki.key)}
    keys.update(files)
    with pytest.raises(config.ConfigError) as err:
        server_context(nbd_section(**keys))
    return str(err.value)


def test_tls_files_that_cannot_be_used_are_named(pki, tmp_path):
    missing = tmp_path / "missing.pem"
    message = _context_error(pki, tmp_path, tls_certificate=str(missing))
    assert f"nbd.tls_certificate = '{missing}'" in message and "cannot be read" in message

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    message = _context_error(pki, tmp_path, tls_certificate=str(garbage))
    assert f"nbd.tls_certificate = '{garbage}'" in message and "no PEM certificate" in message

    message = _context_error(pki, tmp_path, tls_key=str(pki.certificate))  # a cert, no key
    assert f"nbd.tls_key = '{pki.certificate}'" in message

    other_key = pki.made / "node1-key.pem"
    message = _context_error(pki, tmp_path, tls_key=str(other_key))
    assert f"nbd.tls_key = '{other_key}'" in message and "not the private key" in message

    encrypted = tmp_path / "encrypted-key.pem"
    _openssl("pkey", "-in", str(pki.key), "-aes256", "-passout", "pass:secret", "-out",
             str(encrypted), cwd=tmp_path)
    message = _context_error(pki, tmp_path, tls_key=str(encrypted))
    assert f"nbd.tls_key = '{encrypted}'" in message and "encrypted" in message

    message = _context_error(pki, tmp_path, tls_client_ca=str(garbage))
    assert f"nbd.tls_client_ca = '{garbage}'" in message

    unreadable = tmp_path / "unreadable.pem"
    unreadable.write_bytes(pki.key.read_bytes())
    unreadable.chmod(0)
    if os.geteuid() != 0:  # root reads anything
        message = _context_error(pki, tmp_path, tls_key=str(unreadable))
        assert f"nbd.tls_key = '{unreadable}'" in message and "cannot be read" in message


def test_a_key_inside_the_certificate_file_is_accepted(pki, tmp_path):
    combined = tmp_path / "combined.pem"
    combined.write_bytes(pki.certificate.read_bytes() + pki.key.read_bytes())
    context = server_context(nbd_section(tls="optional", tls_certificate=str(combined)))
    assert context.verify_mode == ssl.CERT_NONE
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_the_daemon_refuses_to_start_with_an_unusable_certificate(pki, tmp_path):
    missing = tmp_path / "gone.pem"
    with pytest.raises(RuntimeError) as err:
        start_daemon(tmp_path, nbd_options=f'tls = "require"\ntls_certificate = "{missing}"')
    assert "exited with 2" in str(err.value)
    assert f"nbd.tls_certificate = '{missing}'" in str(err.value)
    assert "Traceback" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# The session alone, over a socket pair: concurrent seals while the reader decrypts.


def test_session_moves_data_both_ways_while_workers_seal_concurrently(pki):
    server_sock, client_sock = socket.socketpair()
    context = server_context(nbd_section(tls="require", tls_certificate=str(pki.certificate),
                                         tls_key=str(pki.key)))
    session = TlsSession(context, server_sock)
    client_context = ssl.create_default_context(cafile=str(pki.ca))
    received = {}

    def client():
        tls = client_context.wrap_socket(client_sock, server_hostname="localhost")
        upload = bytes(range(256)) * (4 * MiB // 256)
        tls.sendall(upload)
        # 8 workers x 20 replies of a 16-byte header and 64 KiB payload, in any order.
        expected = 8 * 20 * (16 + 65536)
        data = bytearray()
        while len(data) < expected:
            chunk = tls.recv(1 << 20)
            assert chunk
            data += chunk
        received["replies"] = bytes(data)
        tls.close()

    thread = threading.Thread(target=client)
    thread.start()
    session.handshake(time.monotonic() + 10)
    server_sock.settimeout(None)
    send_lock = threading.Lock()

    def worker(index):
        header = struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, 0, index)
        payload = memoryview(bytes([index]) * 65536)
        for _ in range(20):
            with send_lock:
                session.sendall([header, payload])

    workers = threading.Thread(target=run_in_threads, args=(8, worker))
    workers.start()
    buffer = bytearray(4 * MiB)  # the reader decrypts straight into "a pool buffer"
    view, filled = memoryview(buffer), 0
    while filled < len(buffer):
        count = session.recv_into(view[filled:])
        assert count
        filled += count
    workers.join()
    thread.join(30)
    assert buffer == bytes(range(256)) * (4 * MiB // 256)
    replies = received["replies"]
    seen = []
    for at in range(0, len(replies), 16 + 65536):
        magic, error, cookie = struct.unpack_from(">IIQ", replies, at)
        assert (magic, error) == (C.SIMPLE_REPLY_MAGIC, 0)
        assert replies[at + 16:at + 16 + 65536] == bytes([cookie]) * 65536  # never interleaved
        seen.append(cookie)
    assert sorted(seen) == sorted(list(range(8)) * 20)
    server_sock.close()


# ---------------------------------------------------------------------------------------------
# A real daemon and real clients.


def test_require_serves_nbdinfo_over_tls_and_refuses_plain_clients(pki, tmp_path):
    daemon = start_daemon(tmp_path, nbd_options=tls_options(pki, "require"))
    try:
        listing = nbdinfo("--list", nbds(daemon, "", pki.trusting))
        assert listing.returncode == 0, listing.stderr
        assert "with TLS" in listing.stdout
        assert 'export="disk"' in listing.stdout and 'export="ram"' in listing.stdout
        info = nbdinfo("--json", nbds(daemon, "disk", pki.trusting))
        assert info.returncode == 0, info.stderr
        assert '"export-size": 67108864' in info.stdout and '"TLS": true' in info.stdout

        plain = nbdinfo(daemon.uri("disk"))
        assert plain.returncode != 0 and "disk" not in plain.stdout
        plain_list = nbdinfo("--list", daemon.uri(""))
        assert plain_list.returncode != 0 and "ram" not in plain_list.stdout

        # Byte for byte: every option but STARTTLS and ABORT is refused before TLS.
        sock = connect_raw(daemon)
        for opt, data in [(C.OPT_LIST, b""), (C.OPT_INFO, info_data(b"disk")),
                          (C.OPT_GO, info_data(b"disk")), (C.OPT_STRUCTURED_REPLY, b"")]:
            send_option(sock, opt, data)
            echo, rtype, message = read_option_reply(sock)
            assert (echo, rtype) == (opt, C.REP_ERR_TLS_REQD), message
        send_option(sock, C.OPT_ABORT)
        assert read_option_reply(sock) == (C.OPT_ABORT, C.REP_ACK, b"")
        assert closed_by_server(sock)

        sock = connect_raw(daemon)
        send_option(sock, C.OPT_EXPORT_NAME, b"disk")  # no error reply exists: a close
        assert closed_by_server(sock)

        values = samples(daemon.metrics())
        assert values[("netswap_tls_required_refusals_total", ())] >= 5
        assert values[("netswap_tls_handshakes_total", (("version", "TLSv1.3"),))] >= 2
    finally:
        log = stop_clean(daemon)
    assert "refused before TLS (TLS is required)" in log
    assert "EXPORT_NAME before STARTTLS" in log


# TLS 1.2 too: nbd-client's default GnuTLS priority string allows only 1.2.
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_session_by_hand_then_transmission(pki, tmp_path, version):
    """A raw client doing STARTTLS itself: the second STARTTLS is invalid, and requests and
    replies in transmission travel inside TLS (a READ's data included)."""
    daemon = start_daemon(tmp_path, nbd_options=tls_options(pki, "require"))
    try:
        raw = connect_raw(daemon, C.CLIENT_FLAG_FIXED_NEWSTYLE | C.CLIENT_FLAG_NO_ZEROES)
        starttls(raw)
        sock = tls_client(pki, raw, version=version)
        assert sock.version() == version.name.replace("v1_", "v1.")
        send_option(sock, C.OPT_STARTTLS)
        echo, rtype, _ = read_option_reply(sock)
        assert (echo, rtype) == (C.OPT_STARTTLS, C.REP_ERR_INVALID)
        send_option(sock, C.OPT_GO, info_data(b"ram"))
        while read_option_reply(sock)[1] != C.REP_ACK:
            pass
        payload = os.urandom(1 * MiB)
        request(sock, C.CMD_WRITE, 4096, len(payload), cookie=7, payload=payload)
        assert simple_reply(sock) == (0, 7)
        request(sock, C.CMD_READ, 4096, len(payload), cookie=8)
        assert simple_reply(sock) == (0, 8) and recv_exact(sock, len(payload)) == payload
        request(sock, C.CMD_DISC)
        assert closed_by_server(sock)
        label = version.name.replace("v1_", "v1.")
        assert metric(daemon, "netswap_tls_handshakes_total", version=label) == 1
    finally:
        stop_clean(daemon)


def test_nbdcopy_64mib_in_and_out_over_tls(pki, tmp_path):
    daemon = start_daemon(tmp_path, nbd_options=tls_options(pki, "require", unix="require"))
    source, back = tmp_path / "source.img", tmp_path / "back.img"
    source.write_bytes(os.urandom(64 * MiB))
    try:
        for uri in (nbds(daemon, "disk", pki.trusting),
                    f"nbds+unix:///ram?socket={daemon.unix_socket}&tls-certificates={pki.trusting}"):
            subprocess.run(["nbdcopy", str(source), uri], check=True, timeout=300)
            subprocess.run(["nbdcopy", uri, str(back)], check=True, timeout=300)
            assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
            back.unlink()
        handshakes = metric(daemon, "netswap_tls_handshakes_total", version="TLSv1.3")
        assert handshakes >= 4  # each nbdcopy opens at least one connection
        assert metric(daemon, "netswap_tls_handshake_failures_total", reason="other") == 0
    finally:
        stop_clean(daemon)


def test_libnbd_tls_require_large_requests_and_many_in_flight(pki, tmp_path):
    nbd = import_libnbd()
    daemon = start_daemon(tmp_path, nbd_options=tls_options(pki, "require"))
    try:
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(pki.trusting))
        h.set_export_name("ram")
        h.connect_tcp("127.0.0.1", str(daemon.port))
        assert h.get_tls_negotiated()
        big = os.urandom(32 * MiB)  # the largest request the daemon takes
        h.pwrite(big, 0)
        h.flush()
        assert h.pread(32 * MiB, 0) == big
        # 64 requests of 256 KiB in flight at once, written then read back.
        pieces = [os.urandom(256 * 1024) for _ in range(64)]
        for i, piece in enumerate(pieces):
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(piece)), i * 256 * 1024)
        assert h.aio_in_flight() > 1
        while h.aio_in_flight():
            h.poll(-1)
        buffers = [nbd.Buffer(256 * 1024) for _ in pieces]
        for i, buffer in enumerate(buffers):
            h.aio_pread(buffer, i * 256 * 1024)
        while h.aio_in_flight():
            h.poll(-1)
        assert [buffer.to_bytearray() for buffer in buffers] == [bytearray(p) for p in pieces]
        h.flush()
        h.shutdown()
    finally:
        stop_clean(daemon)


def test_optional_serves_plain_and_tls_clients_and_unix_may_require(pki, tmp_path):
    daemon = start_daemon(tmp_path, nbd_options=tls_options(pki, "optional", unix="require"))
    try:
        plain = nbdinfo(daemon.uri("disk"))
        assert plain.returncode == 0 and "without TLS" in plain.stdout, plain.stderr
        tls = nbdinfo(nbds(daemon, "disk", pki.trusting))
        assert tls.returncode == 0 and "with TLS" in tls.stdout, tls.stderr
        unix_tls = nbdinfo(f"nbds+unix:///disk?socket={daemon.unix_socket}"
                           f"&tls-certificates={pki.trusting}")
        assert unix_tls.returncode == 0 and "with TLS" in unix_tls.stdout, unix_tls.stderr
        unix_plain = nbdinfo(daemon.unix_uri("disk"))
        assert unix_plain.returncode != 0
        assert metric(daemon, "netswap_tls_required_refusals_total") >= 1
        assert metric(daemon, "netswap_tls_handshakes_total", version="TLSv1.3") == 2
    finally:
        stop_clean(daemon)


def test_off_refuses_starttls_and_a_tls_only_client_fails_cleanly(pki, tmp_path):
    daemon = start_daemon(tmp_path)  # the default: TLS off everywhere
    try:
        result = nbdinfo(nbds(daemon, "disk", pki.trusting))
        assert result.returncode != 0 and "export-size" not in result.stdout
        sock = connect_raw(daemon)
        send_option(sock, C.OPT_STARTTLS)
        echo, rtype, message = read_option_reply(sock)
        assert (echo, rtype) == (C.OPT_STARTTLS, C.REP_ERR_POLICY) and message
        send_option(sock, C.OPT_ABORT)  # the session is still good
        assert read_option_reply(sock) == (C.OPT_ABORT, C.REP_ACK, b"")
        still_serving(daemon)
        assert metric(daemon, "netswap_tls_handshakes_total", version="TLSv1.3") == 0
    finally:
        stop_clean(daemon)


def test_client_certificates_wrong_ca_and_garbage_fail_alone(pki, tmp_path):
    """Verified client certificates: a node with one is served, and keeps being served while
    clients with no certificate, a certificate from another CA, a CA that does not trust the
    server, garbage and plain text in place of a ClientHello, and bytes pipelined behind
    STARTTLS each fail on their own connection."""
    nbd = import_libnbd()
    daemon = start_daemon(tmp_path, nbd_options=tls_options(pki, "require", client_ca=True))
    node = nbd.NBD()
    try:
        node.set_tls(nbd.TLS_REQUIRE)
        node.set_tls_certificates(str(pki.node1))
        node.set_export_name("disk")
        node.connect_tcp("127.0.0.1", str(daemon.port))
        node.pwrite(b"before" * 1000, 0)
        assert "client certificate commonName=node1" in daemon.log()

        for certificates in (pki.trusting, pki.intruder, pki.wrong_ca):
            result = nbdinfo(nbds(daemon, "disk", certificates))
            assert result.returncode != 0 and "export-size" not in result.stdout

        for garbage in (bytes(range(256)) * 16, b"GET / HTTP/1.1\r\n\r\n",
                        b"\x16\x03\x01\x00\x05hello"):
            sock = connect_raw(daemon)
            starttls(sock)
            sock.sendall(garbage)
            assert closed_by_server(sock)

        # A ClientHello's first bytes sent before the ACK came, in one write with STARTTLS.
        sock = connect_raw(daemon)
        sock.sendall(option(C.OPT_STARTTLS) + b"\x16\x03\x01")
        assert closed_by_server(sock)

        # The node never noticed.
        node.pwrite(b"after!" * 1000, 6000)
        node.flush()
        assert node.pread(12000, 0) == b"before" * 1000 + b"after!" * 1000
        node.shutdown()

        values = samples(daemon.metrics())
        failures = {labels[0][1]: value for (name, labels), value in values.items()
                    if name == "netswap_tls_handshake_failures_total"}
        assert failures.get("no_client_certificate", 0) >= 1, failures
        assert failures.get("bad_client_certificate", 0) >= 1, failures
        # libnbd (GnuTLS) resets the connection when it rejects our certificate; a client
        # that sends an alert first is counted by it.
        assert failures.get("closed", 0) + failures.get("server_certificate_rejected", 0) == 1, failures
        assert failures.get("not_tls", 0) >= 2 and failures.get("malformed", 0) >= 1, failures
        assert sum(failures.values()) == 6, failures
    finally:
        log = stop_clean(daemon)
    assert len(re.findall(r"closing: (TLS handshake failed|connection lost during the TLS)",
                          log)) == 6, log
    assert "pipelined behind STARTTLS" in log


def _reload(daemon, text: str, expect: str) -> None:
    """Rewrite the config, SIGHUP, and wait for one more `expect` line in the log."""
    before = daemon.log().count(expect)
    daemon.config_path.write_text(text)
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.log().count(expect) != before, timeout=15,
               what=lambda: daemon.log()[-3000:])


def served_certificate(pki: Pki, daemon) -> str:
    raw = connect_raw(daemon)
    starttls(raw)
    with tls_client(pki, raw) as sock:
        subject = dict(item for rdn in sock.getpeercert()["subject"] for item in rdn)
        send_option(sock, C.OPT_ABORT)
        read_option_reply(sock)
    return subject["commonName"]


def test_reload_changes_the_mode_rotates_the_certificate_and_refuses_a_bad_one(pki, tmp_path):
    nbd = import_libnbd()
    daemon = start_daemon(tmp_path, nbd_options=tls_options(pki, "optional"))
    node = nbd.NBD()
    try:
        node.set_tls(nbd.TLS_REQUIRE)
        node.set_tls_certificates(str(pki.trusting))
        node.set_export_name("disk")
        node.connect_tcp("127.0.0.1", str(daemon.port))
        assert nbdinfo(daemon.uri("disk")).returncode == 0  # optional: plain is served
        assert served_certificate(pki, daemon) == "server"

        original = daemon.config_path.read_text()
        _issue(pki.made, "ca", "server2", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                          "extendedKeyUsage=serverAuth\n")
        rotated = (original.replace('tls = "optional"', 'tls = "require"')
                   .replace(str(pki.certificate), str(pki.made / "server2-cert.pem"))
                   .replace(str(pki.key), str(pki.made / "server2-key.pem")))
        _reload(daemon, rotated, "reloaded ")
        assert nbdinfo(daemon.uri("disk")).returncode != 0  # require, for new connections
        assert served_certificate(pki, daemon) == "server2"
        info = nbdinfo(nbds(daemon, "disk", pki.trusting))
        assert info.returncode == 0, info.stderr

        missing = pki.root / "not-there.pem"
        _reload(daemon, rotated.replace(str(pki.made / "server2-cert.pem"), str(missing)),
                "reload rejected")
        assert f"nbd.tls_certificate = '{missing}'" in daemon.log()
        assert served_certificate(pki, daemon) == "server2"  # the running config stays

        # The connection opened before all this never noticed.
        node.pwrite(b"still here" * 100, 0)
        assert node.pread(1000, 0) == b"still here" * 100
        node.shutdown()
    finally:
        stop_clean(daemon)
