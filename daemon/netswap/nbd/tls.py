"""TLS for NBD connections (STARTTLS), over the stdlib's sans-I/O TLS: ssl.SSLObject.

`server_context(nbd_config)` builds the one SSLContext the server hands to new connections
(or None when every listener has TLS off); a file it cannot use is a ConfigError naming the
key. `TlsSession` is one connection's TLS state: an SSLObject between two MemoryBIOs. The
session does the raw socket I/O itself so that the connection code only swaps "send/recv on
the socket" for "send/recv through the session":

    handshake(deadline)   blocking TLS handshake on the raw socket
    recv_into(view)       raw recv, decrypt straight into `view` (a pool buffer); 0 on EOF
    sendall(parts)        encrypt and send a list of buffers (option replies, NBD replies)
    seal(parts)           the ciphertext of a list of buffers, in bounded chunks

Threads: the connection's reader calls recv_into while I/O workers send replies, so every use
of the SSLObject and its BIOs is under `_lock`, and no socket call is made under it: a
worker blocked on a full socket never stops the reader decrypting, nor the other way round.
Ciphertext leaves in the order it was produced because everything that drains the outgoing
BIO in transmission (seal, via sendall) runs under the connection's send lock and sends what
it drained before releasing that lock; the handshake and close() drain it too, at times when
no worker can be sending.

Memory: the payload is decrypted into, and encrypted from, the caller's buffer (a pool
buffer), so no plaintext copy of a request exists beyond one 16 KiB record buffer that joins
a reply header to the start of its data. Ciphertext cannot live in the pool: OpenSSL
keeps what is in flight in its BIOs. It is bounded per connection: received ciphertext is fed
to OpenSSL one recv (RECV_CHUNK) at a time and only when it needs more; outgoing ciphertext
is drained every SEAL_CHUNK bytes of plaintext, so a 32 MiB READ reply never exists as a
32 MiB ciphertext copy.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Iterator, Optional, Sequence

from ..config import ConfigError
from .errors import ProtocolError

# One raw recv: about four full TLS records.
RECV_CHUNK = 64 * 1024
# Plaintext encrypted between two drains of the outgoing BIO.
SEAL_CHUNK = 256 * 1024
# The largest plaintext of one TLS record (RFC 8446 5.1): small parts are coalesced up to it,
# so a reply header and a 4 KiB page go out as one record, not two.
_RECORD = 16 * 1024


class TlsHandshakeError(ProtocolError):
    """The TLS handshake failed. `failure` is one of a few stable labels (the counter's),
    the message has OpenSSL's words (for the log)."""

    def __init__(self, message: str, failure: str) -> None:
        super().__init__(message, "tls_handshake")
        self.failure = failure


# OpenSSL reason codes -> the counter's label. Bounded on purpose: a client cannot mint labels.
_FAILURE_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
    "CERTIFICATE_VERIFY_FAILED": "bad_client_certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "server_certificate_rejected",
    "SSLV3_ALERT_BAD_CERTIFICATE": "server_certificate_rejected",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "server_certificate_rejected",
    "TLSV1_ALERT_DECRYPT_ERROR": "server_certificate_rejected",
    "UNSUPPORTED_PROTOCOL": "version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "version",
    "NO_PROTOCOLS_AVAILABLE": "version",
    "WRONG_VERSION_NUMBER": "not_tls",
    "HTTP_REQUEST": "not_tls",
    "UNKNOWN_PROTOCOL": "not_tls",
    "RECORD_LAYER_FAILURE": "not_tls",
    "PACKET_LENGTH_TOO_LONG": "not_tls",
    "UNEXPECTED_MESSAGE": "malformed",
    "UNEXPECTED_RECORD": "malformed",
    "LENGTH_MISMATCH": "malformed",
    "BAD_PACKET_LENGTH": "malformed",
    "DECODE_ERROR": "malformed",
    "NO_SHARED_CIPHER": "no_shared_cipher",
}


