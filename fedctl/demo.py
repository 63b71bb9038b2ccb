"""`fedctl demo`: an embedded coordinator (SQLite in a temp dir) plus real device-agent
processes on localhost, training an MLP on scikit-learn's digits split non-IID
(Dirichlet 0.5), with the global model evaluated on a held-out test split after every round.
The coordinator runs in its production posture: TLS with a throwaway CA and server
certificate made in the temp dir (the code of `fedctl certs init`); admin calls with an API
token of the launcher role; devices with their own Ed25519 keys, enrolled with a one-off
enrollment token good for exactly the demo's devices. Ends by printing one JSON line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from core.privacy.accounting import Sampling
from core.privacy.spec import FixedClip, PrivacyMode, PrivacySpec
from core.types import (
    Evaluation,
    LocalOptimizerKind,
    LocalTraining,
    ModelSpec,
    SecureAggregation,
    ServerOptimizer,
    TaskSpec,
)
from fedctl.errors import CliError

#: Central DP in the demo: every update clipped to L2 norm DP_CLIP, Gaussian noise of std
#: DP_NOISE_MULTIPLIER x DP_CLIP on the sum. The noise on the mean is z C sqrt(d) / m in norm,
#: so a small model (a 64-16-10 MLP, d = 1,210) keeps it near the signal; the 64-128-10 MLP
#: (d = 9,610) would drown in it.
DP_NOISE_MULTIPLIER = 0.5
DP_CLIP = 1.0
#: The demo's budget: epsilon at delta 1e-5 after which no round opens (the default 5 rounds
#: of half of 20 devices at z = 0.5 spend 81.1: a demo of the mechanics, not of privacy).
DP_MAX_EPSILON = 100.0


def demo_task(devices: int, rounds: int, seed: int, *, secagg: bool = False,
              dp: bool = False) -> TaskSpec:
    goal = max(1, round(devices / 1.25))
    over_selection = devices / goal
    privacy = None
    if dp:
        # Every demo device checks in every round: the population is the devices. Half of
        # them are drawn uniformly each round (q = 1/2; no over-selection, no cut by report
        # order: every drawn device's report is summed), which is what the accountant
        # analyses (fixed-size sampling without replacement, replace-one).
        goal, over_selection = max(3, devices // 2), 1.0
        privacy = PrivacySpec(mode=PrivacyMode.CENTRAL, noise_multiplier=DP_NOISE_MULTIPLIER,
                              delta=1e-5, clip=FixedClip(DP_CLIP), sampling=Sampling.FIXED_SIZE,
                              population=devices, max_epsilon=DP_MAX_EPSILON)
    hidden = [16] if dp else [128]
    return TaskSpec(
        name="demo-digits-mlp" + ("-dp" if dp else ""),
        model=ModelSpec("mlp", {"input_dim": 64, "hidden": hidden, "num_classes": 10}),
        rounds=rounds,
        clients_per_round=goal,
        min_reports=max(1, goal // 2),
        over_selection=over_selection,
        round_deadline_s=120.0,
        selection_window_s=3.0,
        local=LocalTraining(epochs=5, batch_size=16, optimizer=LocalOptimizerKind.SGD,
                            learning_rate=0.1, momentum=0.9),
        server=ServerOptimizer(),
        evaluation=Evaluation(fraction=0.0 if dp else 0.25, server_data="digits:split=test"),
        seed=seed,
        # SecAgg+ with parameters derived for 2^-40 security against 5% colluding devices;
        # a 1% expected dropout keeps 2^-20 correctness reachable for a cohort this small.
        secure_aggregation=SecureAggregation(dropout=0.01) if secagg else None,
        privacy=privacy,
    )


def run_demo(*, devices: int, rounds: int, processes: int, json_only: bool, seed: int,
             secagg: bool = False, dp: bool = False) -> int:
    from coordinator.app import EmbeddedCoordinator
    from coordinator.security.roles import Role
    from coordinator.settings import CoordinatorSettings, EnrollmentPolicy, SecuritySettings
    from core.tls import load_client_tls, write_local_ca
    from fedctl.admin import AdminClient
    from fedctl.watch import accuracy_of, watch

    if devices < 1 or rounds < 1 or processes < 1:
        raise CliError("--devices, --rounds and --processes must be at least 1")
    # Central DP runs with secure aggregation: the coordinator noises a sum it never saw
    # the parts of.
    secagg = secagg or dp
    console = Console(stderr=True, quiet=json_only)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedcoord-demo-") as tmp:
        certs = write_local_ca(Path(tmp) / "tls")
        config = CoordinatorSettings(db_url=f"sqlite:///{tmp}/fedcoord.db",
                                     store_dir=Path(tmp) / "store", port=0,
                                     tls_dir=Path(tmp) / "tls", http_port=0,
                                     # a few local devices: back for the next round at once
                                     retry_after_max_s=1.0,
                                     security=SecuritySettings(enrollment=EnrollmentPolicy.TOKEN))
        coordinator = EmbeddedCoordinator(config)
        port = coordinator.start()
        target = f"127.0.0.1:{port}"
        _, api_token = coordinator.security.admin.create_token(Role.LAUNCHER, label="demo")
        _, enrollment_token = coordinator.security.admin.create_enrollment_token(
            devices, expires_in_s=3600, label="demo")
        console.print(f"[bold]coordinator[/] on {target} (TLS, CA {certs.ca_cert}; admin API "
                      f"token of role launcher; devices enroll with a token for {devices}), "
                      f"database {tmp}/fedcoord.db")
        # The demo's coordinator and its tokens end with the demo: a viewer token is shown.
        _, viewer_token = coordinator.security.admin.create_token(Role.VIEWER,
                                                                  label="demo dashboard")
        http = f"http://{config.host}:{coordinator.http_port}"
        console.print(f"[bold]dashboard[/] on {http}/ (log in with the viewer token "
                      f"{viewer_token}); metrics on {http}/metrics (also /healthz, /readyz), "
                      "while the demo runs")
        agents: list[subprocess.Popen[bytes]] = []
        try:
            with AdminClient(target, tls=load_client_tls(certs.ca_cert),
                             token=api_token) as client:
                task = client.create_task(demo_task(devices, rounds, seed, secagg=secagg,
                                                    dp=dp))
                console.print(f"[bold]task[/] {task.task_id}: {rounds} rounds, goal "
                              f"{task.spec.clients_per_round} of {devices} devices"
                              + (", secure aggregation (SecAgg+)" if secagg else "")
                              + (f", central DP (z={DP_NOISE_MULTIPLIER}, C={DP_CLIP})"
                                 if dp else ""))
                agents = _start_agents(target, task.task_id, devices, processes, Path(tmp),
                                       ca=certs.ca_cert, enrollment_token=enrollment_token)
                console.print(f"[bold]agents[/]: {devices} devices in {len(agents)} processes")
                final = watch(client, task.task_id, console=console, timeout_s=900)
                rounds_info = [r for r in client.list_rounds(task.task_id)
                               if r.state == "committed"]
        finally:
            _stop_agents(agents)
            coordinator.stop()
    accuracy = [round(a, 4) for r in rounds_info if (a := accuracy_of(r)) is not None]
    result = {
        "task_id": final.task_id,
        "state": final.state,
        "rounds_completed": final.rounds_committed,
        "final_accuracy": accuracy[-1] if accuracy else None,
        "accuracy": accuracy,
        "devices": devices,
        "secure_aggregation": secagg,
        "differential_privacy": dp,
        "tls": True,
        "auth": True,
        "wall_seconds": round(time.monotonic() - started, 2),
    }
    if secagg and rounds_info:
        last = rounds_info[-1].metrics
        result["secagg"] = {k: last[k] for k in ("secagg_neighbours", "secagg_threshold",
                                                 "secagg_dropped", "secagg_clipped_values")
                            if k in last}
    if dp and rounds_info:
        last = rounds_info[-1].metrics
        result["dp"] = {
            "epsilon": round(last["dp_epsilon"], 4) if "dp_epsilon" in last else None,
            "delta": last.get("dp_delta"),
            "noise_multiplier": last.get("dp_noise_multiplier"),
            "clip": last.get("dp_clip"),
            "sampling_rate": last.get("dp_sampling_rate"),
            "budget": final.privacy.budget if final.HasField("privacy") else None,
            "sampling": final.privacy.sampling if final.HasField("privacy") else None,
            "metrics_release": final.metrics_release,
            "epsilon_per_round": [round(r.metrics["dp_epsilon"], 4) for r in rounds_info
                                  if "dp_epsilon" in r.metrics],
        }
    print(json.dumps(result), flush=True)
    return 0 if final.state == "completed" else 1


def _start_agents(
    target: str, task_id: str, devices: int, processes: int, logdir: Path, *, ca: Path,
    enrollment_token: str,
) -> list[subprocess.Popen[bytes]]:
    processes = min(processes, devices)
    per, extra = divmod(devices, processes)
    agents = []
    first = 0
    # The enrollment token travels in the environment, not on the command line (which other
    # users of the machine can read).
    env = dict(_without_agent_settings(os.environ), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               FEDCOORD_ENROLLMENT_TOKEN=enrollment_token)
    for i in range(processes):
        count = per + (1 if i < extra else 0)
        cmd = [
            sys.executable, "-m", "fedctl", "agent", "run", "--coordinator", target,
            "--name", f"demo-p{i}", "--devices", str(count), "--task", task_id,
            "--state-dir", str(logdir / "agents"),
            "--data", f"digits:shard={first}/{devices},dirichlet=0.5", "--ca", str(ca),
        ]
        log = open(logdir / f"agent-{i}.log", "wb")  # noqa: SIM115 - closed by the child's exit
        agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        first += count
    return agents


def _without_agent_settings(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The environment less a config file and ``FEDCOORD_<KEY>`` agent settings: the demo's
    agents run as the demo says, whatever this shell sets for real agents."""
    from fedctl.config import CONFIG_ENV, settings_of
    from fedctl.main import build_parser

    agent = build_parser().settings_parsers["agent"]
    drop = {CONFIG_ENV} | {s.env for s in settings_of(agent).values()}
    return {k: v for k, v in environ.items() if k not in drop}


def _stop_agents(agents: list[subprocess.Popen[bytes]]) -> None:
    for p in agents:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in agents:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
