"""fedctl: the command line of fedcoord. Heavy imports happen inside commands, so
``fedctl --help`` is instant.

Every command's ``--help`` shows each option's default; ``-v`` works before or after the
command; ``coordinator serve`` and ``agent run`` also read a config file and ``FEDCOORD_*``
variables (:mod:`fedctl.config`); ``--json`` on ``task launch|status|list|watch`` and
``model pull`` prints only JSON on stdout (:mod:`fedctl.output`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fedctl.aggregator import register as register_aggregator
from fedctl.certs import register as register_certs
from fedctl.cluster import LEASE_TTL_S, add_lease_ttl, check_lease_ttl
from fedctl.cluster import register as register_cluster
from fedctl.experiment import register as register_experiment
from fedctl.security import register as register_security
from fedctl.simulate import register as register_simulate
from fedctl.tune import register as register_tune

if TYPE_CHECKING:
    from rich.table import Table

    from coordinator.settings import SecuritySettings, ShardSettings
    from core.tls import ClientTls
    from fedctl.admin import AdminClient
    from protos.fedcoord.v1 import admin_pb2

T = TypeVar("T")

DEFAULT_COORDINATOR = "127.0.0.1:7070"
#: coordinator.settings.SecuritySettings' limits, written out so --help imports nothing.
DEFAULT_RATE_LIMITS = "device-checkin=5/20, peer-checkin=1000/2000, peer-enroll=20/200"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to every option that has a default worth showing (not None,
    not off, not empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is False or default in ("", [])
                or default == argparse.SUPPRESS or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


class FedctlParser(argparse.ArgumentParser):
    """fedctl's parsers: help with defaults, and ``-v`` accepted by every subcommand too
    (``fedctl agent run ... -v``). ``settings_parsers`` names the commands that read a config
    file and the environment (:mod:`fedctl.config`), by the file's table."""

    def __init__(self, *args: Any, root: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.settings_parsers: dict[str, argparse.ArgumentParser] = {}
        if not root:
            # SUPPRESS: a subcommand without -v keeps what the root parser set.
            self.add_argument("-v", "--verbose", action="store_true",
                              default=argparse.SUPPRESS, help="log more")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedcoord")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_coordinator(p: argparse.ArgumentParser, *, several: bool = True) -> None:
    p.add_argument("--coordinator", default=DEFAULT_COORDINATOR,
                   metavar="HOST:PORT[,HOST:PORT...]" if several else "HOST:PORT",
                   help="the coordinator's address; replicas (serve --replica): every "
                        "replica's address, comma-separated (tried in turn)" if several
                   else "the coordinator's address")
    p.add_argument("--ca", type=Path, metavar="FILE",
                   help="TLS: the CA certificate the coordinator's certificate must chain to "
                        "(without it: plaintext)")
    p.add_argument("--cert", type=Path, metavar="FILE",
                   help="mutual TLS: this client's certificate (with --key and --ca)")
    p.add_argument("--key", type=Path, metavar="FILE", help="mutual TLS: this client's key")
    p.add_argument("--token", metavar="TOKEN",
                   help="admin API token (else $FEDCOORD_TOKEN, else the token file "
                        "~/.config/fedcoord/token)")


def _add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as JSON on stdout, and nothing else there")


def _add_settings_file(p: argparse.ArgumentParser, table: str) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help=f"read settings from the [{table}] table of this TOML or YAML file "
                        "(else $FEDCOORD_CONFIG); flags override $FEDCOORD_<KEY> variables, "
                        "which override the file")
    p.add_argument("--app", action="append", default=[], metavar="MODULE:ATTRIBUTE",
                   help="load this app (models, data sources) before starting; repeatable")


