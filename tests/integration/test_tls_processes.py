"""TLS with real processes: `fedctl certs init`, `fedctl coordinator serve --tls DIR`, the
engineer's CLI and agents with `--ca`; clients that do not hold the right CA (or, under
mutual TLS, a certificate) are turned away with a message, never a traceback."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from harness import (
    ENV,
    FEDCTL_CMD,
    CoordinatorProcess,
    fedctl_at_once,
    start_agent,
    stop_all,
    wait_for_task,
    write_task,
)

from core.tls import load_client_tls

pytestmark = pytest.mark.integration


def fedctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDCTL_CMD, *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def test_a_task_runs_over_tls_and_clients_without_the_ca_are_refused(tmp_path: Path) -> None:
    certs, other = tmp_path / "certs", tmp_path / "other"
    for made in fedctl_at_once(["certs", "init", "--out", str(certs)],
                               ["certs", "init", "--out", str(other)]):
        assert made.returncode == 0, made.stderr
    ca = str(certs / "ca.crt")
    coordinator = CoordinatorProcess(tmp_path, tls=load_client_tls(certs / "ca.crt"))
    coordinator.start(["--tls", str(certs)])
    agents: list[subprocess.Popen[bytes]] = []
    try:
        # One round: its check-ins, plan, model download and uploads all cross TLS.
        task_file = write_task(tmp_path / "task.yaml", rounds=1, clients_per_round=3,
                               min_reports=2)
        launched = fedctl("task", "launch", str(task_file), "--coordinator", coordinator.target,
                          "--ca", ca)
        assert launched.returncode == 0, launched.stderr
        task_id = launched.stdout.strip()
        agents = [start_agent(coordinator.target, "tls-agent", "digits:shard=0/3,dirichlet=0.5",
                              devices=3, task_id=task_id, extra=["--ca", ca],
                              log=tmp_path / "agent.log")]
        with coordinator.admin() as client:
            task = wait_for_task(client, task_id, timeout_s=180)
        assert task.state == "completed", coordinator.log_text()
        # While the agent's devices learn that the task ended (one may be waiting out a
        # "come back later" of seconds), the CLI's clients run.
        at = ["--coordinator", coordinator.target]
        status, plaintext, wrong_ca = fedctl_at_once(
            ["task", "status", task_id, *at, "--ca", ca], ["task", "status", task_id, *at],
            ["task", "list", *at, "--ca", str(other / "ca.crt")])
        assert agents[0].wait(timeout=60) == 0, (tmp_path / "agent.log").read_text()
        assert status.returncode == 0 and "completed" in status.stdout, status.stderr

        assert plaintext.returncode == 1
        assert "UNAVAILABLE: cannot reach the coordinator" in plaintext.stderr
        assert "if it serves TLS, give --ca FILE" in plaintext.stderr

        assert wrong_ca.returncode == 1
        assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.stderr and "check --ca" in wrong_ca.stderr

        for result in (plaintext, wrong_ca):
            assert "Traceback" not in result.stderr
            assert result.stderr.count("\n") == 1, "one line, no gRPC log beside it"
    finally:
        stop_all(agents)
        coordinator.stop()


def test_mutual_tls_refuses_clients_without_a_certificate_of_the_client_ca(
    tmp_path: Path
) -> None:
    certs, other = tmp_path / "certs", tmp_path / "other"
    for made in fedctl_at_once(["certs", "init", "--out", str(certs)],
                               ["certs", "init", "--out", str(other)]):
        assert made.returncode == 0, made.stderr
    ca = str(certs / "ca.crt")
    # Ours, and one of another CA (no better than none).
    for made in fedctl_at_once(
            ["certs", "client", "device-1", "--ca-dir", str(certs),
             "--out", str(tmp_path / "clients")],
            ["certs", "client", "intruder", "--ca-dir", str(other),
             "--out", str(tmp_path / "intruder")]):
        assert made.returncode == 0, made.stderr
    mine = ["--ca", ca, "--cert", str(tmp_path / "clients" / "device-1.crt"),
            "--key", str(tmp_path / "clients" / "device-1.key")]
    coordinator = CoordinatorProcess(tmp_path)
    coordinator.start(["--tls", str(certs), "--client-ca", ca])
    agent = None
    try:
        assert "listening on 127.0.0.1" in coordinator.log_text()
        assert "(mutual TLS)" in coordinator.log_text()
        # Devices too: with its certificate an agent checks in (no task: it exits 0), without
        # it never gets through. Everything here runs at once (each process costs seconds).
        agent = start_agent(coordinator.target, "mtls", "digits:shard=0/4",
                            extra=[*mine, "--exit-when-idle"], log=tmp_path / "agent.log")
        at = ["--coordinator", coordinator.target]
        with_cert, without, foreign, refused = fedctl_at_once(
            ["task", "list", *at, *mine], ["task", "list", *at, "--ca", ca],
            ["task", "list", *at, "--ca", ca,
             "--cert", str(tmp_path / "intruder" / "intruder.crt"),
             "--key", str(tmp_path / "intruder" / "intruder.key")],
            ["agent", "run", *at, "--device-id", "no-cert", "--data", "digits:shard=0/4",
             "--give-up-after", "1", "--ca", ca])
        assert with_cert.returncode == 0, with_cert.stderr

        assert without.returncode == 1 and "UNAVAILABLE" in without.stderr
        assert "client --cert/--key" in without.stderr and "Traceback" not in without.stderr

        assert foreign.returncode == 1 and "UNAVAILABLE" in foreign.stderr

        assert agent.wait(timeout=90) == 0, (tmp_path / "agent.log").read_text()
        assert refused.returncode == 1 and "unreachable" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        if agent is not None:
            stop_all([agent])
        coordinator.stop()


def test_plaintext_on_a_network_address_is_refused_unless_insecure(tmp_path: Path) -> None:
    def serve(name: str) -> list[str]:
        return [*FEDCTL_CMD, "coordinator", "serve", "--db", f"sqlite:///{tmp_path}/{name}.db",
                "--store", str(tmp_path / f"{name}-store"), "--host", "0.0.0.0", "--port", "0"]

    # Both coordinators start at once (each costs seconds of imports), on databases of
    # their own: the refused one must not have opened its own.
    insecure = subprocess.Popen([*serve("insecure"), "--insecure"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        refused = subprocess.run(serve("refused"), capture_output=True, text=True, env=ENV,
                                 timeout=120)
        assert refused.returncode == 1
        assert refused.stderr.startswith("fedctl: error: coordinator: refusing to serve "
                                         "plaintext on 0.0.0.0, which is not a loopback address")
        assert "--tls DIR" in refused.stderr and "--insecure" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert not (tmp_path / "refused.db").exists(), "refused before the database was opened"

        # The line comes once the server is up; SIGTERM only then (sent earlier, it would
        # stop the process before it could say anything).
        assert insecure.stdout is not None
        listening = insecure.stdout.readline()
    finally:
        insecure.send_signal(signal.SIGTERM)
        out, err = insecure.communicate(timeout=30)
    assert "listening on 0.0.0.0" in listening and "(plaintext)" in listening, err + out
    assert "WARNING" in err and "serving WITHOUT TLS on 0.0.0.0 (--insecure)" in err
