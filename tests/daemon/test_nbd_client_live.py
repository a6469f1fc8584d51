"""netswap-node's sans-I/O client handshake against a live netswapd over TCP."""

import socket

from netswap.nbd import constants as C
from netswap.nbd.client import ClientHandshake, SimpleReplyReader, read_request


def test_against_a_live_netswapd_go_then_a_read(daemon):
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        client = ClientHandshake("ro")
        while client.export is None:
            client.receive_data(sock.recv(65536))
            sock.sendall(client.data_to_send())
        assert client.export.size == 1 << 20
        assert client.export.transmission_flags & C.TFLAG_READ_ONLY
        sock.sendall(read_request(1, 4096, 256))
        reader = SimpleReplyReader(1, 256)
        while reader.data is None:
            reader.receive_data(sock.recv(65536))
        assert reader.data == bytes(range(256))  # the ro export's pattern (support/daemon.py)
