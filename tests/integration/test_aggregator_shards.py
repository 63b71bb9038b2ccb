"""Aggregator shards with real processes: `fedctl aggregator serve` shards, a coordinator
that sends each selected device to one of them, and agent processes that upload there.
A shard killed with kill -9 loses only its group: the task completes on the other."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import harness
import pytest
from harness import (
    ENV,
    FEDCTL_CMD,
    CoordinatorProcess,
    consecutive_free_ports,
    start_agent,
    stop_all,
    wait_for_task,
    write_task,
)
from slow_agents_app import STEP_ENV

from core.shards import ADMIN_METADATA, admin_token, derive_shard_key, parse_key
from core.tls import load_client_tls
from protos.fedcoord.v1 import aggregator_pb2, aggregator_pb2_grpc

pytestmark = pytest.mark.integration

#: The test app whose model sleeps per training step (``$FEDCOORD_TEST_STEP_S``), so agent
#: processes train at speeds the test chooses.
APP = ["--app", "slow_agents_app:app"]


@dataclass
class Shard:
    index: int
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_shard(workdir: Path, index: int, key_file: Path, extra: list[str] | None = None
                ) -> Shard:
    port_file = workdir / f"aggregator-{index}.port"
    log = workdir / f"aggregator-{index}.log"
    proc = subprocess.Popen(
        [*FEDCTL_CMD, "aggregator", "serve", "--index", str(index), "--key-file", str(key_file),
         "--port", "0", "--port-file", str(port_file),
         "--spool-dir", str(workdir / f"spool-{index}"), *(extra or [])],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=ENV)  # noqa: SIM115
    deadline = time.monotonic() + 120
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None:
            raise RuntimeError(f"aggregator {index} exited: {log.read_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"aggregator {index} did not start in 120 s")
        time.sleep(0.05)
    return Shard(index, proc, int(port_file.read_text()), log)


def keygen(*args: str) -> None:
    made = subprocess.run([*FEDCTL_CMD, "aggregator", "keygen", *args],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert made.returncode == 0, made.stderr


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """The coordinator's master key."""
    path = tmp_path / "shard.key"
    keygen("--out", str(path))
    return path


def shard_key_file(tmp_path: Path, master: Path, index: int) -> Path:
    """Shard ``index``'s own key, derived from the master (all a shard holds)."""
    path = tmp_path / f"aggregator-{index}.key"
    if not path.exists():
        keygen("--master", str(master), "--index", str(index), "--out", str(path))
    return path


@pytest.fixture
def shards(tmp_path: Path, key_file: Path) -> Iterator[list[Shard]]:
    started = [start_shard(tmp_path, i, shard_key_file(tmp_path, key_file, i))
               for i in range(2)]
    yield started
    stop_all([s.proc for s in started])


