"""Certificates for TLS between devices, tools and the coordinator: a local certificate
authority for development and tests (``fedctl certs init``), and loading of the PEM files
either side hands to grpcio's own credentials. Production operators bring their own
certificates; nothing here is needed to use them but the loaders.

Keys are ECDSA P-256: a handshake costs a fraction of an RSA-2048 one, and every TLS stack
grpcio ships accepts them. Private keys are written unencrypted (grpcio takes no pass
phrase), so their files are created with mode 0600 (``os.open`` with the mode and
``O_EXCL``: the file never exists with wider permissions, and an existing key is never
overwritten).

Everything refused raises :class:`TlsError`, whose message names the file or the host.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from core.errors import CoreError

#: Names every generated server certificate carries: a coordinator on this host is reached
#: as ``localhost``, ``127.0.0.1`` or ``[::1]``.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_VALID_DAYS = 3650
LEAF_VALID_DAYS = 397
#: Certificates start this long before "now", so a peer whose clock is a little behind
#: accepts them at once.
CLOCK_SKEW = datetime.timedelta(minutes=5)

#: File names ``fedctl certs init`` writes and ``fedctl coordinator serve --tls DIR`` reads.
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class TlsError(CoreError):
    """A certificate or key file is missing, unreadable, malformed or does not match its
    partner; a host name cannot go in a certificate; or a file to write already exists."""


@dataclass(frozen=True)
class CertifiedKey:
    """A certificate and its private key, as objects (see :func:`pem_pair` for bytes)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


@dataclass(frozen=True)
class ServerTls:
    """What a TLS server needs, as PEM bytes: its chain and key, and the CA that client
    certificates must chain to (None: clients are not asked for one)."""

    cert_chain_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None = None


@dataclass(frozen=True)
class ClientTls:
    """What a TLS client needs, as PEM bytes: the CA the server's certificate must chain to,
    and optionally its own certificate and key (mutual TLS)."""

    ca_pem: bytes
    cert_chain_pem: bytes | None = None
    key_pem: bytes | None = None


# -- names -------------------------------------------------------------------


