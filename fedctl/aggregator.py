"""``fedctl aggregator serve``: an aggregator shard (issue 17), which takes the uploads of
the devices a coordinator assigns to it and hands the coordinator their partial sum;
``fedctl aggregator keygen``: the coordinator's master key, and each shard's own key
derived from it (``--master FILE --index I``).

A coordinator names its shards with ``coordinator serve --aggregator HOST:PORT``
(repeatable, in ``--index`` order) and ``--shard-key-file`` (the master key); shard I serves
with ``--key-file`` holding its own key only, so it can neither make tickets another shard
takes nor call another shard.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

#: ``--port``'s default (coordinator.shard_app.DEFAULT_PORT, written out so --help imports
#: nothing).
DEFAULT_PORT = 7071


def register(subparsers: Any) -> None:
    """Adds ``aggregator serve`` and ``aggregator keygen`` to ``fedctl``'s subparsers
    (imports nothing heavy)."""
    aggregator = subparsers.add_parser(
        "aggregator", help="run an aggregator shard (takes a share of each round's uploads)")
    actions = aggregator.add_subparsers(dest="action", required=True)
    serve = actions.add_parser(
        "serve", help="start an aggregator shard",
        description="Serves AggregatorService: devices a coordinator assigned to this shard "
                    "upload here under tickets it signed, and the coordinator collects the "
                    "partial sum of each round. Start the coordinator with --aggregator "
                    "HOST:PORT for each shard, in --index order, and the master key this "
                    "shard's key was derived from.")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    serve.add_argument("--index", type=int, required=True, metavar="I",
                       help="this shard's place (from 0) in the coordinator's --aggregator "
                            "list")
    serve.add_argument("--key-file", type=Path, required=True, metavar="FILE",
                       help="this shard's own key (fedctl aggregator keygen --master FILE "
                            "--index I): 32 raw bytes or 64 hex characters")
    serve.add_argument("--spool-dir", type=Path, required=True, metavar="DIR",
                       help="where uploads in flight are written (one file each, removed once "
                            "answered)")
    serve.add_argument("--tls-dir", type=Path, metavar="DIR",
                       help="serve TLS with DIR/server.crt and DIR/server.key (see `fedctl "
                            "certs init`)")
    serve.add_argument("--insecure", action="store_true",
                       help="allow plaintext on a non-loopback --host (trusted networks only)")
    serve.add_argument("--port-file", type=Path, metavar="FILE",
                       help="write the bound port to this file once serving")
    serve.add_argument("--max-message-bytes", type=int, default=(4 << 20) + (256 << 10),
                       metavar="BYTES",
                       help="largest upload message (a chunk and its header); keep it above "
                            "the coordinator's --max-chunk-bytes plus 256 KiB")
    serve.add_argument("--upload-idle-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="seconds an upload may stay silent before it is dropped")
    serve.set_defaults(func=cmd_aggregator_serve)

    keygen = actions.add_parser(
        "keygen", help="write a new master key (32 random bytes, as hex), or with --master "
                       "and --index a shard's own key, to a new file, mode 0600")
    keygen.add_argument("--out", type=Path, required=True, metavar="FILE",
                        help="the key file to create (never overwritten)")
    keygen.add_argument("--master", type=Path, metavar="FILE",
                        help="derive shard --index's key from this master key (the "
                             "coordinator's --shard-key-file)")
    keygen.add_argument("--index", type=int, metavar="I",
                        help="with --master: the shard whose key to write")
    keygen.set_defaults(func=cmd_aggregator_keygen)


def read_key(path: Path, flag: str = "--key-file") -> bytes:
    """The key in ``path``; a CliError (exit status 2) naming ``flag`` and the file
    otherwise."""
    from core.shards import parse_key
    from fedctl.errors import CliError

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(f"{flag} {path}: cannot read it ({exc.strerror or exc})",
                       exit_code=2) from None
    try:
        return parse_key(data)
    except ValueError as exc:
        raise CliError(f"{flag} {path}: {exc}", exit_code=2) from None


def cmd_aggregator_serve(args: argparse.Namespace) -> int:
    import asyncio

    from fedctl.errors import CliError

    if args.index < 0:
        raise CliError(f"--index {args.index}: expected 0 or more", exit_code=2)
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port}: expected 0 to 65535", exit_code=2)
    if args.max_message_bytes < 64 << 10:
        raise CliError(f"--max-message-bytes {args.max_message_bytes}: expected at least "
                       f"{64 << 10}", exit_code=2)
    if not 0 < args.upload_idle_timeout <= 3600:
        raise CliError(f"--upload-idle-timeout {args.upload_idle_timeout:g}: expected seconds "
                       "from 0 to 3600", exit_code=2)
    key = read_key(args.key_file)
    # the shard's imports once flags are good
    from coordinator.shard_app import AggregatorSettings, serve_aggregator
    from core.tls import TlsError

    settings = AggregatorSettings(
        index=args.index, key=key, spool_dir=args.spool_dir, host=args.host, port=args.port,
        tls_dir=args.tls_dir, insecure=args.insecure,
        max_message_bytes=args.max_message_bytes,
        upload_idle_timeout_s=args.upload_idle_timeout)
    try:
        asyncio.run(serve_aggregator(settings, args.port_file))
    except (OSError, TlsError, ValueError) as exc:
        raise CliError(f"aggregator: {exc}") from None
    return 0


def write_new_key(path: Path, key: bytes | None = None) -> None:
    """Writes ``key`` (default: 32 new random bytes) as hex to ``path``, readable by its owner
    only.

    Raises:
        FileExistsError: ``path`` exists (a key file is never overwritten).
        OSError: it cannot be created.
    """
    import secrets

    from core.shards import KEY_BYTES

    key = secrets.token_bytes(KEY_BYTES) if key is None else key
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")


def cmd_aggregator_keygen(args: argparse.Namespace) -> int:
    from core.shards import derive_shard_key
    from fedctl.errors import CliError

    path: Path = args.out
    key = None
    if (args.master is None) != (args.index is None):
        raise CliError("--master and --index go together (a shard's key is derived from the "
                       "master key for its index)", exit_code=2)
    if args.master is not None:
        if args.index < 0:
            raise CliError(f"--index {args.index}: expected 0 or more", exit_code=2)
        key = derive_shard_key(read_key(args.master, "--master"), args.index)
    try:
        write_new_key(path, key)
    except FileExistsError:
        raise CliError(f"--out {path} exists; a key file is never overwritten (remove it, or "
                       "choose another file)", exit_code=2) from None
    except OSError as exc:
        raise CliError(f"--out {path}: cannot create it ({exc.strerror or exc})",
                       exit_code=2) from None
    if args.master is not None:
        print(f"wrote shard {args.index}'s key to {path} (mode 0600)\n"
              f"shard:       fedctl aggregator serve --index {args.index} --key-file {path} ...")
        return 0
    print(f"wrote a new master key to {path} (mode 0600)\n"
          f"coordinator: fedctl coordinator serve --aggregator HOST:PORT ... "
          f"--shard-key-file {path}\n"
          f"shard I:     fedctl aggregator keygen --master {path} --index I --out shard-I.key,\n"
          f"             then fedctl aggregator serve --index I --key-file shard-I.key ...")
    return 0
