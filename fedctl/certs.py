"""``fedctl certs init --out DIR [--host NAME ...]``: a local certificate authority and a
server certificate for ``fedctl coordinator serve --tls DIR`` (development, tests, a lab
network); ``fedctl certs client NAME --ca-dir DIR --out DIR``: a client certificate from that
CA for mutual TLS (``serve --client-ca DIR/ca.crt``, clients ``--cert``/``--key``).

For production, operators bring certificates from their own CA; these commands are a
convenience, not a PKI. Key files are created with mode 0600.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Adds the ``certs`` subcommands to ``fedctl``'s subparsers (imports nothing heavy)."""
    certs = subparsers.add_parser("certs", help="local CA and certificates for TLS")
    actions = certs.add_subparsers(dest="action", required=True)
    init = actions.add_parser(
        "init", help="write ca.crt, ca.key, server.crt, server.key (localhost, 127.0.0.1, "
                     "::1 and every --host)")
    init.add_argument("--out", type=Path, required=True, help="directory to write into")
    init.add_argument("--host", action="append", default=[], metavar="NAME",
                      help="another DNS name or IP address of the coordinator (repeatable)")
    init.add_argument("--days", type=int, default=397, help="server certificate validity")
    init.set_defaults(func=cmd_certs_init)

    client = actions.add_parser("client", help="a client certificate for mutual TLS, signed "
                                               "by the CA of `certs init`")
    client.add_argument("name", help="the client's name (certificate subject and DNS SAN)")
    client.add_argument("--ca-dir", type=Path, required=True,
                        help="directory holding ca.crt and ca.key")
    client.add_argument("--out", type=Path, required=True,
                        help="directory to write NAME.crt and NAME.key into")
    client.add_argument("--days", type=int, default=397, help="certificate validity")
    client.set_defaults(func=cmd_certs_client)


def cmd_certs_init(args: argparse.Namespace) -> int:
    from core.tls import TlsError, write_local_ca
    from fedctl.errors import CliError

    try:
        files = write_local_ca(args.out, args.host, server_valid_days=args.days)
    except TlsError as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {files.ca_cert}, {files.ca_key}, {files.server_cert}, {files.server_key}\n"
          f"serve:   fedctl coordinator serve --tls {args.out}\n"
          f"clients: --ca {files.ca_cert}")
    return 0


def cmd_certs_client(args: argparse.Namespace) -> int:
    from core.tls import (
        CA_CERT,
        CA_KEY,
        TlsError,
        issue_client_certificate,
        load_ca,
        write_certificate,
        write_key,
    )
    from fedctl.errors import CliError

    cert_path, key_path = args.out / f"{args.name}.crt", args.out / f"{args.name}.key"
    try:
        ca = load_ca(args.ca_dir / CA_CERT, args.ca_dir / CA_KEY)
        issued = issue_client_certificate(ca, args.name, valid_days=args.days)
        for path in (cert_path, key_path):
            if path.exists():
                raise TlsError(f"{path} exists; remove it or choose another directory")
        args.out.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_key(key_path, issued)
        write_certificate(cert_path, issued)
    except TlsError as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {cert_path}, {key_path}\n"
          f"clients: --cert {cert_path} --key {key_path}")
    return 0