def build_parser() -> FedctlParser:
    parser = FedctlParser(prog="fedctl", description="fedcoord command line", root=True)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log more (also accepted after the command)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    coord = sub.add_parser("coordinator", help="run the coordinator").add_subparsers(
        dest="action", required=True)
    serve = coord.add_parser("serve", help="start the gRPC coordinator")
    _add_settings_file(serve, "coordinator")
    serve.add_argument("--db", default="sqlite:///fedcoord.db", metavar="URL",
                       help="database URL: sqlite:///PATH or postgresql://...")
    serve.add_argument("--store", type=Path, default=Path("fedcoord-store"), metavar="DIR",
                       help="directory for model files")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind")
    serve.add_argument("--port", type=int, default=7070, help="0 picks a free port")
    serve.add_argument("--port-file", type=Path, metavar="FILE", help="write the bound port to this file")
    serve.add_argument("--max-chunk-bytes", type=int, default=1 << 20, metavar="BYTES",
                       help="largest upload message accepted (bytes)")
    serve.add_argument("--upload-idle-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="seconds an upload may stay silent before it is dropped")
    serve.add_argument("--retry-after-max", type=float, default=5.0, metavar="SECONDS",
                       help="the longest \"come back after\" a device is told (no task for it, "
                            "its round full or its update in); shorter wakes devices sooner "
                            "for more check-ins")
    serve.add_argument("--checkin-pace", type=float, default=200.0, metavar="PER_SECOND",
                       help="pace steering: the most \"come back after\" returns promised a "
                            "second; a larger population waits about population / pace "
                            "(at most 60 s), and a DP task's selection window must last "
                            "min(population / pace, 60 s); 0 turns it off")
    serve.add_argument("--tls", type=Path, metavar="DIR",
                       help="serve TLS with DIR/server.crt and DIR/server.key "
                            "(see `fedctl certs init`)")
    serve.add_argument("--client-ca", type=Path, metavar="FILE",
                       help="mutual TLS: every client must present a certificate signed by "
                            "this CA")
    serve.add_argument("--enrollment", choices=["open", "token", "allow-list"], default="open",
                       help="how devices enroll their keys: any key (open), with "
                            "an enrollment token (`fedctl devices enroll`), or listed in "
                            "--allow-list")
    serve.add_argument("--allow-list", type=Path, metavar="FILE",
                       help="allow-list policy: one Ed25519 public key (hex) or device id per "
                            "line")
    serve.add_argument("--attestation-hook", metavar="MODULE:FUNCTION",
                       help="called with every new enrollment's attestation; returns True "
                            "to accept (coordinator.security.devices)")
    serve.add_argument("--admin-token-file", type=Path, metavar="FILE",
                       help="the first admin token: registered from FILE if it exists, else "
                            "created and written there (0600), when no admin token exists")
    serve.add_argument("--rate-limit", action="append", default=[], metavar="NAME=RATE/BURST",
                       help="device-checkin, peer-checkin or peer-enroll (per second / "
                            "burst); repeatable (defaults: " + DEFAULT_RATE_LIMITS + ")")
    serve.add_argument("--no-device-auth", action="store_true",
                       help="take check-ins without keys or proofs (loopback only; to measure "
                            "what device authentication costs, never to serve devices)")
    serve.add_argument("--max-streams-per-peer", type=int, default=64, metavar="N",
                       help="uploads and downloads in flight from one address")
    serve.add_argument("--oidc-issuer", metavar="URL", help="accept OIDC JWTs of this issuer (with "
                                             "--oidc-audience and --oidc-jwks)")
    serve.add_argument("--oidc-audience", metavar="AUDIENCE", help="the audience OIDC JWTs must name")
    serve.add_argument("--oidc-jwks", type=Path, metavar="FILE", help="the issuer's JWKS")
    serve.add_argument("--oidc-role-claim", default="fedcoord_role", metavar="CLAIM",
                       help="the JWT claim that holds the role")
    serve.add_argument("--insecure", action="store_true",
                       help="allow plaintext on a non-loopback --host (trusted networks only)")
    serve.add_argument("--events", action="append", default=[], metavar="URL",
                       help="also send every device and round event to URL: "
                            "kafka://BROKER[,BROKER...]/TOPIC; repeatable")
    serve.add_argument("--http-port", type=int, metavar="PORT",
                       help="also serve HTTP on this port, same --host: /healthz, /readyz, "
                            "/metrics (Prometheus); 0 picks a free port; off without it")
    serve.add_argument("--replica", action="store_true",
                       help="one replica of several coordinators on one database (and one "
                            "--store folder): stand by until this one holds the leader lease, "
                            "then run the rounds; a standby serves admin reads and refuses "
                            "devices with UNAVAILABLE (give agents every address)")
    add_lease_ttl(serve, help_prefix="--replica: ")
    serve.add_argument("--advertise", metavar="HOST:PORT",
                       help="--replica: the address a standby names for this replica when it "
                            "leads (default: --host and the bound port)")
    serve.add_argument("--aggregator", action="append", default=[], metavar="HOST:PORT",
                       help="an aggregator shard (fedctl aggregator serve) that takes the "
                            "uploads of a share of each round's devices, as devices reach it; "
                            "repeatable or comma-separated, in the shards' --index order")
    serve.add_argument("--shard-key-file", type=Path, metavar="FILE",
                       help="--aggregator: the key the shards were started with (fedctl "
                            "aggregator keygen)")
    serve.add_argument("--shard-ca", type=Path, metavar="FILE",
                       help="--aggregator: the CA the shards' TLS certificates are checked "
                            "against (default: plaintext, loopback shards only)")
    serve.add_argument("--log-format", choices=["text", "json"], default="text",
                       help="log lines as text, or as JSON objects (time, level, logger, "
                            "message; task, round, stage when known)")
    serve.set_defaults(func=cmd_serve, settings_table="coordinator")
    parser.settings_parsers["coordinator"] = serve

    agent = sub.add_parser("agent", help="run device agents").add_subparsers(
        dest="action", required=True)
    run = agent.add_parser("run", help="run one (or --devices M) devices")
    _add_settings_file(run, "agent")
    _add_coordinator(run, several=True)
    run.add_argument("--name", "--device-id", dest="name", default="device",
                     help="names the devices (NAME or NAME-i) and their key files; device ids "
                          "derive from the keys")
    run.add_argument("--state-dir", type=Path, metavar="DIR",
                     help="where device keys live (default $FEDCOORD_AGENT_STATE or "
                          "~/.local/state/fedcoord/agent)")
    run.add_argument("--enrollment-token", metavar="TOKEN",
                     help="the coordinator's enrollment token (else $FEDCOORD_ENROLLMENT_TOKEN)")
    run.add_argument("--attestation", type=Path, metavar="FILE",
                     help="an attestation blob sent at enrollment")
    run.add_argument("--data", metavar="SPEC",
                     help="required (unless --flower-client): synthetic:alpha=1,beta=1,"
                          "shard=K/N | digits:shard=K/N,dirichlet=0.5")
    run.add_argument("--flower-client", metavar="MODULE:ATTRIBUTE",
                     help="train with a Flower client instead: a NumPyClient instance, or a "
                          "client_fn(context) returning one (needs fedcoord[flower])")
    run.add_argument("--flower-node-config", default="", metavar="KEY=VALUE ...",
                     help="the Flower Context's node_config (partition-id grows by one per "
                          "device with --devices M)")
    run.add_argument("--devices", type=int, default=1, metavar="M", help="virtual devices in this process")
    run.add_argument("--task", metavar="TASK_ID", help="only take part in this task; exit when it ends")
    run.add_argument("--population", default="default",
                     help="the population whose tasks the devices serve")
    run.add_argument("--stratum", metavar="NAME",
                     help="the stratum every device declares at check-in (experiments with "
                          "per-stratum splits; 1-32 letters, digits, _ or -)")
    run.add_argument("--not-charging", action="store_true", help="device is not charging")
    run.add_argument("--metered", action="store_true", help="device is on a metered network")
    run.add_argument("--busy", action="store_true", help="device is not idle")
    run.add_argument("--exit-when-idle", action="store_true",
                     help="exit when the coordinator has no task for this device")
    run.add_argument("--give-up-after", type=float, default=120.0, metavar="SECONDS",
                     help="seconds of unreachable coordinator before exiting")
    run.set_defaults(func=cmd_agent_run, settings_table="agent")
    parser.settings_parsers["agent"] = run

    task = sub.add_parser("task", help="launch and follow tasks").add_subparsers(
        dest="action", required=True)
    launch = task.add_parser("launch", help="create a task from a YAML file")
    launch.add_argument("file", type=Path, help="the task file")
    launch.add_argument("--source-task", metavar="TASK_ID",
                        help="kind evaluate: evaluate this training task's model versions "
                             "(sets evaluate.source_task)")
    _add_coordinator(launch)
    _add_json(launch, "the created task")
    launch.set_defaults(func=cmd_task_launch)
    for name, func, helptext, json_help in (
        ("status", cmd_task_status, "a task's state and rounds: every round metric, "
                                    "timestamps and durations",
         'the task and its rounds ({"task": ..., "rounds": [...]})'),
        ("watch", cmd_task_watch, "live progress of a task's rounds; exits 0 when the task "
                                  "completes or stops at its privacy budget, 1 otherwise",
         'JSON lines: {"event": "task"|"round"|"end", ...} as the task changes'),
        ("cancel", cmd_task_cancel, "cancel a task", None),
    ):
        p = task.add_parser(name, help=helptext, description=helptext)
        p.add_argument("task_id")
        _add_coordinator(p)
        if json_help is not None:
            _add_json(p, json_help)
        p.set_defaults(func=func)
    ls = task.add_parser("list", help="all tasks")
    _add_coordinator(ls)
    _add_json(ls, 'every task ({"tasks": [...]})')
    ls.set_defaults(func=cmd_task_list)

    events_help = ("a task's events (device and round transitions), oldest first; with "
                   "--follow, new ones as they happen until the task ends (then exit 0)")
    events = sub.add_parser("events", help=events_help, description=events_help)
    events.add_argument("--task", required=True, metavar="TASK_ID", help="the task")
    events.add_argument("--after", type=int, default=0, metavar="SEQ",
                        help="only the events after this seq")
    events.add_argument("--follow", action="store_true",
                        help="keep printing new events until the task is completed, failed, "
                             "cancelled or out of privacy budget")
    _add_coordinator(events)
    _add_json(events, "JSON lines, one event record each (the Kafka sink's layout)")
    events.set_defaults(func=cmd_events)

    model = sub.add_parser("model", help="models").add_subparsers(dest="action", required=True)
    pull = model.add_parser("pull", help="download a model version as safetensors")
    pull.add_argument("task_id")
    pull.add_argument("--version", type=int, default=0, help="model version; 0: the latest")
    pull.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                      help="where to write it (missing folders are created)")
    _add_coordinator(pull)
    _add_json(pull, "what was written (path, task_id, version, size_bytes, sha256)")
    pull.set_defaults(func=cmd_model_pull)

    demo = sub.add_parser("demo", help="embedded coordinator + device agents on digits")
    demo.add_argument("--devices", type=int, default=20, help="virtual devices")
    demo.add_argument("--rounds", type=int, default=5, help="rounds to train")
    demo.add_argument("--processes", type=int, default=4, help="agent processes to spread over")
    demo.add_argument("--json", action="store_true", help="print only the final JSON line")
    demo.add_argument("--seed", type=int, default=0, help="seed of the task and the data split")
    demo.add_argument("--secagg", action="store_true",
                      help="secure aggregation: the coordinator sees only the sum of updates")
    demo.add_argument("--dp", action="store_true",
                      help="central differential privacy with secure aggregation (DP-FedAvg: "
                           "clipped updates, Gaussian noise on the unmasked sum); prints epsilon")
    demo.set_defaults(func=cmd_demo)

    register_simulate(sub)
    register_tune(sub)
    register_certs(sub)
    register_cluster(sub)
    register_aggregator(sub)
    register_security(sub, _add_coordinator, _admin)
    register_experiment(sub, _add_coordinator, _admin)

    completion = sub.add_parser("completion", help="print a shell completion script",
                                description="print a shell completion script, e.g. "
                                            "`eval \"$(fedctl completion bash)\"` in ~/.bashrc, "
                                            "or `fedctl completion zsh > ~/.zfunc/_fedctl`")
    completion.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    completion.set_defaults(func=cmd_completion)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from fedctl.logs import LogFormat, configure

    configure(verbose=args.verbose)
    if not args.verbose:
        # gRPC's C core logs a failed TLS handshake at INFO on stderr, beside the one-line
        # error fedctl prints; it must be set before grpc is first imported.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from fedctl.errors import CliError

    try:
        table = getattr(args, "settings_table", None)
        if table is not None:
            args = _with_settings(parser, table, argv, args)
        if getattr(args, "log_format", "text") != "text":
            configure(verbose=args.verbose, log_format=LogFormat(args.log_format))
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except CliError as exc:
        print(f"fedctl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _with_settings(parser: FedctlParser, table: str, argv: list[str],
                   args: argparse.Namespace) -> argparse.Namespace:
    """``args`` again, with the file's and the environment's values as the defaults of the
    command's flags: flags > $FEDCOORD_<KEY> > the config file > built-in defaults."""
    from fedctl import config

    defaults, settings = config.resolve(table, parser.settings_parsers, args.config)
    lists = {s.action.dest for s in settings.values() if s.is_list}
    command = parser.settings_parsers[table]
    command.set_defaults(**{k: v for k, v in defaults.items() if k not in lists})
    args = parser.parse_args(argv)
    config.apply(args, defaults, settings)
    return args


