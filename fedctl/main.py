"""fedctl: the command line of fedcoord. Heavy imports happen inside commands, so
``fedctl --help`` is instant."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from fedctl.certs import register as register_certs
from fedctl.security import register as register_security
from fedctl.simulate import register as register_simulate

if TYPE_CHECKING:
    from coordinator.settings import SecuritySettings
    from core.tls import ClientTls
    from fedctl.admin import AdminClient

T = TypeVar("T")

DEFAULT_COORDINATOR = "127.0.0.1:7070"


def _add_coordinator(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default=DEFAULT_COORDINATOR,
                   help=f"coordinator HOST:PORT (default {DEFAULT_COORDINATOR})")
    p.add_argument("--ca", type=Path, metavar="FILE",
                   help="TLS: the CA certificate the coordinator's certificate must chain to "
                        "(without it: plaintext)")
    p.add_argument("--cert", type=Path, metavar="FILE",
                   help="mutual TLS: this client's certificate (with --key and --ca)")
    p.add_argument("--key", type=Path, metavar="FILE", help="mutual TLS: this client's key")
    p.add_argument("--token", metavar="TOKEN",
                   help="admin API token (else $FEDCOORD_TOKEN, else the token file "
                        "~/.config/fedcoord/token)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedctl", description="fedcoord command line")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    coord = sub.add_parser("coordinator", help="run the coordinator").add_subparsers(
        dest="action", required=True)
    serve = coord.add_parser("serve", help="start the gRPC coordinator")
    serve.add_argument("--db", default="sqlite:///fedcoord.db",
                       help="database URL: sqlite:///PATH or postgresql://...")
    serve.add_argument("--store", default="fedcoord-store", help="directory for model files")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7070, help="0 picks a free port")
    serve.add_argument("--port-file", type=Path, help="write the bound port to this file")
    serve.add_argument("--max-chunk-bytes", type=int, default=1 << 20,
                       help="largest upload message accepted (bytes)")
    serve.add_argument("--upload-idle-timeout", type=float, default=30.0,
                       help="seconds an upload may stay silent before it is dropped")
    serve.add_argument("--tls", type=Path, metavar="DIR",
                       help="serve TLS with DIR/server.crt and DIR/server.key "
                            "(see `fedctl certs init`)")
    serve.add_argument("--client-ca", type=Path, metavar="FILE",
                       help="mutual TLS: every client must present a certificate signed by "
                            "this CA")
    serve.add_argument("--enrollment", choices=["open", "token", "allow-list"], default="open",
                       help="how devices enroll their keys: any key (open, the default), with "
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
                       help="device-checkin, peer-checkin or peer-enroll, e.g. "
                            "device-checkin=5/20 (per second / burst); repeatable")
    serve.add_argument("--no-device-auth", action="store_true",
                       help="take check-ins without keys or proofs (loopback only; to measure "
                            "what device authentication costs, never to serve devices)")
    serve.add_argument("--max-streams-per-peer", type=int, default=64,
                       help="uploads and downloads in flight from one address")
    serve.add_argument("--oidc-issuer", help="accept OIDC JWTs of this issuer (with "
                                             "--oidc-audience and --oidc-jwks)")
    serve.add_argument("--oidc-audience")
    serve.add_argument("--oidc-jwks", type=Path, metavar="FILE", help="the issuer's JWKS")
    serve.add_argument("--oidc-role-claim", default="fedcoord_role")
    serve.add_argument("--insecure", action="store_true",
                       help="allow plaintext on a non-loopback --host (trusted networks only)")
    serve.set_defaults(func=cmd_serve)

    agent = sub.add_parser("agent", help="run device agents").add_subparsers(
        dest="action", required=True)
    run = agent.add_parser("run", help="run one (or --devices M) devices")
    _add_coordinator(run)
    run.add_argument("--name", "--device-id", dest="name", default="device",
                     help="names the devices (NAME or NAME-i) and their key files; device ids "
                          "derive from the keys")
    run.add_argument("--state-dir", type=Path,
                     help="where device keys live (default $FEDCOORD_AGENT_STATE or "
                          "~/.local/state/fedcoord/agent)")
    run.add_argument("--enrollment-token", default="",
                     help="the coordinator's enrollment token (else $FEDCOORD_ENROLLMENT_TOKEN)")
    run.add_argument("--attestation", type=Path, metavar="FILE",
                     help="an attestation blob sent at enrollment")
    run.add_argument("--data", required=True,
                     help="synthetic:alpha=1,beta=1,shard=K/N | digits:shard=K/N,dirichlet=0.5")
    run.add_argument("--devices", type=int, default=1, help="virtual devices in this process")
    run.add_argument("--task", help="only take part in this task; exit when it ends")
    run.add_argument("--population", default="default")
    run.add_argument("--not-charging", action="store_true")
    run.add_argument("--metered", action="store_true")
    run.add_argument("--busy", action="store_true", help="device is not idle")
    run.add_argument("--exit-when-idle", action="store_true",
                     help="exit when the coordinator has no task for this device")
    run.add_argument("--give-up-after", type=float, default=120.0,
                     help="seconds of unreachable coordinator before exiting")
    run.set_defaults(func=cmd_agent_run)

    task = sub.add_parser("task", help="launch and follow tasks").add_subparsers(
        dest="action", required=True)
    launch = task.add_parser("launch", help="create a task from a YAML file")
    launch.add_argument("file", type=Path)
    _add_coordinator(launch)
    launch.set_defaults(func=cmd_task_launch)
    for name, func, helptext in (
        ("status", cmd_task_status, "a task's state and rounds"),
        ("watch", cmd_task_watch, "live progress of a task's rounds; exits 0 when the task "
                                  "completes or stops at its privacy budget, 1 otherwise"),
        ("cancel", cmd_task_cancel, "cancel a task"),
    ):
        p = task.add_parser(name, help=helptext)
        p.add_argument("task_id")
        _add_coordinator(p)
        p.set_defaults(func=func)
    ls = task.add_parser("list", help="all tasks")
    _add_coordinator(ls)
    ls.set_defaults(func=cmd_task_list)

    model = sub.add_parser("model", help="models").add_subparsers(dest="action", required=True)
    pull = model.add_parser("pull", help="download a model version as safetensors")
    pull.add_argument("task_id")
    pull.add_argument("--version", type=int, default=0, help="0 = latest (default)")
    pull.add_argument("-o", "--output", type=Path, required=True)
    _add_coordinator(pull)
    pull.set_defaults(func=cmd_model_pull)

    demo = sub.add_parser("demo", help="embedded coordinator + device agents on digits")
    demo.add_argument("--devices", type=int, default=20)
    demo.add_argument("--rounds", type=int, default=5)
    demo.add_argument("--processes", type=int, default=4, help="agent processes to spread over")
    demo.add_argument("--json", action="store_true", help="print only the final JSON line")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--secagg", action="store_true",
                      help="secure aggregation: the coordinator sees only the sum of updates")
    demo.add_argument("--dp", action="store_true",
                      help="central differential privacy with secure aggregation (DP-FedAvg: "
                           "clipped updates, Gaussian noise on the unmasked sum); prints epsilon")
    demo.set_defaults(func=cmd_demo)

    register_simulate(sub)
    register_certs(sub)
    register_security(sub, _add_coordinator, _admin)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # gRPC's C core logs a failed TLS handshake at INFO on stderr, beside the one-line
        # error fedctl prints; it must be set before grpc is first imported.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    func: Callable[[argparse.Namespace], int] = args.func
    from fedctl.errors import CliError

    try:
        return func(args)
    except CliError as exc:
        print(f"fedctl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


# -- commands -----------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from coordinator.app import serve
    from coordinator.settings import CoordinatorSettings
    from coordinator.storage.errors import StorageError
    from core.tls import TlsError
    from fedctl.errors import CliError

    config = CoordinatorSettings(db_url=args.db, store_dir=Path(args.store), host=args.host,
                                 port=args.port, max_chunk_bytes=args.max_chunk_bytes,
                                 upload_idle_timeout_s=args.upload_idle_timeout,
                                 tls_dir=args.tls, client_ca=args.client_ca,
                                 insecure=args.insecure, security=_security_settings(args))
    try:
        asyncio.run(serve(config, args.port_file, admin_token_file=args.admin_token_file))
    except (StorageError, OSError, TlsError) as exc:
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
    from core.types import DeviceAttributes
    from device_agent.app import AgentConfig, install_signal_handlers, run_agent
    from fedctl.errors import CliError

    if args.devices < 1:
        raise CliError("--devices must be at least 1")
    import os

    from core.security.identity import KeyFileError
    from device_agent.app import default_state_dir

    attestation = b""
    if args.attestation is not None:
        try:
            attestation = args.attestation.read_bytes()
        except OSError as exc:
            raise CliError(f"--attestation {args.attestation}: {exc.strerror}") from None
    config = AgentConfig(
        coordinator=args.coordinator, name=args.name, data=args.data,
        state_dir=args.state_dir or default_state_dir(),
        enrollment_token=args.enrollment_token or os.environ.get("FEDCOORD_ENROLLMENT_TOKEN", ""),
        attestation=attestation,
        devices=args.devices, task_id=args.task,
        attributes=DeviceAttributes(charging=not args.not_charging, unmetered=not args.metered,
                                    idle=not args.busy, population=args.population),
        exit_when_idle=args.exit_when_idle, give_up_after_s=args.give_up_after,
        tls=_client_tls(args),
    )
    stop = threading.Event()
    install_signal_handlers(stop)
    try:
        stats = run_agent(config, stop)
    except (KeyFileError, OSError) as exc:
        raise CliError(f"--state-dir {config.state_dir}: {exc}") from None
    except (CoreError, ValueError) as exc:
        raise CliError(f"--data {args.data!r}: {exc}") from None
    accepted = sum(s.updates_accepted for s in stats)
    print(f"agent {args.name}: {len(stats)} device(s), {accepted} updates accepted",
          file=sys.stderr)
    gave_up = [s.finished_reason for s in stats if s.gave_up]
    if gave_up:
        raise CliError(f"agent {args.name}: {gave_up[0]}")
    return 0


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
    from core.taskspec import TaskSpecError, load_task_file
    from fedctl.admin import AdminError
    from fedctl.errors import CliError

    try:
        spec = load_task_file(args.file)
    except TaskSpecError as exc:
        raise CliError(str(exc), exit_code=2) from None
    with _admin(args) as client:
        try:
            task = client.create_task(spec)
        except AdminError as exc:
            raise CliError(f"{args.file}: coordinator refused the task: {exc}") from None
    print(task.task_id)
    return 0


def cmd_task_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedctl.watch import status_table

    with _admin(args) as client:
        task, rounds = _guard(lambda: (client.get_task(args.task_id),
                                       client.list_rounds(args.task_id)))
    Console().print(status_table(task, rounds))
    return 0


def cmd_task_watch(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedctl.watch import watch

    with _admin(args) as client:
        task = _guard(lambda: watch(client, args.task_id, console=Console()))
    print(f"task {task.task_id}: {task.state} after {task.rounds_committed} rounds"
          + (f" ({task.reason})" if task.reason else ""))
    # A DP task that stops at its budget ended as designed, with every released model
    # within it.
    return 0 if task.state in ("completed", "budget_exhausted") else 1


def cmd_task_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    with _admin(args) as client:
        tasks = _guard(client.list_tasks)
    table = Table(title="tasks")
    for col in ("task_id", "name", "state", "rounds", "model version"):
        table.add_column(col)
    for t in tasks:
        table.add_row(t.task_id, t.spec.name, t.state, f"{t.rounds_committed}/{t.spec.rounds}",
                      str(t.model_version))
    Console().print(table)
    return 0


def cmd_task_cancel(args: argparse.Namespace) -> int:
    with _admin(args) as client:
        task = _guard(lambda: client.cancel_task(args.task_id))
    print(f"task {task.task_id}: {task.state}")
    return 0


def cmd_model_pull(args: argparse.Namespace) -> int:
    with _admin(args) as client:
        version, sha, size = _guard(
            lambda: client.pull_model(args.task_id, args.version, args.output))
    print(f"wrote {args.output} (task {args.task_id} model v{version}, {size} bytes, "
          f"sha256 {sha[:16]}...)")
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
