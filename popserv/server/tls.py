"""
TLS for POP3: server certificates, SNI, ALPN, reloading, and the facts a
session learns from its handshake.

:class:`TLSServer` is what Twisted's TLS layer asks for a new server-side
connection (an ``IOpenSSLServerConnectionCreator``), both for STLS
(``transport.startTLS``) and for implicit TLS (``TLSMemoryBIOFactory``).

- Certificates are read and checked with ``cryptography`` first, so a bad
  file is reported in one line that names it; each certificate gets its own
  OpenSSL context, and SNI picks the one whose names match.
- Defaults follow Mozilla's "intermediate" profile: TLS 1.2 minimum, AEAD
  ciphers with forward secrecy, no compression; session resumption (tickets
  and the session cache) works.
- ALPN (RFC 7301): a client that offers protocols must offer ``pop3``,
  else the handshake is refused, so a TLS connection meant for another
  service (an HTTPS request, the ALPACA attack) never reaches POP3.
  Clients that send no ALPN at all (most mail clients) are served.
- :meth:`TLSServer.reload` re-reads every file; a failed reload keeps the
  certificates in use.  Sessions already running keep theirs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NoReturn

from attrs import field, frozen
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL._util import lib as _openssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

#: The ALPN protocol id of POP3 (IANA "TLS Application-Layer Protocol
#: Negotiation (ALPN) Protocol IDs").
ALPN_POP3 = b"pop3"
#: ... and of SMTP, for the receiver's STARTTLS.
ALPN_SMTP = b"smtp"

#: Mozilla's "intermediate" TLS 1.2 ciphers (TLS 1.3 suites are all fine and
#: left to OpenSSL).  DHE suites are only used if DH parameters are set.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)

VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

#: Warn at (re)load when a certificate expires sooner than this.
EXPIRY_WARNING = timedelta(days=14)

#: A PEM private key block (PKCS#8, RSA, EC ...), in a file that may hold more.
_PEM_KEY = re.compile(rb"-----BEGIN ([A-Z ]*PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL)

#: Let's Encrypt's file names inside a ``live/NAME/`` directory.
LETSENCRYPT_FILES = ("fullchain.pem", "privkey.pem")

#: The RFC 5929 hash for tls-server-end-point when the certificate's own
#: signature hash is MD5 or SHA-1 (or unknown).
_DEFAULT_END_POINT_HASH = hashes.SHA256()


class CertificateError(Exception):
    """A certificate or key file that cannot be used; ``str()`` is one line for the admin."""


class ALPNRefused(SSL.Error):
    """
    The client offered ALPN protocols, none of them ours.  An ``SSL.Error``,
    so that Twisted's TLS layer ends the connection as a failed handshake.
    """


def _optional_path(path: str | os.PathLike[str] | None) -> Path | None:
    return None if path is None else Path(path)


@frozen
class CertificateFiles:
    """Where one certificate lives: a PEM chain, and its key (or None: in the same file)."""

    certificate: Path = field(converter=Path)
    key: Path | None = field(default=None, converter=_optional_path)

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.certificate,) if self.key is None else (self.certificate, self.key)


@frozen
class TLSConfig:
    """What the TLS options say; :meth:`TLSServer.reload` turns it into contexts."""

    certificates: tuple[CertificateFiles, ...]
    min_version: str = "1.2"
    ciphers: str = INTERMEDIATE_CIPHERS
    #: CA file for client certificates: asked for, not required; one that
    #: is presented must verify.
    client_ca: Path | None = None


def find_certificates(certs: Sequence[str], keys: Sequence[str]) -> tuple[CertificateFiles, ...]:
    """
    Pair ``--tls-cert`` and ``--tls-key`` values, expanding directories.

    Keys pair with certificates in order; with no keys at all, each file
    holds its own key.  A directory stands for every ``NAME/fullchain.pem``
    with its ``privkey.pem`` in it (Let's Encrypt's ``live/`` layout, the
    directory itself included) and every other ``*.pem`` holding both.
    """
    if keys and len(keys) != len(certs):
        raise CertificateError(
            f"{len(certs)} --tls-cert but {len(keys)} --tls-key: give one key per"
            " certificate, or none when each file holds its key"
        )
    found: list[CertificateFiles] = []
    for index, cert in enumerate(certs):
        path = Path(cert)
        if path.is_dir():
            if keys:
                raise CertificateError(f"{cert}: a directory takes no --tls-key")
            found += _scan_directory(path)
        else:
            found.append(CertificateFiles(path, keys[index] if keys else None))
    return tuple(found)


def _scan_directory(directory: Path) -> list[CertificateFiles]:
    found = []
    for place in [directory, *sorted(p for p in directory.iterdir() if p.is_dir())]:
        chain, key = (place / name for name in LETSENCRYPT_FILES)
        if chain.is_file() and key.is_file():
            found.append(CertificateFiles(chain, key))
    skip = {*LETSENCRYPT_FILES, "cert.pem", "chain.pem"}
    found += [
        CertificateFiles(pem)
        for pem in sorted(directory.glob("*.pem"))
        if pem.name not in skip and pem.is_file()
    ]
    if not found:
        raise CertificateError(f"{directory}: no certificates found in the directory")
    return found


@frozen
class _Identity:
    """One certificate, read and checked: its chain, key and the names it serves."""

    files: CertificateFiles
    chain: tuple[x509.Certificate, ...]
    key: object
    names: tuple[str, ...]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CertificateError(f"{path}: {e.strerror or e}") from None


def load_identity(files: CertificateFiles) -> _Identity:
    """Read a certificate chain and its key; :class:`CertificateError` names what is wrong."""
    try:
        return _load_identity(files)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        # A malformed extension, a key type nothing supports ...: still one line.
        raise CertificateError(f"{files.certificate}: unusable certificate ({e})") from None


def _load_identity(files: CertificateFiles) -> _Identity:
    data = _read(files.certificate)
    try:
        chain = tuple(x509.load_pem_x509_certificates(data))
    except ValueError:
        raise CertificateError(f"{files.certificate}: no PEM certificate in the file") from None
    key_path = files.key or files.certificate
    key_data = data if files.key is None else _read(files.key)
    key = _load_key(key_path, key_data)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != chain[0].public_key().public_bytes(  # type: ignore[attr-defined]
        encoding, public
    ):
        raise CertificateError(f"{key_path}: the key does not belong to {files.certificate}")
    leaf = chain[0]
    now = datetime.now(UTC)
    if leaf.not_valid_after_utc < now:
        log.warn(
            "TLS certificate {path} expired on {when}",
            path=str(files.certificate),
            when=leaf.not_valid_after_utc.isoformat(),
        )
    elif leaf.not_valid_after_utc < now + EXPIRY_WARNING:
        log.warn(
            "TLS certificate {path} expires on {when}",
            path=str(files.certificate),
            when=leaf.not_valid_after_utc.isoformat(),
        )
    return _Identity(files, chain, key, _names(leaf))


def _load_key(path: Path, data: bytes) -> object:
    """The private key in a PEM file, which may hold certificates too."""
    block = _PEM_KEY.search(data)
    if block is None:
        raise CertificateError(f"{path}: no PEM private key in the file")
    try:
        return serialization.load_pem_private_key(block.group(0), password=None)
    except TypeError:
        raise CertificateError(
            f"{path}: the private key is encrypted; give an unencrypted key"
        ) from None
    except ValueError:
        raise CertificateError(f"{path}: the private key cannot be read") from None


def _names(certificate: x509.Certificate) -> tuple[str, ...]:
    """The DNS names a certificate serves (its SAN, else its CN), lower-cased."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        names = [
            str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    else:
        names = san.value.get_values_for_type(x509.DNSName)
    return tuple(name.lower() for name in names)