def _load_apps(apps: list[str]) -> None:
    """Loads every ``--app MODULE:ATTRIBUTE`` before anything starts; a bad one is a usage
    error (exit 2) with the loader's reason."""
    if not apps:
        return
    from core.apps import load_app
    from core.errors import CoreError
    from fedctl.errors import CliError

    for text in apps:
        try:
            load_app(text)
        except CoreError as exc:
            raise CliError(str(exc), exit_code=2) from None


def _shard_settings(args: argparse.Namespace) -> ShardSettings | None:
    """``coordinator serve``'s aggregator shards, or None without ``--aggregator``."""
    from coordinator.settings import ShardSettings
    from core.shards import parse_key
    from fedctl.errors import CliError

    addresses = tuple(a.strip() for item in args.aggregator for a in item.split(",")
                      if a.strip())
    if not addresses:
        if args.shard_key_file is not None or args.shard_ca is not None:
            raise CliError("--shard-key-file and --shard-ca are settings of --aggregator",
                           exit_code=2)
        return None
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CliError(f"--aggregator {address!r}: expected HOST:PORT", exit_code=2)
    if len(set(addresses)) != len(addresses):
        raise CliError("--aggregator: an address is given twice", exit_code=2)
    if args.shard_key_file is None:
        raise CliError("--aggregator needs --shard-key-file (the key the shards were "
                       "started with)", exit_code=2)
    try:
        key = parse_key(args.shard_key_file.read_bytes())
    except OSError as exc:
        raise CliError(f"--shard-key-file {args.shard_key_file}: {exc.strerror or exc}",
                       exit_code=2) from None
    except ValueError as exc:
        raise CliError(f"--shard-key-file {args.shard_key_file}: {exc}", exit_code=2) from None
    if args.shard_ca is not None and not args.shard_ca.is_file():
        raise CliError(f"--shard-ca {args.shard_ca}: no such file", exit_code=2)
    if args.shard_ca is None and not args.insecure:
        from coordinator.transport.tls import is_loopback

        remote = [a for a in addresses if not is_loopback(a.rpartition(":")[0].strip("[]"))]
        if remote:
            raise CliError(f"--aggregator {remote[0]}: a shard off this machine needs TLS "
                           "(--shard-ca; the shards serve with --tls-dir): plaintext would "
                           "carry the sums and the shard key's token (--insecure allows it "
                           "on a trusted network)", exit_code=2)
    return ShardSettings(addresses=addresses, key=key, tls_ca=args.shard_ca)