@pytest.fixture
def coordinator(tmp_path: Path, shards: list[Shard], key_file: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[CoordinatorProcess]:
    """A coordinator with the two shards, which loads the test app (agents load it too)."""
    path = os.pathsep.join(p for p in (str(Path(__file__).parent),
                                       harness.ENV.get("PYTHONPATH", "")) if p)
    monkeypatch.setitem(harness.ENV, "PYTHONPATH", path)
    c = CoordinatorProcess(tmp_path / "coordinator")
    c.workdir.mkdir()
    flags = [flag for s in shards for flag in ("--aggregator", s.address)]
    c.start([*APP, *flags, "--shard-key-file", str(key_file), "--checkin-pace", "0"])
    yield c
    c.stop()


def launch(coordinator: CoordinatorProcess, task_file: Path) -> str:
    launched = subprocess.run([*FEDCTL_CMD, "task", "launch", str(task_file),
                               "--coordinator", coordinator.target],
                              capture_output=True, text=True, env=ENV, timeout=120)
    assert launched.returncode == 0, launched.stderr
    return launched.stdout.strip()


def train(coordinator: CoordinatorProcess, tmp_path: Path, name: str, *, extra: str = "",
          rounds: int) -> list[Any]:
    """Launches a task of ``rounds`` rounds of 4 devices (min_reports 4), trains it with two
    agent processes of two devices each until it ends, and returns its committed rounds in
    order (the task must complete)."""
    task_id = launch(coordinator, write_task(tmp_path / "task.yaml", rounds=rounds,
                                             clients_per_round=4, min_reports=4, extra=extra))
    agents = [start_agent(coordinator.target, f"{name}{i}",
                          f"digits:shard={2 * i}/4,dirichlet=1.0", devices=2, task_id=task_id,
                          log=tmp_path / f"agent{i}.log") for i in range(2)]
    try:
        with coordinator.admin() as admin:
            task = wait_for_task(admin, task_id, timeout_s=240)
            rounds_seen = admin.list_rounds(task_id)
    finally:
        stop_all(agents)
    assert task.state == "completed", coordinator.log_text()
    committed = sorted((r for r in rounds_seen if r.state == "committed"),
                       key=lambda r: r.round_number)
    assert [r.round_number for r in committed] == list(range(1, rounds + 1))
    return committed


def test_a_task_trains_through_two_aggregator_shards(
        coordinator: CoordinatorProcess, shards: list[Shard], tmp_path: Path) -> None:
    committed = train(coordinator, tmp_path, "sharded", rounds=2)
    for r in committed:
        # Every update went through a shard: two groups of two, none lost.
        assert r.reports == 4 and r.metrics["reports"] == 4
        assert r.metrics["shards"] == 2 and r.metrics["shards_lost"] == 0
        assert r.metrics["examples"] > 0 and 0 <= r.metrics["server_eval_accuracy"] <= 1


def test_a_central_dp_task_is_clipped_at_the_shards_and_noised_once_by_the_coordinator(
        coordinator: CoordinatorProcess, shards: list[Shard], tmp_path: Path) -> None:
    """Agents clip to the plan's C and withhold their metrics; each shard sums its group's
    clipped updates; the coordinator checks the sums, adds the noise once and accounts the
    release: no per-device metric and no example count is released."""
    privacy = ("privacy: {mode: central, noise_multiplier: 1.0, delta: 1.0e-5, clip: 1.0,\n"
               "          population: 4, sampling: fixed, max_epsilon: 1000.0}\n")
    committed = train(coordinator, tmp_path, "private", rounds=2, extra=privacy)
    epsilons = [r.metrics["dp_epsilon"] for r in committed]
    assert 0 < epsilons[0] < epsilons[1]  # each release accounted once, in order
    for r in committed:
        assert r.metrics["shards"] == 2 and r.metrics["shards_lost"] == 0
        assert r.metrics["reports"] == 4
        assert "examples" not in r.metrics and "train_loss" not in r.metrics


def test_adaptive_clipping_moves_the_clip_through_the_shards(
        coordinator: CoordinatorProcess, shards: list[Shard], tmp_path: Path) -> None:
    """Under adaptive clipping devices send the unclipped bit, the shards sum the bits with
    the clipped updates, and the coordinator's noised count of them moves the clip for the
    next round: from 100, far over every update's norm, every bit is 1 and the clip shrinks
    (a shard that dropped the bits would send 0, and the clip would grow)."""
    # Bit noise std 0.3 over 4 devices: the noised fraction of unclipped updates is within
    # 0.075 x 6 of the true 1, far from the 0.5 that could stop the clip from shrinking.
    privacy = ("privacy: {mode: central, noise_multiplier: 0.5, delta: 1.0e-5,\n"
               "          clip: {target_quantile: 0.5, initial: 100.0, learning_rate: 0.5,\n"
               "                 bit_noise: 0.3},\n"
               "          population: 4, sampling: fixed, max_epsilon: 1000.0}\n")
    committed = train(coordinator, tmp_path, "adaptive", rounds=3, extra=privacy)
    assert all(r.metrics["shards"] == 2 and r.metrics["shards_lost"] == 0 for r in committed)
    clips = [r.metrics["dp_clip"] for r in committed]
    assert clips[0] == pytest.approx(100.0) and clips[0] > clips[1] > clips[2], clips


def test_a_task_trains_through_shards_over_tls(tmp_path: Path, key_file: Path) -> None:
    """Everything over TLS: the shards serve the certificate of the coordinator's CA, the
    coordinator checks them with --shard-ca, and the agents, given only that CA, upload to
    them as they reach the coordinator."""
    certs = tmp_path / "certs"
    made = subprocess.run([*FEDCTL_CMD, "certs", "init", "--out", str(certs)],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert made.returncode == 0, made.stderr
    shards = [start_shard(tmp_path, i, shard_key_file(tmp_path, key_file, i),
                          ["--tls-dir", str(certs)]) for i in range(2)]
    c = CoordinatorProcess(tmp_path / "coordinator", tls=load_client_tls(certs / "ca.crt"))
    c.workdir.mkdir()
    agents: list[subprocess.Popen[bytes]] = []
    try:
        c.start(["--tls", str(certs), "--checkin-pace", "0", "--shard-key-file",
                 str(key_file), "--shard-ca", str(certs / "ca.crt"),
                 *[flag for s in shards for flag in ("--aggregator", s.address)]])
        launched = subprocess.run(
            [*FEDCTL_CMD, "task", "launch",
             str(write_task(tmp_path / "task.yaml", rounds=1, clients_per_round=4,
                            min_reports=4)),
             "--coordinator", c.target, "--ca", str(certs / "ca.crt")],
            capture_output=True, text=True, env=ENV, timeout=120)
        assert launched.returncode == 0, launched.stderr
        task_id = launched.stdout.strip()
        agents = [start_agent(c.target, "tls-sharded", "digits:shard=0/4,dirichlet=1.0",
                              devices=4, task_id=task_id,
                              extra=["--ca", str(certs / "ca.crt")],
                              log=tmp_path / "agent.log")]
        with c.admin() as admin:
            task = wait_for_task(admin, task_id, timeout_s=180)
            rounds = admin.list_rounds(task_id)
    finally:
        stop_all(agents)
        c.stop()
        stop_all([s.proc for s in shards])
    assert task.state == "completed", c.log_text()
    (committed,) = [r for r in rounds if r.state == "committed"]
    assert committed.metrics["shards"] == 2 and committed.metrics["reports"] == 4
    for shard in shards:
        assert "listening on 127.0.0.1" in shard.log.read_text() and "(TLS)" in shard.log.read_text()


def shard_reported(shard: Shard, key_file: Path, task_id: str, round_id: int) -> int:
    """How many uploads ``shard`` has accepted in the round, asked as the coordinator asks."""
    with grpc.insecure_channel(shard.address) as channel:
        answer = aggregator_pb2_grpc.AggregatorServiceStub(channel).RoundProgress(
            aggregator_pb2.RoundProgressRequest(rounds=[aggregator_pb2.ShardRoundKey(
                task_id=task_id, round_id=round_id)]),
            timeout=10, metadata=((ADMIN_METADATA, admin_token(derive_shard_key(parse_key(
                key_file.read_bytes()), shard.index))),))
    return sum(len(r.reported) for r in answer.rounds)


def test_a_shard_killed_mid_round_loses_only_its_group(
        coordinator: CoordinatorProcess, shards: list[Shard], key_file: Path,
        tmp_path: Path) -> None:
    """Four devices train at different speeds (seconds apart), two per shard. Shard 1 is
    killed (kill -9) as soon as it has accepted its first update of round 1, before the
    round's last update arrives: round 1 commits from shard 0's group alone (its two
    reports meet min_reports), and round 2 is assigned to shard 0 only."""
    task_id = launch(coordinator, write_task(
        tmp_path / "task.yaml", architecture="sleepy_logistic_regression", rounds=2,
        clients_per_round=4, min_reports=2, round_deadline_s=25))
    agents = [start_agent(coordinator.target, f"paced{i}", f"digits:shard={i}/4,dirichlet=1.0",
                          devices=1, task_id=task_id, extra=APP, env={STEP_ENV: str(step)},
                          log=tmp_path / f"agent{i}.log")
              for i, step in enumerate((0.0, 0.03, 0.06, 0.09))]
    try:
        deadline = time.monotonic() + 180
        # The first round opened in this coordinator's new database has round id 1.
        while shard_reported(shards[1], key_file, task_id, 1) == 0:
            assert time.monotonic() < deadline, coordinator.log_text()
            time.sleep(0.02)
        shards[1].proc.send_signal(signal.SIGKILL)
        shards[1].proc.wait(timeout=10)
        with coordinator.admin() as admin:
            task = wait_for_task(admin, task_id, timeout_s=240)
            rounds = admin.list_rounds(task_id)
    finally:
        stop_all(agents)
    assert task.state == "completed", coordinator.log_text()
    committed = sorted((r for r in rounds if r.state == "committed"),
                       key=lambda r: r.round_number)
    assert [r.round_number for r in committed] == [1, 2]
    assert [r.model_version for r in committed] == [1, 2]  # each version once
    first, second = committed
    assert first.metrics["shards"] == 1 and first.metrics["shards_lost"] == 1, dict(
        first.metrics)
    assert first.metrics["reports"] == 2  # shard 0's group: what the model moved by
    assert second.metrics["shards"] == 1 and second.metrics["shards_lost"] == 0
    log = coordinator.log_text()
    assert "aggregator shard 1 (127.0.0.1:" in log and "does not answer" in log


def test_cluster_up_runs_shards_beside_the_coordinator_and_restarts_a_killed_one(
        tmp_path: Path) -> None:
    """`fedctl cluster up --replicas 1 --aggregators 2`: a task trains through the two
    shards; a shard killed with kill -9 is started again; Ctrl-C stops everything."""
    port = consecutive_free_ports(3)
    directory = tmp_path / "c"
    out = tmp_path / "cluster.out"
    cluster = subprocess.Popen(
        [*FEDCTL_CMD, "cluster", "up", "--replicas", "1", "--aggregators", "2",
         "--dir", str(directory), "--port", str(port)],
        stdout=open(out, "wb"), stderr=subprocess.STDOUT, env=ENV)  # noqa: SIM115

    def wait_line(pattern: str, timeout_s: float = 180) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            text = out.read_text(errors="replace")
            if (found := re.search(pattern, text)) is not None:
                return found
            assert cluster.poll() is None, text
            assert time.monotonic() < deadline, f"no {pattern!r} in: {text}"
            time.sleep(0.05)

    agent = None
    try:
        wait_line(r"replica 0 leads")
        shard_pid = int(wait_line(rf"aggregator 1: 127.0.0.1:{port + 2} pid (\d+)").group(1))
        assert (directory / "shard.key").stat().st_mode & 0o077 == 0
        coordinator = f"127.0.0.1:{port}"
        env = dict(ENV, FEDCOORD_TOKEN=(directory / "admin.token").read_text().strip())
        launched = subprocess.run(
            [*FEDCTL_CMD, "task", "launch", str(write_task(tmp_path / "task.yaml", rounds=1,
                                                           clients_per_round=2, min_reports=2)),
             "--coordinator", coordinator], capture_output=True, text=True, env=env,
            timeout=120)
        assert launched.returncode == 0, launched.stderr
        task_id = launched.stdout.strip()
        agent = start_agent(coordinator, "clustered", "digits:shard=0/2,dirichlet=1.0",
                            devices=2, task_id=task_id, log=tmp_path / "agent.log")
        deadline = time.monotonic() + 180
        while True:
            status = subprocess.run(
                [*FEDCTL_CMD, "task", "status", task_id, "--coordinator", coordinator,
                 "--json"], capture_output=True, text=True, env=env, timeout=60)
            assert status.returncode == 0, status.stderr
            document = json.loads(status.stdout)
            if document["task"]["state"] == "completed":
                break
            assert time.monotonic() < deadline, status.stdout
            time.sleep(0.5)
        (committed,) = [r for r in document["rounds"] if r["state"] == "committed"]
        assert committed["metrics"]["shards"] == 2, committed
        os.kill(shard_pid, signal.SIGKILL)
        wait_line(rf"aggregator 1 \(pid {shard_pid}\) exited with -9; starting it again")
        wait_line(r"aggregator 1: pid (\d+)")
    finally:
        if agent is not None:
            stop_all([agent])
        cluster.send_signal(signal.SIGINT)
        code = cluster.wait(timeout=60)
    assert code == 0, out.read_text()
    assert "stopping the cluster" in out.read_text()