def end_point_hash(certificate: x509.Certificate) -> hashes.HashAlgorithm:
    """RFC 5929 section 4.1: the certificate's signature hash, but SHA-256 for MD5/SHA-1."""
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        return _DEFAULT_END_POINT_HASH
    return algorithm


@frozen
class TLSInfo:
    """
    What a session knows once its TLS handshake is over: for logs, for the
    cleartext policy and for SASL (EXTERNAL, SCRAM-PLUS).
    """

    version: str
    cipher: str
    server_name: str | None
    alpn: str | None
    #: The client's certificate; present only if it verified against the
    #: ``--tls-client-ca`` (an unverifiable one fails the handshake).
    client_certificate: x509.Certificate | None
    #: Channel-binding data by type: ``tls-server-end-point`` (RFC 5929)
    #: always, ``tls-exporter`` (RFC 9266) on TLS 1.3.
    channel_bindings: Mapping[str, bytes] = field(factory=dict)

    @classmethod
    def of(cls, connection: SSL.Connection) -> TLSInfo:
        """Read the facts of a connection whose handshake has completed."""
        version = connection.get_protocol_version_name()
        bindings: dict[str, bytes] = {}
        server_certificate = connection.get_certificate(as_cryptography=True)
        # On a resumed session the client holds the certificate of the first
        # handshake, which SNI may have picked differently from this one: the
        # hash could differ, so this binding is only given for full handshakes.
        if server_certificate is not None and not _resumed(connection):
            digest = hashes.Hash(end_point_hash(server_certificate))
            digest.update(server_certificate.public_bytes(serialization.Encoding.DER))
            bindings["tls-server-end-point"] = digest.finalize()
        if version == "TLSv1.3":
            bindings["tls-exporter"] = connection.export_keying_material(
                b"EXPORTER-Channel-Binding", 32, None
            )
        name = connection.get_servername()
        alpn = connection.get_alpn_proto_negotiated()
        return cls(
            version=version,
            cipher=connection.get_cipher_name() or "",
            server_name=name.decode("ascii", "replace") if name else None,
            alpn=alpn.decode("ascii", "replace") if alpn else None,
            client_certificate=connection.get_peer_certificate(as_cryptography=True),
            channel_bindings=bindings,
        )