# -- commands -----------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from coordinator.observability.sinks import SinkConfigError
    from coordinator.settings import CoordinatorSettings, ReplicaSettings
    from coordinator.storage.errors import StorageError
    from core.tls import TlsError
    from fedctl.errors import CliError, database_hint

    retry_min_s = CoordinatorSettings.retry_after_min_s
    if not retry_min_s <= args.retry_after_max <= 3600:
        raise CliError(f"--retry-after-max {args.retry_after_max:g}: expected seconds from "
                       f"{retry_min_s:g} to 3600", exit_code=2)
    if not (0 <= args.checkin_pace <= 1_000_000):  # also refuses nan
        raise CliError(f"--checkin-pace {args.checkin_pace:g}: expected check-ins per second "
                       "from 0 (off) to 1000000", exit_code=2)
    if not args.replica and (args.advertise is not None or args.lease_ttl != LEASE_TTL_S):
        raise CliError("--lease-ttl and --advertise are settings of --replica", exit_code=2)
    check_lease_ttl(args.lease_ttl)
    replica = (ReplicaSettings(lease_ttl_s=args.lease_ttl, advertise_address=args.advertise)
               if args.replica else None)
    shards = _shard_settings(args)
    _load_apps(args.app)
    config = CoordinatorSettings(db_url=args.db, store_dir=args.store, host=args.host,
                                 port=args.port, max_chunk_bytes=args.max_chunk_bytes,
                                 upload_idle_timeout_s=args.upload_idle_timeout,
                                 tls_dir=args.tls, client_ca=args.client_ca,
                                 insecure=args.insecure, security=_security_settings(args),
                                 event_sinks=tuple(args.events), http_port=args.http_port,
                                 retry_after_max_s=args.retry_after_max,
                                 checkin_pace_per_s=args.checkin_pace, replica=replica,
                                 shards=shards)
    # the coordinator's imports (torch) once flags are good
    from coordinator.app import LeadershipLost, serve

    try:
        asyncio.run(serve(config, args.port_file, admin_token_file=args.admin_token_file))
    except LeadershipLost as exc:  # exit status 3: elected, but could not take over
        raise CliError(f"coordinator: {exc}", exit_code=exc.exit_code) from None
    except StorageError as exc:
        hint = database_hint(args.db) if isinstance(exc.__cause__, ImportError) else ""
        raise CliError(f"coordinator: {exc}{hint}") from None
    except (OSError, TlsError, SinkConfigError) as exc:
        raise CliError(f"coordinator: {exc}") from None
    return 0


