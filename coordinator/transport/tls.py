"""The coordinator's transport security: grpcio server credentials from the settings, and
the rule that only a loopback address may serve plaintext unless the operator says
``--insecure``.

Both services share one port, so with mutual TLS every caller (devices and ``fedctl``
alike) must present a certificate signed by the client CA.
"""

from __future__ import annotations

import ipaddress
import logging

import grpc

from coordinator.settings import CoordinatorSettings
from core.tls import TlsError, load_server_tls

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses; False for wildcard addresses
    (``0.0.0.0``, ``::``, empty) and every other name, which may resolve anywhere."""
    bare = host.strip().strip("[]")
    if bare.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def server_credentials(settings: CoordinatorSettings) -> grpc.ServerCredentials | None:
    """The credentials to bind with, or None for plaintext (logged as a warning).

    Raises :class:`~core.tls.TlsError` when a file is missing or malformed, when a client
    CA is given without TLS, or when a non-loopback address would serve plaintext without
    ``insecure``."""
    if settings.tls_dir is None:
        if settings.client_ca is not None:
            raise TlsError("--client-ca needs --tls DIR (mutual TLS is TLS first)")
        if not is_loopback(settings.host) and not settings.insecure:
            raise TlsError(
                f"refusing to serve plaintext on {settings.host}, which is not a loopback "
                "address: devices' updates and admin calls would cross the network "
                "unencrypted. Give --tls DIR (see `fedctl certs init`), or --insecure if "
                "this network is trusted")
        log.warning("serving WITHOUT TLS on %s%s: traffic is plaintext", settings.host,
                    " (--insecure)" if settings.insecure else " (loopback only)")
        return None
    if settings.insecure:
        raise TlsError("--insecure and --tls contradict each other: give one")
    tls = load_server_tls(settings.tls_dir, settings.client_ca)
    return grpc.ssl_server_credentials(
        [(tls.key_pem, tls.cert_chain_pem)],
        root_certificates=tls.client_ca_pem,
        require_client_auth=tls.client_ca_pem is not None,
    )


def bind(server: grpc.aio.Server, address: str,
         credentials: grpc.ServerCredentials | None) -> int:
    """Adds ``address`` (plaintext without ``credentials``) to ``server``; the bound port.

    Raises:
        OSError: the address cannot be bound (in use, or not an address of this host).
    """
    try:
        port = (server.add_insecure_port(address) if credentials is None
                else server.add_secure_port(address, credentials))
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address} (in use, or not an address of this host)")
    return port
