"""The coordinator serves plaintext only where nothing crosses a network, unless told
``insecure``; its TLS files are checked before it touches its database."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from coordinator.settings import CoordinatorSettings
from coordinator.transport.tls import is_loopback, server_credentials
from core.tls import TlsError, write_local_ca


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("localhost", True), ("::1", True),
    ("[::1]", True), ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.5", False),
    ("coordinator.example.org", False),
])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_plaintext_on_a_network_address_is_refused_without_insecure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(TlsError, match=r"refusing to serve plaintext on 0\.0\.0\.0.*--tls DIR"
                                       r".*--insecure"):
        server_credentials(CoordinatorSettings(host="0.0.0.0"))
    with caplog.at_level(logging.WARNING):
        assert server_credentials(CoordinatorSettings(host="0.0.0.0", insecure=True)) is None
    assert "serving WITHOUT TLS on 0.0.0.0 (--insecure)" in caplog.text


def test_plaintext_on_loopback_is_allowed_with_a_warning(
    caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert server_credentials(CoordinatorSettings(host="127.0.0.1")) is None
    assert "serving WITHOUT TLS on 127.0.0.1 (loopback only)" in caplog.text


def test_tls_settings_that_contradict_or_miss_files_are_refused(tmp_path: Path) -> None:
    files = write_local_ca(tmp_path / "certs")
    with pytest.raises(TlsError, match="--client-ca needs --tls DIR"):
        server_credentials(CoordinatorSettings(client_ca=files.ca_cert))
    with pytest.raises(TlsError, match="--insecure and --tls contradict"):
        server_credentials(CoordinatorSettings(tls_dir=tmp_path / "certs", insecure=True))
    with pytest.raises(TlsError, match="no such file"):
        server_credentials(CoordinatorSettings(tls_dir=tmp_path / "none"))
    assert server_credentials(CoordinatorSettings(host="0.0.0.0", tls_dir=tmp_path / "certs",
                                                  client_ca=files.ca_cert)) is not None


def test_a_refused_coordinator_never_opens_its_database(tmp_path: Path) -> None:
    from coordinator.app import Coordinator

    db = tmp_path / "c.db"
    with pytest.raises(TlsError):
        Coordinator(CoordinatorSettings(host="0.0.0.0", db_url=f"sqlite:///{db}",
                                        store_dir=tmp_path / "store"))
    assert not db.exists() and not (tmp_path / "store").exists()