def _security_settings(args: argparse.Namespace) -> SecuritySettings:
    from dataclasses import replace

    from coordinator.settings import EnrollmentPolicy, OidcSettings, SecuritySettings
    from core.security.ratelimit import Rate
    from fedctl.errors import CliError

    settings = SecuritySettings(enrollment=EnrollmentPolicy(args.enrollment),
                                allow_list=args.allow_list,
                                attestation_hook=args.attestation_hook,
                                max_streams_per_peer=args.max_streams_per_peer,
                                authenticate_devices=not args.no_device_auth)
    if settings.enrollment is EnrollmentPolicy.ALLOW_LIST and args.allow_list is None:
        raise CliError("--enrollment allow-list needs --allow-list FILE", exit_code=2)
    fields = {"device-checkin": "checkin_per_device", "peer-checkin": "checkin_per_peer",
              "peer-enroll": "enroll_per_peer"}
    for item in args.rate_limit:
        name, _, value = item.partition("=")
        per_s, _, burst = value.partition("/")
        try:
            rate = Rate(per_second=float(per_s), burst=float(burst))
        except ValueError:
            rate = None
        if name not in fields or rate is None:
            raise CliError(f"--rate-limit {item[:40]!r}: expected NAME=RATE/BURST with NAME one "
                           f"of {', '.join(fields)} (e.g. device-checkin=5/20)", exit_code=2)
        settings = replace(settings, **{fields[name]: rate})  # type: ignore[arg-type]
    oidc = (args.oidc_issuer, args.oidc_audience, args.oidc_jwks)
    if any(oidc):
        if not all(oidc):
            raise CliError("OIDC needs --oidc-issuer, --oidc-audience and --oidc-jwks",
                           exit_code=2)
        settings = replace(settings, oidc=OidcSettings(args.oidc_issuer, args.oidc_audience,
                                                       args.oidc_jwks, args.oidc_role_claim))
    return settings


