"""A hand-written NBD client speaking raw bytes, for what no library client will send."""

from __future__ import annotations

import socket
import struct

from netswap.nbd import constants as C


def recv_exact(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def closed_by_server(sock, timeout=10) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True


def connect_raw(daemon, client_flags=C.CLIENT_FLAG_FIXED_NEWSTYLE):
    sock = socket.create_connection(("127.0.0.1", daemon.port))
    magic, ihaveopt, flags = struct.unpack(">QQH", recv_exact(sock, 18))
    assert (magic, ihaveopt) == (C.NBDMAGIC, C.IHAVEOPT)
    sock.sendall(struct.pack(">I", client_flags))
    return sock


def send_option(sock, option, data=b""):
    sock.sendall(struct.pack(">QII", C.IHAVEOPT, option, len(data)) + data)


def read_option_reply(sock):
    magic, option, rtype, length = struct.unpack(">QIII", recv_exact(sock, 20))
    assert magic == C.OPTION_REPLY_MAGIC
    return option, rtype, recv_exact(sock, length)


def go(sock, name):
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    send_option(sock, C.OPT_GO, data)
    while True:
        _, rtype, payload = read_option_reply(sock)
        if rtype == C.REP_ACK:
            return
        assert rtype == C.REP_INFO, (rtype, payload)


def request(sock, command, offset=0, length=0, cookie=1, flags=0, payload=b""):
    sock.sendall(struct.pack(">IHHQQI", C.REQUEST_MAGIC, flags, command, cookie, offset, length) + payload)


def simple_reply(sock):
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
    assert magic == C.SIMPLE_REPLY_MAGIC
    return error, cookie


def transmission(daemon, name=b"disk"):
    sock = connect_raw(daemon)
    go(sock, name)
    return sock


def still_serving(daemon):
    """Another client, on another connection, is unaffected."""
    sock = transmission(daemon)
    request(sock, C.CMD_WRITE, 0, 5, cookie=9, payload=b"alive")
    assert simple_reply(sock) == (0, 9)
    request(sock, C.CMD_READ, 0, 5, cookie=10)
    assert simple_reply(sock) == (0, 10)
    assert recv_exact(sock, 5) == b"alive"
    sock.close()