def server_context(nbd) -> Optional[ssl.SSLContext]:
    """The server's TLS context from the [nbd] config, or None when no listener uses TLS.

    Every file is read here (at start and on reload), and every problem is a ConfigError that
    names the key and the file: the config parser itself never touches the filesystem.
    """
    if nbd.tls == "off" and nbd.unix_socket_tls == "off":
        return None
    certificate, key, client_ca = nbd.tls_certificate, nbd.tls_key, nbd.tls_client_ca
    for name, path in (("tls_certificate", certificate), ("tls_key", key),
                       ("tls_client_ca", client_ca)):
        if path is not None:
            _check_readable(f"nbd.{name}", path)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # The NBD spec: TLS 1.2 MUST be supported, older versions SHOULD NOT be by default.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Renegotiation (TLS 1.2) lets a client make the server do handshakes at will, and
    # would need a write in answer to a read (see TlsSession.recv_into); nobody needs it.
    context.options |= ssl.OP_NO_RENEGOTIATION
    # Swap connections live for days; a resumption ticket buys nothing and is key material.
    context.num_tickets = 0

    # The certificate alone first: load_cert_chain reports any bad file as "PEM lib".
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.load_verify_locations(cafile=str(certificate))
    except ssl.SSLError:
        raise ConfigError("nbd.tls_certificate", "holds no PEM certificate",
                          value=str(certificate), allowed="a PEM file with the server's "
                          "certificate") from None

    def encrypted_key():
        # Without this callback OpenSSL would prompt on the daemon's terminal.
        raise ConfigError("nbd.tls_key" if key else "nbd.tls_certificate",
                          "holds an encrypted private key", value=str(key or certificate),
                          allowed="an unencrypted PEM private key, readable only by netswapd")

    try:
        context.load_cert_chain(str(certificate), str(key) if key else None,
                                password=encrypted_key)
    except ssl.SSLError as exc:
        where = "nbd.tls_key" if key else "nbd.tls_certificate"
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = "is not the private key of nbd.tls_certificate"
        else:
            problem = f"holds no usable PEM private key ({exc.reason or 'PEM lib'})"
        raise ConfigError(where, problem, value=str(key or certificate),
                          allowed="the PEM private key of nbd.tls_certificate") from None

    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except ssl.SSLError:
            raise ConfigError("nbd.tls_client_ca", "holds no PEM certificate",
                              value=str(client_ca),
                              allowed="a PEM file of CA certificates") from None
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def _check_readable(key: str, path) -> None:
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise ConfigError(key, f"cannot be read: {exc.strerror or exc}", value=str(path),
                          allowed="a PEM file netswapd can read") from None