def cmd_agent_run(args: argparse.Namespace) -> int:
    import threading

    from core.errors import CoreError
    from core.experiments.assignment import stratum_problem
    from core.security.identity import KeyFileError
    from core.types import DeviceAttributes
    from device_agent.app import (
        AgentConfig,
        default_state_dir,
        exit_status,
        install_signal_handlers,
        run_agent,
    )
    from device_agent.flower import FlowerClientError
    from fedctl.errors import CliError, cannot_reach

    _load_apps(args.app)
    if args.data is None and args.flower_client is None:
        raise CliError("agent run needs --data (or `data` in the config file's [agent] table, "
                       "or $FEDCOORD_DATA), or --flower-client", exit_code=2)
    if args.data is not None and args.flower_client is not None:
        raise CliError("--data and --flower-client exclude each other: a Flower client loads "
                       "its own data", exit_code=2)
    if args.flower_node_config and args.flower_client is None:
        raise CliError("--flower-node-config needs --flower-client", exit_code=2)
    if args.devices < 1:
        raise CliError("--devices must be at least 1", exit_code=2)
    if args.stratum is not None and stratum_problem(args.stratum) is not None:
        raise CliError(f"--stratum {stratum_problem(args.stratum)}", exit_code=2)
    attestation = b""
    if args.attestation is not None:
        try:
            attestation = args.attestation.read_bytes()
        except OSError as exc:
            raise CliError(f"--attestation {args.attestation}: {exc.strerror}") from None
    tls = _client_tls(args)
    config = AgentConfig(
        coordinator=args.coordinator, name=args.name, data=args.data,
        state_dir=args.state_dir or default_state_dir(),
        enrollment_token=args.enrollment_token or "", attestation=attestation,
        devices=args.devices, task_id=args.task,
        attributes=DeviceAttributes(charging=not args.not_charging, unmetered=not args.metered,
                                    idle=not args.busy, population=args.population),
        exit_when_idle=args.exit_when_idle, give_up_after_s=args.give_up_after,
        tls=tls, flower_client=args.flower_client,
        flower_node_config=args.flower_node_config, stratum=args.stratum,
    )
    stop = threading.Event()
    install_signal_handlers(stop)
    # Flushed: a supervisor or test reading a pipe sees the agent start at once.
    print(f"fedcoord agent {args.name}: {args.devices} device(s) for coordinator "
          f"{args.coordinator} ({'TLS' if tls is not None else 'plaintext'})", flush=True)
    try:
        stats = run_agent(config, stop)
    except (KeyFileError, OSError) as exc:
        raise CliError(f"--state-dir {config.state_dir}: {exc}") from None
    except FlowerClientError as exc:
        raise CliError(str(exc), exit_code=2) from None
    except (CoreError, ValueError) as exc:
        raise CliError(f"--data {args.data!r}: {exc}") from None
    accepted = sum(s.updates_accepted for s in stats)
    print(f"agent {args.name}: {len(stats)} device(s), {accepted} updates accepted",
          file=sys.stderr)
    status = exit_status(stats)
    if status != 0:
        gave_up = [s.finished_reason for s in stats if s.gave_up]
        failures = [s.failure for s in stats if s.failure]
        why = (cannot_reach(args.coordinator, gave_up[0], tls=tls is not None,
                            client_cert=bool(tls is not None and tls.cert_chain_pem))
               if gave_up else f"every device failed: {failures[0] if failures else '?'}")
        print(f"fedctl: error: agent {args.name}: {why}", file=sys.stderr)
    return status


def _client_tls(args: argparse.Namespace) -> ClientTls | None:
    """The TLS files of ``--ca``/``--cert``/``--key``, read and checked; None: plaintext."""
    from core.tls import TlsError, load_client_tls
    from fedctl.errors import CliError

    if args.ca is None:
        if args.cert is not None or args.key is not None:
            raise CliError("--cert and --key need --ca FILE (the CA of the coordinator)")
        return None
    try:
        return load_client_tls(args.ca, args.cert, args.key)
    except TlsError as exc:
        raise CliError(str(exc)) from None


