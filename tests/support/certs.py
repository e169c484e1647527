"""
A throw-away certificate authority for the TLS tests, made fresh with the
``cryptography`` package: no private key is ever checked in.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_NOW = datetime.datetime.now(datetime.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@frozen
class Issued:
    """A certificate and its key, with the chain that leads to the CA."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    def write(self, directory: Path, stem: str, *, combined: bool = False) -> tuple[Path, Path]:
        """Write ``stem.pem`` (leaf + chain) and ``stem.key``, or one file with both."""
        directory.mkdir(parents=True, exist_ok=True)
        chain = b"".join(cert_pem(c) for c in (self.certificate, *self.chain))
        cert_path = directory / f"{stem}.pem"
        if combined:
            cert_path.write_bytes(chain + key_pem(self.key))
            return cert_path, cert_path
        key_path = directory / f"{stem}.key"
        cert_path.write_bytes(chain)
        key_path.write_bytes(key_pem(self.key))
        return cert_path, key_path


class CA:
    """A root CA that issues server and client certificates."""

    def __init__(self, name: str = "popserv test CA") -> None:
        self.key = _key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - datetime.timedelta(days=1))
            .not_valid_after(_NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(cert_pem(self.certificate))
        return path

    def issue(
        self,
        *names: str,
        client: bool = False,
        emails: tuple[str, ...] = (),
        days: int = 30,
        hash_algorithm: hashes.HashAlgorithm | None = None,
    ) -> Issued:
        """A certificate for DNS names / IP addresses (server), or a client certificate."""
        key = _key()
        alt_names: list[x509.GeneralName] = []
        for name in names:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt_names.append(x509.DNSName(name))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - datetime.timedelta(days=1))
            .not_valid_after(_NOW + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if not client:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        elif emails:
            san = x509.SubjectAlternativeName([x509.RFC822Name(e) for e in emails])
            builder = builder.add_extension(san, critical=False)
        certificate = builder.sign(self.key, hash_algorithm or hashes.SHA256())
        return Issued(certificate, key, (self.certificate,))