def _resumed(connection: SSL.Connection) -> bool:
    """Whether the handshake resumed a session (OpenSSL's SSL_session_reused)."""
    reused = getattr(_openssl, "SSL_session_reused", None)
    if reused is None:
        return True  # cannot tell: be safe, give no tls-server-end-point
    return bool(reused(connection._ssl))


def _preference(certificate: x509.Certificate, now: datetime) -> tuple[bool, datetime]:
    """Valid now first, then the latest expiry."""
    valid = certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc
    return valid, certificate.not_valid_after_utc


def _alpn_selector(protocol: bytes) -> Callable[[SSL.Connection, list[bytes]], bytes]:
    """An ALPN callback that takes ``protocol`` and refuses any other offer."""

    def select(connection: SSL.Connection, offered: list[bytes]) -> bytes:
        if protocol in offered:
            return protocol
        return _refuse_alpn(offered)

    return select


def _refuse_alpn(offered: list[bytes]) -> NoReturn:
    # Raising makes pyOpenSSL end the handshake with a fatal alert.  The
    # arguments have the shape of OpenSSL's error queue, which Twisted reads.
    offers = b", ".join(offered).decode("ascii", "replace")
    raise ALPNRefused([("SSL routines", "alpn", f"no application protocol (offered {offers})")])


def _verify_client(
    connection: SSL.Connection, certificate: object, errno: int, depth: int, ok: int
) -> bool:
    return bool(ok)