class TlsSession:
    """One connection's TLS, server side. The caller owns the socket's lifetime."""

    def __init__(self, context: ssl.SSLContext, sock: socket.socket) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._lock = threading.Lock()  # the SSLObject and both BIOs
        # Only the reader thread receives (handshake, then recv_into), so one buffer serves.
        self._cipher = bytearray(RECV_CHUNK)
        self._cipher_view = memoryview(self._cipher)
        # Coalesces small parts into one record; used under _lock only.
        self._record = bytearray(_RECORD)

    @property
    def version(self) -> str:
        return self._tls.version() or "unknown"

    @property
    def peer_subject(self) -> str:
        """The client certificate's subject, or "" when it presented none."""
        certificate = self._tls.getpeercert()
        if not certificate:
            return ""
        return ",".join(f"{k}={v}" for rdn in certificate.get("subject", ()) for k, v in rdn)

    def handshake(self, deadline: float) -> None:
        """Run the TLS handshake on the raw socket until done, or raise TlsHandshakeError."""
        while True:
            try:
                with self._lock:
                    self._tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as exc:
                # An alert describing the failure may wait in the outgoing BIO: give the
                # client the reason before closing, if it is still listening.
                self._flush_nowait()
                reason = _FAILURE_REASONS.get(exc.reason or "", "other")
                raise TlsHandshakeError(f"TLS handshake failed: {exc}", reason) from None
            # Sends and receives both count against the deadline: a client that neither
            # reads nor writes is dropped as one that stalls the NBD handshake would be.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TlsHandshakeError("TLS handshake timed out", "timeout")
            self._sock.settimeout(remaining)
            try:
                self._flush()
                if done:
                    return
                count = self._sock.recv_into(self._cipher_view)
            except socket.timeout:
                raise TlsHandshakeError("TLS handshake timed out", "timeout") from None
            except OSError as exc:
                # GnuTLS clients (libnbd) reset the connection, with no alert, when they
                # reject our certificate: from here that is all one can tell.
                raise TlsHandshakeError(f"connection lost during the TLS handshake: {exc}",
                                        "closed") from None
            if not count:
                raise TlsHandshakeError("client closed during the TLS handshake", "closed")
            with self._lock:
                self._incoming.write(self._cipher_view[:count])

    def recv_into(self, view: memoryview) -> int:
        """Decrypt up to len(view) bytes into `view`; 0 when the client closed (with or
        without a TLS close_notify: an NBD client that vanishes is a lost client either
        way). A broken TLS stream is a ProtocolError: only this connection ends."""
        while True:
            with self._lock:
                try:
                    # A post-handshake message (a TLS 1.3 KeyUpdate asking for ours) makes
                    # this write ciphertext to the outgoing BIO. It is left there: the next
                    # seal or sendall drains it ahead of its own records, under the send lock,
                    # so the stream order holds. Waiting is safe because no message a client
                    # may send needs an answer before our next data: a requested KeyUpdate
                    # must only precede our next application data (RFC 8446 4.6.3), which is
                    # exactly where it goes; renegotiation, which would wait for an answer,
                    # is disabled, and a session ticket request does not exist.
                    return self._tls.read(len(view), view)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    return 0  # close_notify
                except ssl.SSLError as exc:
                    raise ProtocolError(f"TLS stream broken: {exc}", "tls_error") from None
            count = self._sock.recv_into(self._cipher_view)
            if not count:
                return 0
            with self._lock:
                self._incoming.write(self._cipher_view[:count])

    def sendall(self, parts: Sequence) -> None:
        """Encrypt `parts` (bytes or memoryviews) as one stream and send it all. The caller
        serialises senders (the connection's send lock)."""
        for chunk in self.seal(parts):
            self._sock.sendall(chunk)

    def seal(self, parts: Sequence) -> Iterator[bytes]:
        """The ciphertext of `parts` concatenated, as chunks to send in order: each chunk is
        drained from the outgoing BIO every SEAL_CHUNK bytes of plaintext, with anything a
        read left there before it. The SSLObject is locked only while a chunk is made."""
        views = [memoryview(part).cast("B") for part in parts if len(part)]
        index, offset = 0, 0
        while index < len(views):
            with self._lock:
                sealed = 0
                while index < len(views) and sealed < SEAL_CHUNK:
                    view = views[index]
                    if offset == 0 and len(view) < _RECORD and index + 1 < len(views):
                        # A small part (a reply header) shares a record with what follows.
                        filled = len(view)
                        self._record[:filled] = view
                        index += 1
                        while index < len(views) and filled < _RECORD:
                            take = min(_RECORD - filled, len(views[index]) - offset)
                            self._record[filled:filled + take] = views[index][offset:offset + take]
                            filled += take
                            offset += take
                            if offset == len(views[index]):
                                index, offset = index + 1, 0
                        self._tls.write(memoryview(self._record)[:filled])
                        sealed += filled
                        continue
                    take = min(SEAL_CHUNK - sealed, len(view) - offset)
                    self._tls.write(view[offset:offset + take])
                    sealed += take
                    offset += take
                    if offset == len(view):
                        index, offset = index + 1, 0
                chunk = self._outgoing.read()
            yield chunk

    def close(self) -> None:
        """Send close_notify if the socket takes it at once (the spec: close TLS, then TCP).
        Never blocks: a client that stopped reading does not hold up the close."""
        with self._lock:
            try:
                self._tls.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: the client's close_notify is not awaited
        self._flush_nowait()

    # Raw output ----------------------------------------------------------------------

    def _flush(self) -> None:
        """Send what the handshake produced (reader thread only, before transmission)."""
        with self._lock:
            data = self._outgoing.read()
        if data:
            self._sock.sendall(data)

    def _flush_nowait(self) -> None:
        with self._lock:
            data = self._outgoing.read()
        if data:
            try:
                self._sock.send(data, socket.MSG_DONTWAIT)
            except OSError:
                pass  # best effort: the connection is closing anyway
