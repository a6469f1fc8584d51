"""The byte stream of one NBD connection: its socket, or the TLS session over it once
STARTTLS has succeeded.

Negotiation and request handling read and write through a `Channel` and never ask which of
the two it is; only the STARTTLS step (`start_tls`) and the reply sender (`seal`) care.
"""

from __future__ import annotations

import socket
import ssl
from typing import Optional

from .tls import TlsSession

# One handshake read: option messages are small, and a longer one just takes more reads.
_HANDSHAKE_READ = 4096


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.tls: Optional[TlsSession] = None  # set once STARTTLS succeeded

    def start_tls(self, context: ssl.SSLContext, deadline: float) -> TlsSession:
        """Run the TLS handshake on the socket (TlsHandshakeError if it fails); from then on
        everything goes through the session."""
        session = TlsSession(context, self.sock)
        session.handshake(deadline)
        self.tls = session
        return session

    @property
    def seal(self):
        """What the reply sender encrypts replies with, or None on a plain connection."""
        return self.tls.seal if self.tls is not None else None

    def settimeout(self, seconds: Optional[float]) -> None:
        """Bound every later socket call (the handshake's deadline); None: block."""
        self.sock.settimeout(seconds)

    def sendall(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.sendall([data])
        else:
            self.sock.sendall(data)

    def recv_handshake(self) -> bytes:
        """Up to one handshake read of bytes; b"" when the client closed."""
        if self.tls is None:
            return self.sock.recv(_HANDSHAKE_READ)
        buffer = bytearray(_HANDSHAKE_READ)
        return bytes(buffer[: self.tls.recv_into(memoryview(buffer))])

    def recv_into(self, view: memoryview) -> int:
        """The transmission phase's one way to receive: through TLS once it is on."""
        if self.tls is not None:
            return self.tls.recv_into(view)
        return self.sock.recv_into(view)

    def close(self) -> None:
        if self.tls is not None:
            self.tls.close()
        self.sock.close()