def _admin(args: argparse.Namespace) -> AdminClient:
    from fedctl.admin import AdminClient
    from fedctl.credentials import resolve_token

    return AdminClient(args.coordinator, tls=_client_tls(args), token=resolve_token(args.token))


def cmd_task_launch(args: argparse.Namespace) -> int:
    from fedctl.admin import launch_task, load_launch_file, print_launched

    spec = load_launch_file(args.file, source_task=args.source_task)
    with _admin(args) as client:
        task = launch_task(client, spec, source=args.file)
    print_launched(task, as_json=args.json)
    return 0


def cmd_task_status(args: argparse.Namespace) -> int:
    with _admin(args) as client:
        task, rounds = _guard(lambda: (client.get_task(args.task_id),
                                       client.list_rounds(args.task_id)))
    evaluation = task.spec.kind == "evaluate"
    if args.json:
        from fedctl.output import print_json, status_document

        document = status_document(task, rounds)
        if evaluation:
            document["evaluation"] = _evaluation_results(rounds)
        print_json(document)
        return 0
    from fedctl.output import table_console
    from fedctl.watch import status_table

    console = table_console()
    if not evaluation:
        console.print(status_table(task, rounds))
        return 0
    # The results get a table of their own; the rounds' table keeps the other metrics.
    console.print(status_table(task, [_without_results(r) for r in rounds]))
    console.print(_evaluation_table(rounds))
    return 0


def _without_results(r: admin_pb2.Round) -> admin_pb2.Round:
    from core.evaluation.summary import PREFIX

    out = type(r)()
    out.CopyFrom(r)
    for name in [n for n in out.metrics if n.startswith(PREFIX + ".")]:
        del out.metrics[name]
    return out


def _evaluation_results(rounds: Sequence[admin_pb2.Round]) -> dict[str, Any]:
    """``{round: {version: {metric or "": {stat: value}}}}`` of the committed rounds."""
    from core.evaluation import results_table

    return {str(r.round_number): {str(v): stats for v, stats in
                                  results_table(dict(r.metrics)).items()}
            for r in rounds if r.state == "committed"}


_SPARK = " ▁▂▃▄▅▆▇█"


def _evaluation_table(rounds: Sequence[admin_pb2.Round]) -> Table:
    """Per committed round, model version and metric: devices and examples, the
    example-weighted and device-weighted means +- their standard errors, the quantiles of
    the examples' values (KLL sketches, clear reports only) with their rank-error bound,
    the quantiles and the histogram of device values (a sparkline); under secure
    aggregation the bound on each mean's quantization error."""
    from rich.table import Table

    from core.evaluation import results_table

    table = Table(title="evaluation results (mean +- standard error; devices as the "
                        "sampled units)")
    for col in ("round", "version", "metric", "devices", "examples", "mean (examples)",
                "mean (devices)", "quantiles of examples (rank error)",
                "quantiles of device values", "histogram of device values"):
        table.add_column(col, overflow="fold")

    def pm(stats: dict[str, float], mean: str, se: str) -> str:
        if mean not in stats:
            return "-"
        text = f"{stats[mean]:.4g}"
        if se in stats:
            text += f" ± {stats[se]:.2g}"
        if f"{mean}_bound" in stats:
            text += f" (quantization ≤ {stats[f'{mean}_bound']:.1g})"
        return text

    for r in rounds:
        if r.state != "committed":
            continue
        for version, metrics in sorted(results_table(dict(r.metrics)).items()):
            head = metrics.get("", {})
            for name, stats in metrics.items():
                if not name:
                    continue
                qs = sorted(((k, v) for k, v in stats.items() if k.startswith("q")),
                            key=lambda kv: float(kv[0][1:]))
                example_qs = sorted(
                    ((k.removeprefix("example_"), v) for k, v in stats.items()
                     if k.startswith("example_q")), key=lambda kv: float(kv[0][1:]))
                examples = "  ".join(f"{k[1:]}%: {v:.3g}" for k, v in example_qs) or "-"
                if example_qs and "example_rank_error" in stats:
                    examples += f" (±{stats['example_rank_error']:.1%})"
                bins = [stats[f"bin{j}"] for j in range(len(stats))
                        if f"bin{j}" in stats]
                top = max(bins, default=0.0)
                spark = "".join(_SPARK[min(8, max(0, round(8 * b / top)))] if top > 0
                                else " " for b in bins)
                table.add_row(str(r.round_number), str(version), name,
                              f"{head.get('devices', math.nan):.4g}",
                              f"{head.get('examples', math.nan):.6g}",
                              pm(stats, "mean", "se"), pm(stats, "device_mean", "device_se"),
                              examples,
                              "  ".join(f"{k[1:]}%: {v:.3g}" for k, v in qs) or "-",
                              spark or "-")
    return table