def subject_alternative_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The SANs of a server certificate: the loopback names plus ``hosts``, each an IP
    address SAN when it parses as one, a DNS SAN otherwise; duplicates dropped, order kept.
    Raises :class:`TlsError` naming a host that is neither."""
    names: list[x509.GeneralName] = []
    for host in (*LOOPBACK_HOSTS, *hosts):
        name = _general_name(host)
        if name not in names:
            names.append(name)
    return names


def _general_name(host: str) -> x509.GeneralName:
    bare = host.strip()
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(bare))
    except ValueError:
        pass
    labels = bare.rstrip(".").split(".")
    wildcard_ok = len(labels) > 2 and labels[0] == "*"
    if (not bare or len(bare) > 253
            or not all(_DNS_LABEL.match(label) for label in labels[1 if wildcard_ok else 0:])):
        raise TlsError(f"--host {host!r}: not an IP address or a DNS name (letters, digits and "
                       "hyphens in dot-separated labels)")
    return x509.DNSName(bare.rstrip(".").lower())


# -- generation --------------------------------------------------------------


def generate_ca(common_name: str = "fedcoord local CA", *, valid_days: int = CA_VALID_DAYS,
                now: datetime.datetime | None = None) -> CertifiedKey:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _validity(x509.CertificateBuilder(), now, valid_days)
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
    )
    return CertifiedKey(builder.sign(key, hashes.SHA256()), key)


def issue_server_certificate(ca: CertifiedKey, hosts: Sequence[str] = (), *,
                             valid_days: int = LEAF_VALID_DAYS,
                             now: datetime.datetime | None = None) -> CertifiedKey:
    """A server certificate signed by ``ca`` for the loopback names and ``hosts``."""
    sans = subject_alternative_names(hosts)
    first = sans[len(LOOPBACK_HOSTS)] if len(sans) > len(LOOPBACK_HOSTS) else sans[0]
    return _issue(ca, str(first.value), sans, ExtendedKeyUsageOID.SERVER_AUTH, valid_days, now)


def issue_client_certificate(ca: CertifiedKey, name: str, *,
                             valid_days: int = LEAF_VALID_DAYS,
                             now: datetime.datetime | None = None) -> CertifiedKey:
    """A client certificate (mutual TLS) signed by ``ca``, naming ``name`` as its subject
    and as a DNS SAN."""
    san = _general_name(name)
    return _issue(ca, name, [san], ExtendedKeyUsageOID.CLIENT_AUTH, valid_days, now)


def _issue(ca: CertifiedKey, common_name: str, sans: list[x509.GeneralName],
           usage: x509.ObjectIdentifier, valid_days: int,
           now: datetime.datetime | None) -> CertifiedKey:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        _validity(x509.CertificateBuilder(), now, valid_days)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
            critical=False)
    )
    return CertifiedKey(builder.sign(ca.key, hashes.SHA256()), key)


def _validity(builder: x509.CertificateBuilder, now: datetime.datetime | None,
              valid_days: int) -> x509.CertificateBuilder:
    if valid_days < 1:
        raise TlsError(f"validity must be at least 1 day, got {valid_days}")
    start = (now or datetime.datetime.now(datetime.UTC)) - CLOCK_SKEW
    return builder.not_valid_before(start).not_valid_after(
        start + CLOCK_SKEW + datetime.timedelta(days=valid_days))


# -- files -------------------------------------------------------------------


@dataclass(frozen=True)
class LocalCaFiles:
    """The four files of :func:`write_local_ca`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def write_local_ca(out: Path, hosts: Sequence[str] = (), *,
                   ca_valid_days: int = CA_VALID_DAYS,
                   server_valid_days: int = LEAF_VALID_DAYS) -> LocalCaFiles:
    """Creates ``out`` (mode 0700 when new) and writes a new CA and a server certificate for
    the loopback names and ``hosts`` into it. Refuses (before writing anything) when any of
    the four files exists: a CA key is never overwritten."""
    files = LocalCaFiles(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    subject_alternative_names(hosts)  # a bad host fails before any file is touched
    for path in (files.ca_cert, files.ca_key, files.server_cert, files.server_key):
        if path.exists():
            raise TlsError(f"{path} exists; remove it or choose another directory")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = generate_ca(valid_days=ca_valid_days)
    server = issue_server_certificate(ca, hosts, valid_days=server_valid_days)
    write_key(files.ca_key, ca)
    write_certificate(files.ca_cert, ca)
    write_key(files.server_key, server)
    # The chain a server presents: its own certificate, then the CA's (harmless when the
    # client has the CA; needed by clients that trust only an operator's root).
    write_certificate(files.server_cert, server, chain=[ca])
    return files


def write_key(path: Path, pair: CertifiedKey) -> None:
    """Writes the private key, PKCS#8 PEM, to a new file created with mode 0600."""
    _write_new(path, pair.key_pem(), 0o600)


def write_certificate(path: Path, pair: CertifiedKey,
                      chain: Sequence[CertifiedKey] = ()) -> None:
    """Writes the certificate (then ``chain``'s, in order) as PEM to a new file, mode 0644."""
    _write_new(path, pair.cert_pem() + b"".join(c.cert_pem() for c in chain), 0o644)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise TlsError(f"{path} exists; remove it or choose another file") from None
    except OSError as exc:
        raise TlsError(f"{path}: cannot create ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# -- loading -----------------------------------------------------------------


def load_server_tls(tls_dir: Path, client_ca: Path | None = None) -> ServerTls:
    """Reads ``tls_dir/server.crt`` and ``tls_dir/server.key`` (and the client CA for mutual
    TLS), checking that each parses and that the key is the certificate's."""
    cert_path, key_path = tls_dir / SERVER_CERT, tls_dir / SERVER_KEY
    chain = _read(cert_path, "certificate")
    key = _read(key_path, "private key")
    _check_pair(cert_path, chain, key_path, key)
    ca = None
    if client_ca is not None:
        ca = _read(client_ca, "CA certificate")
        _certificates(client_ca, ca)
    return ServerTls(chain, key, ca)


def load_client_tls(ca: Path, cert: Path | None = None, key: Path | None = None) -> ClientTls:
    """Reads the CA file and, for mutual TLS, the client's certificate and key (both or
    neither), with the same checks as :func:`load_server_tls`."""
    if (cert is None) != (key is None):
        raise TlsError("--cert and --key go together: give both or neither")
    ca_pem = _read(ca, "CA certificate")
    _certificates(ca, ca_pem)
    if cert is None or key is None:
        return ClientTls(ca_pem)
    chain, key_pem = _read(cert, "certificate"), _read(key, "private key")
    _check_pair(cert, chain, key, key_pem)
    return ClientTls(ca_pem, chain, key_pem)


def load_ca(cert: Path, key: Path) -> CertifiedKey:
    """Reads a CA written by :func:`write_local_ca` to issue more certificates with it."""
    cert_pem, key_pem = _read(cert, "CA certificate"), _read(key, "CA private key")
    _check_pair(cert, cert_pem, key, key_pem)
    private = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{key}: not an ECDSA key (`fedctl certs init` writes one)")
    return CertifiedKey(_certificates(cert, cert_pem)[0], private)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"{path}: no such file (the {what})") from None
    except OSError as exc:
        raise TlsError(f"{path}: cannot read the {what} ({exc.strerror})") from None


def _certificates(path: Path, pem: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certs = []
    if not certs:
        raise TlsError(f"{path}: not a PEM certificate")
    return certs


def _check_pair(cert_path: Path, chain: bytes, key_path: Path, key_pem: bytes) -> None:
    leaf = _certificates(cert_path, chain)[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TlsError(f"{key_path}: not an unencrypted PEM private key") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, pub)
            != leaf.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise TlsError(f"{key_path} is not the private key of {cert_path}")