@implementer(IOpenSSLServerConnectionCreator)
class TLSServer:
    """
    The server side of TLS for every POP3 listener: one context per
    certificate, picked by SNI, rebuilt by :meth:`reload`.
    """

    def __init__(self, config: TLSConfig, *, alpn: bytes = ALPN_POP3) -> None:
        if not config.certificates:
            raise CertificateError("TLS needs at least one certificate")
        if config.min_version not in VERSIONS:
            raise CertificateError(f"TLS minimum version must be one of {', '.join(VERSIONS)}")
        self.config = config
        self.alpn = alpn
        self._default: SSL.Context
        self._by_name: dict[str, SSL.Context] = {}
        self._stamps: tuple[tuple[int, int], ...] = ()
        #: When each certificate (by file) stops being valid, in Unix time.
        self.expiries: dict[str, float] = {}
        self._build()

    @property
    def names(self) -> tuple[str, ...]:
        """Every host name some certificate serves."""
        return tuple(self._by_name)

    def _build(self) -> None:
        """Read every file and make the contexts; raise CertificateError, changing nothing."""
        stamps = self._file_stamps()
        identities = [load_identity(files) for files in self.config.certificates]
        contexts = [self._checked_context(identity) for identity in identities]
        by_name: dict[str, SSL.Context] = {}
        # For a name several certificates serve (an old and a renewed Let's
        # Encrypt lineage), the valid one that lasts longest wins.
        now = datetime.now(UTC)
        ranked = sorted(
            zip(identities, contexts, strict=True),
            key=lambda pair: _preference(pair[0].chain[0], now),
            reverse=True,
        )
        for identity, context in ranked:
            for name in identity.names:
                by_name.setdefault(name, context)
        default = contexts[0]
        default.set_tlsext_servername_callback(self._pick_certificate)
        self._default, self._by_name, self._stamps = default, by_name, stamps
        self.expiries = {
            str(identity.files.certificate): identity.chain[0].not_valid_after_utc.timestamp()
            for identity in identities
        }

    def _checked_context(self, identity: _Identity) -> SSL.Context:
        """:meth:`_context`, with OpenSSL's refusals (a key too small ...) as one line."""
        try:
            return self._context(identity)
        except SSL.Error as e:
            reasons = ", ".join(str(item[-1]) for item in e.args[0] if item) if e.args else ""
            raise CertificateError(
                f"{identity.files.certificate}: OpenSSL refuses it ({reasons or e})"
            ) from None

    def _context(self, identity: _Identity) -> SSL.Context:
        config = self.config
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(VERSIONS[config.min_version])
        context.set_options(SSL.OP_NO_COMPRESSION)
        try:
            context.set_cipher_list(config.ciphers.encode("ascii"))
        except (SSL.Error, UnicodeEncodeError):
            raise CertificateError(f"no usable cipher in {config.ciphers!r}") from None
        context.use_certificate(identity.chain[0])
        for certificate in identity.chain[1:]:
            context.add_extra_chain_cert(certificate)
        context.use_privatekey(identity.key)  # type: ignore[arg-type]
        context.check_privatekey()
        # Resumption: the session cache needs an id context; tickets are on.
        context.set_session_id(b"popserv")
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        context.set_alpn_select_callback(_alpn_selector(self.alpn))
        if config.client_ca is not None:
            _read(config.client_ca)
            try:
                context.load_verify_locations(str(config.client_ca))
                context.load_client_ca(str(config.client_ca).encode())
            except SSL.Error:
                raise CertificateError(f"{config.client_ca}: no usable CA certificate") from None
            context.set_verify(SSL.VERIFY_PEER, _verify_client)
        return context

    def _pick_certificate(self, connection: SSL.Connection) -> None:
        """SNI: switch to the context of the certificate for the name asked for."""
        name = connection.get_servername()
        if not name:
            return
        host = name.decode("ascii", "replace").lower().rstrip(".")
        context = self._by_name.get(host)
        if context is None and "." in host:
            context = self._by_name.get("*." + host.split(".", 1)[1])
        if context is not None and context is not connection.get_context():
            connection.set_context(context)

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._default, None)

    # Reloading

    def paths(self) -> list[Path]:
        """Every file a reload reads."""
        paths = [p for files in self.config.certificates for p in files.paths]
        if self.config.client_ca is not None:
            paths.append(self.config.client_ca)
        return paths

    def _file_stamps(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for path in self.paths():
            try:
                st = os.stat(path)
            except OSError:
                stamps.append((0, 0))
            else:
                stamps.append((st.st_mtime_ns, st.st_ino))
        return tuple(stamps)

    def reload(self) -> bool:
        """
        Re-read every certificate, key and CA file.  New connections get the
        new ones; on any error the old ones stay in use and the error is
        logged.  Return True when the new files were taken.
        """
        try:
            self._build()
        except CertificateError as e:
            log.error("TLS reload failed, keeping the certificates in use: {error}", error=str(e))
            return False
        except Exception:
            # Whatever it was, the timer that calls this must keep running.
            log.failure("TLS reload failed, keeping the certificates in use")
            return False
        log.info("TLS certificates loaded for {names}", names=", ".join(self.names) or "-")
        return True

    def reload_if_changed(self) -> bool:
        """:meth:`reload` if any file changed since the last load (Let's Encrypt renewals)."""
        if self._file_stamps() == self._stamps:
            return False
        return self.reload()