def cmd_task_watch(args: argparse.Namespace) -> int:
    try:
        with _admin(args) as client:
            if args.json:
                from fedctl.watch import watch_json

                task = _guard(lambda: watch_json(client, args.task_id, out=sys.stdout))
            else:
                from rich.console import Console

                from fedctl.watch import watch

                task = _guard(lambda: watch(client, args.task_id, console=Console()))
    except KeyboardInterrupt:
        print(f"\nstopped watching; task {args.task_id} keeps running on the coordinator "
              f"(`fedctl task status {args.task_id}` shows it, `fedctl task cancel "
              f"{args.task_id}` stops it)", file=sys.stderr)
        return 130
    # stderr under --json, where stdout holds only JSON lines.
    print(f"task {task.task_id}: {task.state} after {task.rounds_committed} rounds"
          + (f" ({task.reason})" if task.reason else ""),
          file=sys.stderr if args.json else sys.stdout)
    # A DP task that stops at its budget ended as designed, with every released model
    # within it.
    return 0 if task.state in ("completed", "budget_exhausted") else 1


def cmd_task_list(args: argparse.Namespace) -> int:
    with _admin(args) as client:
        tasks = _guard(client.list_tasks)
    if args.json:
        from fedctl.output import print_json, task_document

        print_json({"tasks": [task_document(t) for t in tasks]})
        return 0
    from rich.table import Table

    from fedctl.output import table_console

    table = Table(title="tasks")
    for col in ("task_id", "name", "state", "rounds", "model version", "created"):
        table.add_column(col, overflow="fold")
    for t in tasks:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t.created_unix_ms / 1000))
        table.add_row(t.task_id, t.spec.name, t.state, f"{t.rounds_committed}/{t.spec.rounds}",
                      str(t.model_version), created if t.created_unix_ms else "-")
    table_console().print(table)
    return 0


def cmd_task_cancel(args: argparse.Namespace) -> int:
    with _admin(args) as client:
        task = _guard(lambda: client.cancel_task(args.task_id))
    print(f"task {task.task_id}: {task.state}")
    return 0


#: Seconds between ``fedctl events --follow``'s polls.
FOLLOW_POLL_S = 0.5


def cmd_events(args: argparse.Namespace) -> int:
    from fedctl.admin import event_record

    after = args.after
    try:
        with _admin(args) as client:
            while True:
                resp = _guard(functools.partial(client.list_events, args.task, after))
                for msg in resp.events:
                    record = event_record(msg)
                    print(json.dumps(record) if args.json else _event_line(record), flush=True)
                    after = msg.seq
                if resp.events:
                    continue  # a page: ask until none are left
                # None left after reading a final state: every event has been printed.
                if not args.follow or resp.task_final:
                    return 0
                time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        print(f"\nstopped following task {args.task} after event {after}", file=sys.stderr)
        return 130


def _event_line(e: dict[str, Any]) -> str:
    from fedctl.output import iso_utc

    parts = [f"{e['seq']:>5}", iso_utc(int(e["at"] * 1000)) or "-", f"{e['kind']:<24}"]
    labels = (("round", "round_number"), ("device", "device_id"), ("reason", "reason"))
    parts += [f"{label}={e[name]}" for label, name in labels if e[name]]
    parts += [f"{k}={v:g}" for k, v in sorted(e["values"].items())]
    if e["detail"]:
        parts.append(repr(e["detail"]))
    return " ".join(parts).rstrip()


def cmd_model_pull(args: argparse.Namespace) -> int:
    from fedctl.errors import CliError

    out: Path = args.output
    if out.is_dir():
        raise CliError(f"-o {out} is a folder; give the file to write, e.g. "
                       f"{out / 'model.safetensors'}", exit_code=2)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"-o {out}: cannot create the folder {out.parent}: "
                       f"{exc.strerror or exc}") from None
    with _admin(args) as client:
        try:
            version, sha, size = _guard(
                lambda: client.pull_model(args.task_id, args.version, out))
        except OSError as exc:
            raise CliError(f"-o {out}: cannot write: {exc.strerror or exc}") from None
    if args.json:
        from fedctl.output import print_json

        print_json({"path": str(out), "task_id": args.task_id, "version": version,
                    "size_bytes": size, "sha256": sha})
    else:
        print(f"wrote {out} (task {args.task_id} model v{version}, {size} bytes, "
              f"sha256 {sha[:16]}...)")
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fedctl.demo import run_demo

    return run_demo(devices=args.devices, rounds=args.rounds, processes=args.processes,
                    json_only=args.json, seed=args.seed, secagg=args.secagg,
                    dp=args.dp)


def _guard(call: Callable[[], T]) -> T:
    from fedctl.admin import AdminError
    from fedctl.errors import CliError

    try:
        return call()
    except AdminError as exc:
        raise CliError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
