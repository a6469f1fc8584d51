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


def request_header(command, offset=0, length=0, cookie=1, flags=0) -> bytes:
    """One request's 28-byte header (for sending several in one go)."""
    return struct.pack(">IHHQQI", C.REQUEST_MAGIC, flags, command, cookie, offset, length)


def request(sock, command, offset=0, length=0, cookie=1, flags=0, payload=b""):
    sock.sendall(request_header(command, offset, length, cookie, flags) + payload)


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



# Structured replies and metadata contexts ---------------------------------------------------


def structured_transmission(daemon, name=b"disk", queries=(b"base:allocation",),
                            meta_export=None):
    """A connection in transmission on `name` with structured replies, after a
    SET_META_CONTEXT of `queries` for `meta_export` (default: `name`; None queries: no SET at
    all). Returns (socket, {context name: id} the SET selected)."""
    sock = connect_raw(daemon)
    send_option(sock, C.OPT_STRUCTURED_REPLY)
    assert read_option_reply(sock)[1] == C.REP_ACK
    selected = {}
    if queries is not None:
        selected = dict((context, ident) for ident, context in meta_context(
            sock, C.OPT_SET_META_CONTEXT, meta_export or name, queries))
    go(sock, name)
    return sock, selected


def meta_context(sock, option, name, queries=()):
    """LIST or SET_META_CONTEXT: the (id, name) of each context replied, up to the ACK;
    an error reply raises AssertionError with its type."""
    data = (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))
    send_option(sock, option, data)
    found = []
    while True:
        echo, rtype, payload = read_option_reply(sock)
        assert echo == option
        if rtype == C.REP_ACK:
            return found
        assert rtype == C.REP_META_CONTEXT, (hex(rtype), payload)
        found.append((struct.unpack_from(">I", payload)[0], payload[4:].decode()))


def structured_reply(sock):
    """One structured reply chunk: (flags, type, cookie, payload)."""
    magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", recv_exact(sock, 20))
    assert magic == C.STRUCTURED_REPLY_MAGIC, hex(magic)
    return flags, rtype, cookie, recv_exact(sock, length)


def block_status(sock, offset, length, cookie=1, flags=0):
    """Send BLOCK_STATUS and read its one chunk: (context id, [(length, status)]), or the
    NBD error of an error chunk."""
    request(sock, C.CMD_BLOCK_STATUS, offset, length, cookie=cookie, flags=flags)
    return read_block_status(sock, cookie)


def read_block_status(sock, cookie):
    chunk_flags, rtype, got_cookie, payload = structured_reply(sock)
    assert got_cookie == cookie and chunk_flags & C.REPLY_FLAG_DONE
    if rtype == C.REPLY_TYPE_ERROR:
        return struct.unpack_from(">I", payload)[0]
    assert rtype == C.REPLY_TYPE_BLOCK_STATUS and (len(payload) - 4) % 8 == 0, (rtype, payload)
    context = struct.unpack_from(">I", payload)[0]
    return context, [struct.unpack_from(">II", payload, 4 + 8 * i)
                     for i in range((len(payload) - 4) // 8)]
