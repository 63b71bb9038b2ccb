"""The local CA of `fedctl certs init`: certificates a TLS client accepts for the loopback
names and the operator's hosts, signed by the CA, valid from now for the stated days, and
private keys that never exist on disk with more than owner permissions."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from core.errors import CoreError
from core.tls import (
    CA_VALID_DAYS,
    CLOCK_SKEW,
    LEAF_VALID_DAYS,
    TlsError,
    generate_ca,
    issue_client_certificate,
    issue_server_certificate,
    load_ca,
    load_client_tls,
    load_server_tls,
    write_local_ca,
)

HOSTS = ["coord.example.org", "10.1.2.3", "[fd00::7]", "Coord-2.Example.org."]


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Umask 0: a key file is 0600 because it was created so, not because of the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    write_local_ca(tmp_path / "certs", HOSTS)
    return tmp_path / "certs"


def _leaf_and_ca(ca_dir: Path) -> tuple[x509.Certificate, x509.Certificate]:
    leaf, chained_ca = x509.load_pem_x509_certificates((ca_dir / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    assert chained_ca == ca, "server.crt carries the CA after the leaf"
    return leaf, ca


def test_the_server_certificate_names_loopback_and_every_host(ca_dir: Path) -> None:
    leaf, _ = _leaf_and_ca(ca_dir)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "coord.example.org",
                                                      "coord-2.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("fd00::7")]


@pytest.mark.parametrize("name", [
    verification.DNSName("localhost"),
    verification.IPAddress(ipaddress.ip_address("127.0.0.1")),
    verification.IPAddress(ipaddress.ip_address("::1")),
    verification.DNSName("coord.example.org"),
    verification.IPAddress(ipaddress.ip_address("10.1.2.3")),
], ids=str)
def test_a_client_trusting_the_ca_accepts_the_server_under_each_name(
    ca_dir: Path, name: verification.DNSName | verification.IPAddress
) -> None:
    leaf, ca = _leaf_and_ca(ca_dir)
    verifier = (verification.PolicyBuilder().store(verification.Store([ca]))
                .build_server_verifier(name))
    chain = verifier.verify(leaf, [])
    assert chain[-1] == ca


def test_a_name_not_in_the_certificate_or_another_ca_is_refused(ca_dir: Path,
                                                                 tmp_path: Path) -> None:
    leaf, ca = _leaf_and_ca(ca_dir)
    verifier = (verification.PolicyBuilder().store(verification.Store([ca]))
                .build_server_verifier(verification.DNSName("evil.example.org")))
    with pytest.raises(verification.VerificationError):
        verifier.verify(leaf, [])
    other = generate_ca().certificate
    verifier = (verification.PolicyBuilder().store(verification.Store([other]))
                .build_server_verifier(verification.DNSName("localhost")))
    with pytest.raises(verification.VerificationError):
        verifier.verify(leaf, [])


def test_the_ca_signed_the_server_certificate_and_may_sign_nothing_but_leaves(
    ca_dir: Path
) -> None:
    leaf, ca = _leaf_and_ca(ca_dir)
    leaf.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_validity_starts_just_before_now_and_lasts_the_stated_days() -> None:
    now = datetime.datetime(2026, 3, 1, 12, tzinfo=datetime.UTC)
    ca = generate_ca(now=now)
    server = issue_server_certificate(ca, now=now, valid_days=30)
    for cert, days in ((ca.certificate, CA_VALID_DAYS), (server.certificate, 30)):
        assert cert.not_valid_before_utc == now - CLOCK_SKEW
        assert cert.not_valid_after_utc == now + datetime.timedelta(days=days)
    with pytest.raises(TlsError, match="at least 1 day"):
        issue_server_certificate(ca, valid_days=0)


def test_written_certificates_are_valid_now(ca_dir: Path) -> None:
    leaf, ca = _leaf_and_ca(ca_dir)
    now = datetime.datetime.now(datetime.UTC)
    for cert in (leaf, ca):
        assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=LEAF_VALID_DAYS) + CLOCK_SKEW


def test_key_files_are_0600_and_certificates_0644(tmp_path: Path,
                                                  permissive_umask: None) -> None:
    files = write_local_ca(tmp_path / "certs")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode)
             for p in (files.ca_cert, files.ca_key, files.server_cert, files.server_key)}
    assert modes == {"ca.crt": 0o644, "ca.key": 0o600, "server.crt": 0o644,
                     "server.key": 0o600}
    assert stat.S_IMODE((tmp_path / "certs").stat().st_mode) == 0o700


def test_nothing_is_overwritten_and_a_bad_host_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    with pytest.raises(TlsError, match=r"--host 'bad host!': not an IP address or a DNS name"):
        write_local_ca(out, ["bad host!"])
    assert not out.exists()
    write_local_ca(out)
    key_before = (out / "ca.key").read_bytes()
    with pytest.raises(TlsError, match=r"ca\.crt exists"):
        write_local_ca(out)
    assert (out / "ca.key").read_bytes() == key_before


@pytest.mark.parametrize("host", ["", "-lead.example", "a..b", "x" * 64 + ".org", "a/b",
                                  "*.org"])
def test_hosts_that_cannot_be_a_san_are_refused(host: str) -> None:
    with pytest.raises(TlsError, match="not an IP address or a DNS name"):
        issue_server_certificate(generate_ca(), [host])


def test_a_wildcard_name_below_a_domain_is_accepted() -> None:
    cert = issue_server_certificate(generate_ca(), ["*.fleet.example.org"]).certificate
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "*.fleet.example.org" in sans.get_values_for_type(x509.DNSName)


def test_the_loaders_check_that_each_key_is_its_certificates(ca_dir: Path,
                                                             tmp_path: Path) -> None:
    server = load_server_tls(ca_dir, client_ca=ca_dir / "ca.crt")
    assert server.client_ca_pem == (ca_dir / "ca.crt").read_bytes()
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "server.crt").write_bytes((ca_dir / "server.crt").read_bytes())
    (swapped / "server.key").write_bytes((ca_dir / "ca.key").read_bytes())
    with pytest.raises(TlsError, match=r"server\.key is not the private key of .*server\.crt"):
        load_server_tls(swapped)
    with pytest.raises(TlsError, match=r"nowhere/server\.crt: no such file \(the certificate\)"):
        load_server_tls(tmp_path / "nowhere")
    with pytest.raises(TlsError, match=r"server\.key: not a PEM certificate"):
        load_client_tls(ca_dir / "server.key")
    with pytest.raises(TlsError, match="--cert and --key go together"):
        load_client_tls(ca_dir / "ca.crt", cert=ca_dir / "server.crt")


def test_a_client_certificate_from_the_same_ca_is_for_client_auth(ca_dir: Path) -> None:
    ca = load_ca(ca_dir / "ca.crt", ca_dir / "ca.key")
    client = issue_client_certificate(ca, "device-7")
    client.certificate.verify_directly_issued_by(ca.certificate)
    usage = client.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    verifier = verification.PolicyBuilder().store(
        verification.Store([ca.certificate])).build_client_verifier()
    assert verifier.verify(client.certificate, []).subjects == [x509.DNSName("device-7")]


def test_every_refusal_is_a_core_error() -> None:
    assert issubclass(TlsError, CoreError)
