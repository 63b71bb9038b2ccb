"""Composition root of the device agent: one process hosting one or many devices.

``fedctl agent run --devices M`` hosts M virtual devices, each with its own identity and
data shard, sharing one gRPC channel; each device runs on its own thread (torch releases
the GIL in its kernels). SIGTERM/SIGINT stop every device cleanly between steps.

One device's trouble is its own: a task it cannot run is declined (see
:mod:`device_agent.runtime.device`), and a device that crashes ends alone while the others
go on serving. :func:`exit_status` turns the devices' ends into the process's exit code.

With ``flower_client`` (``--flower-client MODULE:ATTRIBUTE``) the devices train with a Flower
client instead of our torch trainer on ``data`` (see :mod:`device_agent.flower`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from core.data.dataset import LocalDataset
from core.data.spec import load_dataset, parse_data_spec, with_shard
from core.security.identity import DeviceKey
from core.tls import ClientTls
from core.types import DeviceAttributes
from device_agent.runtime.device import Device, DeviceStats, LocalTrainer
from device_agent.transport.client import DeviceClient, RetryPolicy

log = logging.getLogger(__name__)


def default_state_dir() -> Path:
    """``$FEDCOORD_AGENT_STATE``, else ``$XDG_STATE_HOME/fedcoord/agent`` (``~/.local/state``)."""
    override = os.environ.get("FEDCOORD_AGENT_STATE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fedcoord" / "agent"


@dataclass(frozen=True)
class AgentConfig:
    coordinator: str
    #: Names the hosted devices (``NAME`` or ``NAME-i``) and their key files
    #: (``STATE_DIR/NAME.key``); the device ids derive from the keys.
    name: str
    #: The devices' data spec; None with ``flower_client`` (a Flower client loads its own).
    data: str | None
    devices: int = 1
    task_id: str | None = None
    attributes: DeviceAttributes = DeviceAttributes()
    exit_when_idle: bool = False
    give_up_after_s: float = 120.0
    torch_threads: int = 1
    #: TLS towards the coordinator (None: plaintext).
    tls: ClientTls | None = None
    #: Where the devices' Ed25519 keys live (created 0600 on first run).
    state_dir: Path = field(default_factory=default_state_dir)
    #: Sent at enrollment: the coordinator's enrollment token, an attestation blob.
    enrollment_token: str = ""
    attestation: bytes = b""
    #: ``MODULE:ATTRIBUTE`` of a Flower client (or client function) the devices train with,
    #: and the ``node_config`` its client function receives (``key=value ...``).
    flower_client: str | None = None
    flower_node_config: str = ""
    #: The stratum every hosted device declares at check-in (experiments with per-stratum
    #: splits, :mod:`core.experiments.assignment`); None: none (the default split).
    stratum: str | None = None


def device_shards(config: AgentConfig) -> list[tuple[str, str]]:
    """(device name, data spec) per hosted device: with ``--devices M`` and a data spec of
    ``shard=K/N``, device i (name ``NAME-i``) gets shard ``K+i`` of ``N``."""
    if config.data is None:
        raise ValueError("the devices need a data spec (or a Flower client)")
    spec = parse_data_spec(config.data)
    if config.devices == 1:
        return [(config.name, config.data)]
    shard = spec.params.get("shard")
    out = []
    if shard is None:
        raise ValueError("--devices M needs a data spec with shard=K/N")
    k, n = (int(v) for v in shard.split("/"))
    if k + config.devices > n:
        raise ValueError(
            f"--devices {config.devices} from shard {k} needs shards up to {k + config.devices - 1}"
            f" but the data spec has only {n}"
        )
    for i in range(config.devices):
        out.append((f"{config.name}-{i}", str(with_shard(spec, k + i, n))))
    return out


def run_agent(config: AgentConfig, stop: threading.Event | None = None) -> list[DeviceStats]:
    import torch

    torch.set_num_threads(config.torch_threads)
    stop = stop or threading.Event()
    hosted: list[tuple[str, LocalDataset | None, LocalTrainer | None]]
    if config.flower_client is None:
        hosted = [(name, load_dataset(spec), None) for name, spec in device_shards(config)]
    else:
        from device_agent.flower import flower_trainers

        names = ([config.name] if config.devices == 1 else
                 [f"{config.name}-{i}" for i in range(config.devices)])
        trainers = flower_trainers(config.flower_client, names,
                                   node_config=config.flower_node_config)
        hosted = [(name, None, t) for name, t in zip(names, trainers, strict=True)]
    client = DeviceClient(
        config.coordinator, policy=RetryPolicy(give_up_after_s=config.give_up_after_s), stop=stop,
        tls=config.tls,
    )
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    devices = [
        Device(
            DeviceKey.load_or_create(config.state_dir / f"{name}.key"), data,
            client, trainer=trainer, attributes=config.attributes, task_id=config.task_id,
            exit_when_idle=config.exit_when_idle, stop=stop,
            enrollment_token=config.enrollment_token, attestation=config.attestation,
            stratum=config.stratum,
        )
        for name, data, trainer in hosted
    ]
    results: list[DeviceStats] = [DeviceStats() for _ in devices]

    def run(i: int) -> None:
        try:
            results[i] = devices[i].run()
        except Exception as exc:  # noqa: BLE001 - a bug in one device ends that device only
            log.exception("device %s crashed; the other devices go on", devices[i].device_id)
            results[i] = devices[i].stats
            results[i].failure = f"crashed: {type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=run, args=(i,), name=d.device_id, daemon=True)
               for i, d in enumerate(devices)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)
    client.close()
    return results


def exit_status(results: list[DeviceStats]) -> int:
    """The agent process's exit code: 0 when at least one device ended well (its task
    finished, it was stopped, or it went idle), 1 when every device failed (unreachable
    coordinator, refused, crashed, or declined the one task it was started for)."""
    return 0 if any(not r.failure for r in results) else 1


def install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        log.info("signal %d: stopping devices", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
