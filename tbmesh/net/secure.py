"""Connections authenticated and encrypted with TLS 1.3, keyed from the cluster secret.

With a cluster secret, every connection between daemons (peer, probe, bulk) is TLS 1.3 from
its first byte, through Python's `ssl` (OpenSSL): we invent no cipher and no handshake.

Keys. Every member derives the same Ed25519 key from the secret and the cluster name
(HKDF-SHA256), and the same self-signed certificate from it (Ed25519 signs deterministically
and every field is fixed), which is at once what a member presents and the only certificate
it trusts. Both ends must present it (mutual TLS), so a connection completes only between
two holders of the secret: a stranger can neither terminate one nor relay a handshake into
anything but an opaque pipe between two members. TLS binds both ends' random values and the
whole transcript, and every record after the handshake is AEAD-protected; the `Hello` and
`Welcome` that name the two nodes and the connection's purpose travel inside it, and the
dialer checks that the node it reached is the one it meant to reach (peers.py).

Sans-I/O. A `Session` is one end of a TLS connection over two memory BIOs (`ssl.MemoryBIO`):
the caller feeds it the bytes that came from the socket and writes out the bytes it returns,
so one session serves the asyncio connection and, once a bulk connection is detached, the
thread that takes it over (h11's shape: the protocol object does no I/O).

Without a secret nothing of this runs: connections are plain TCP, as the README says of a
cluster on its own Thunderbolt cables.
"""

from __future__ import annotations

import datetime
import functools
import os
import ssl
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tbmesh.net.wire import ProtocolError

RECORD = 16 * 1024  # the most plaintext one TLS record holds: what one read of a session returns
SEAL_SLICE = 256 * 1024  # plaintext sealed before its records are taken out (see Session.seal)
TLS_RECORD_FIRST_BYTE = 0x16  # a TLS handshake record: how a listener tells TLS from a plain Hello

# What the derived certificate fixes, so every member makes the very same bytes.
_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_FOREVER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)
_KEY_INFO = b"tbmesh cluster key v1\x00"


@dataclass(frozen=True)
class ClusterTls:
    """The two TLS contexts of a cluster secret: for connections we dial and ones we accept."""

    client: ssl.SSLContext
    server: ssl.SSLContext


@functools.lru_cache(maxsize=4)
def cluster_tls(secret: bytes, cluster: str) -> ClusterTls:
    """The contexts for `secret` in `cluster` (made once: deriving costs a few milliseconds)."""
    cert_pem, key_pem = _derived_certificate(secret, cluster)
    contexts = []
    for purpose in (ssl.PROTOCOL_TLS_CLIENT, ssl.PROTOCOL_TLS_SERVER):
        context = ssl.SSLContext(purpose)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False  # the certificate names no host: it names the cluster
        context.verify_mode = ssl.CERT_REQUIRED  # both ends, so both prove they hold the secret
        context.load_verify_locations(cadata=cert_pem.decode())
        _load_chain(context, cert_pem, key_pem)
        if purpose == ssl.PROTOCOL_TLS_SERVER:
            context.num_tickets = 0  # no resumption: nothing arrives after the handshake unasked
        contexts.append(context)
    return ClusterTls(*contexts)


def _derived_certificate(secret: bytes, cluster: str) -> tuple[bytes, bytes]:
    """The cluster's self-signed certificate and its key, both PEM, from the secret alone."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    seed = HKDF(hashes.SHA256(), 32, salt=None, info=_KEY_INFO + cluster.encode()).derive(secret)
    key = Ed25519PrivateKey.from_private_bytes(seed)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tbmesh cluster")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_EPOCH).not_valid_after(_FOREVER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, None)  # Ed25519 takes no separate hash
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _load_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    # ssl loads a certificate chain only from files: a private directory, gone once loaded.
    with tempfile.TemporaryDirectory(prefix="tbmesh-tls-") as folder:
        cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert.write_bytes(cert_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        context.load_cert_chain(cert, key)


def _failure(error: ssl.SSLError) -> ProtocolError:
    reason = getattr(error, "reason", None) or str(error)
    if reason in ("CERTIFICATE_VERIFY_FAILED", "TLSV1_ALERT_DECRYPT_ERROR", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
                  "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_CERTIFICATE_UNKNOWN"):
        return ProtocolError(f"tls: the peer does not hold our cluster secret ({reason.lower()})")
    return ProtocolError(f"tls: {str(reason).lower()}")


class Session:
    """One end of a TLS connection over memory BIOs: no sockets, no clock.

    `receive(data)` takes bytes from the socket and returns the plaintext they complete;
    `seal(buffers)` returns the bytes to write for plaintext; during the handshake,
    `handshake(data)` does both. A record that fails its check, or any other TLS fault,
    raises `wire.ProtocolError` (close the connection)."""

    def __init__(self, context: ssl.SSLContext, server_side: bool) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self.established = False
        self.ended = False  # the peer closed its side with a close_notify

    def handshake(self, data: bytes = b"") -> bytes:
        """Advance the handshake with `data` from the peer; return what to send it."""
        if data:
            self._incoming.write(data)
        try:
            self._tls.do_handshake()
            self.established = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as error:
            raise _failure(error) from None
        return self._outgoing.read()

    def receive(self, data: bytes | bytearray | memoryview) -> bytes:
        """The plaintext that `data` (and what came before it) completes; b"" if none yet."""
        if data:
            self._incoming.write(data)
        chunks = []
        # Bytes still to open, or opened and not taken: a loop that ends without the cost of
        # an SSLWantReadError in the common case (every record complete).
        while not self.ended and (self._incoming.pending or self._tls.pending()):
            try:
                chunk = self._tls.read(RECORD)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.ended = True
                break
            except ssl.SSLError as error:
                raise _failure(error) from None
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def read_into(self, view: memoryview) -> int:
        """Decrypted bytes into `view` from what was fed already; 0 if a record is incomplete."""
        try:
            return self._tls.read(view.nbytes, view)
        except ssl.SSLWantReadError:
            return 0
        except ssl.SSLZeroReturnError:
            self.ended = True
            return 0
        except ssl.SSLError as error:
            raise _failure(error) from None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the socket, for `read_into` to decrypt."""
        self._incoming.write(data)

    def seal(self, buffers: Iterable[bytes | bytearray | memoryview]) -> list[bytes]:
        """The bytes to write to the socket to send `buffers`, in order. Sealed a slice at a
        time: a memory BIO that grows to a whole large tensor costs ten times the cipher."""
        sealed = []
        buffers = list(buffers)
        if len(buffers) > 1 and sum(memoryview(b).nbytes for b in buffers) <= RECORD:
            buffers = [b"".join(buffers)]  # a frame's head and a small payload: one record, not two
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            while view.nbytes:
                try:
                    view = view[self._tls.write(view[:SEAL_SLICE]):]
                except ssl.SSLError as error:
                    raise _failure(error) from None
                sealed.append(self._outgoing.read())
        return sealed


def looks_like_tls(first: bytes) -> bool:
    """Whether a connection's first bytes open a TLS handshake rather than a plain frame (a
    plain Hello starts with its header length, a u32 far below 0x16 << 24)."""
    return bool(first) and first[0] == TLS_RECORD_FIRST_BYTE
