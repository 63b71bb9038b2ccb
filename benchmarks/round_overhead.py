"""One round with 100 virtual devices and a 100k-parameter model over loopback gRPC, no
local training: the coordinator's protocol cost against the transport floor (the same bytes
over a bare grpcio stream, same chunking, same concurrency), and the same round with TLS and
with device authentication. Prints one JSON line.

The columns (a fresh coordinator for every round; repeats alternate the columns; medians):

- ``plaintext``: no TLS, ``--no-device-auth``: the pre-security baseline;
- ``tls``: TLS, ``--no-device-auth``;
- ``auth``: no TLS, device authentication;
- ``secured``: TLS and device authentication, as a deployment serves.

Every device enrolls its Ed25519 key before the round (not timed; in the columns without
device authentication this only connects the channels), and under device authentication its
check-in in the round carries a fresh signed proof that the coordinator checks;
the device client signs every check-in in every column (it cannot do otherwise), a few tens of
microseconds per device against a round of seconds. Devices share four long-lived channels, as
an agent process's devices share one, so each TLS handshake is amortized over many calls.
All devices call from one address, so the coordinator's per-address and per-device limits are
raised (``limits`` in the output).

    python benchmarks/round_overhead.py [--devices 100] [--repeats 3]

``--round-path`` measures the plaintext round alone against the machine's floor, taken in
the same run after each repeat: the same bytes over a plain grpc.aio stream in 1 MiB
messages (:func:`aio_stream_floor`), beside the old floor (the round's own client pattern
against a server with no logic, ``bare_threads``). ``--before-tree DIR`` alternates its
rounds with rounds served from another source tree, for before/after figures from one run:

    git worktree add --detach /tmp/wt-before <commit>
    python benchmarks/round_overhead.py --round-path --before-tree /tmp/wt-before --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import (  # noqa: E402
    LIFTED_LIMITS_NOTE,
    ROOT,
    BareServer,
    CoordinatorSubprocess,
)
from benchmarks.checkin import (  # noqa: E402
    OBS_MODES,
    KafkaBroker,
    ObservedCoordinator,
    add_broker_and_mode_args,
    cpu_seconds,
    kafka_totals,
    machine_load,
    mode_order,
    parse_modes,
    spread,
)
from core.protocol import CheckInOutcome, Participation, UpdateHeader  # noqa: E402
from core.security.identity import DeviceKey  # noqa: E402
from core.tensors import sha256_hex  # noqa: E402
from core.types import DeviceAttributes, ModelSpec, TaskSpec  # noqa: E402
from device_agent.transport.client import DeviceClient  # noqa: E402

CHUNK = 1 << 20
MODEL = ModelSpec("mlp", {"input_dim": 64, "hidden": [512, 128], "num_classes": 10})
#: name: (TLS, device authentication)
VARIANTS = {"plaintext": (False, False), "tls": (True, False), "auth": (False, True),
            "secured": (True, True)}


def run_devices(n: int, body) -> float:  # type: ignore[no-untyped-def]
    barrier = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            body(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


class TreeCoordinator(CoordinatorSubprocess):
    """A coordinator served from the source tree at ``tree`` (e.g. a ``git worktree`` of an
    earlier commit), so that two versions are measured in one run; the clients stay this
    tree's."""

    def __init__(self, tree: Path, **kwargs: bool) -> None:
        super().__init__(**kwargs)
        self.tree = tree.resolve()

    def _launcher(self) -> list[str]:
        return [sys.executable, "-c",
                f"import runpy, sys; sys.path.insert(0, {str(self.tree)!r}); "
                "runpy.run_module('fedctl', run_name='__main__', alter_sys=True)"]


def ours(n: int, *, tls: bool = False, device_auth: bool = False, mode: str = "",
         kafka: str = "", observed: list[ObservedCoordinator] | None = None,
         tree: Path | None = None) -> dict[str, float]:
    """One round on a fresh coordinator: as today without ``mode``, else an
    :class:`ObservedCoordinator` in ``mode`` (appended to ``observed``, for its counters);
    ``tree``: served from that source tree instead (see :class:`TreeCoordinator`)."""
    spec = TaskSpec(name="bench-round", model=MODEL, rounds=1, clients_per_round=n,
                    min_reports=n, over_selection=1.0, round_deadline_s=600,
                    selection_window_s=0.0)
    if mode:
        obs = ObservedCoordinator(mode, kafka, tls=tls, device_auth=device_auth)
        if observed is not None:
            observed.append(obs)
        coordinator: CoordinatorSubprocess = obs
    elif tree is not None:
        coordinator = TreeCoordinator(tree, tls=tls, device_auth=device_auth)
    else:
        coordinator = CoordinatorSubprocess(tls=tls, device_auth=device_auth)
    with coordinator as coord:
        with coord.admin() as admin:
            task = admin.create_task(spec)
        clients = [DeviceClient(coord.target, tls=coord.client_tls) for _ in range(4)]
        keys = [DeviceKey.generate() for _ in range(n)]
        # Every column enrolls (a coordinator without device authentication records the key
        # and asks nothing of it), so every channel is connected before the round starts.
        for i, key in enumerate(keys):
            clients[i % len(clients)].enroll(key)
        moved = [0] * n
        params = 0

        def device(i: int) -> None:
            nonlocal params
            client = clients[i % len(clients)]
            while True:
                r = client.check_in(keys[i], DeviceAttributes(), task.task_id)
                if r.outcome is CheckInOutcome.ACCEPTED:
                    break
                time.sleep(r.retry_after_s)
            p = Participation(keys[i].device_id, r.task_id, r.round_number, r.token)
            plan = client.get_plan(p)
            model = client.download_model(p, plan)
            count = sum(t.numel for t in plan.update_tensors)
            params = count
            payload = np.full(count, 1e-3, dtype="<f4").tobytes()
            header = UpdateHeader(p, 10, list(plan.update_tensors), len(payload),
                                  sha256_hex(payload), {"train_loss": 1.0})
            client.upload_update(header, payload, plan.max_chunk_bytes)
            moved[i] = len(model) + len(payload)

        assert coord.proc is not None
        cpu_before = cpu_seconds(coord.proc.pid)
        wall = run_devices(n, device)
        with coord.admin() as admin:
            deadline = time.monotonic() + 60
            while admin.get_task(task.task_id).state != "completed":
                assert time.monotonic() < deadline, "round did not commit"
                time.sleep(0.01)
            wall_commit = wall  # the last upload's response comes after the commit
            rounds = admin.list_rounds(task.task_id)
        cpu = cpu_seconds(coord.proc.pid) - cpu_before
        for c in clients:
            c.close()
    assert rounds[0].state == "committed"
    return {"wall_s": wall_commit, "coordinator_cpu_s": cpu, "bytes": float(sum(moved)),
            "params": float(params),
            "model_bytes": float(moved[0] - params * 4)}


def bare(n: int, down_bytes: int, up_bytes: int) -> float:
    with BareServer() as server:
        channels = [grpc.insecure_channel(server.target,
                                          options=[("grpc.max_receive_message_length", 2 << 20)])
                    for _ in range(4)]
        payload = np.full(up_bytes // 4, 1e-3, dtype="<f4").tobytes()

        def device(i: int) -> None:
            ch = channels[i % len(channels)]
            ident = lambda b: b  # noqa: E731
            down = ch.unary_stream("/bare.Bare/Download", ident, ident)
            got = sum(len(c) for c in down(down_bytes.to_bytes(8, "little")
                                           + CHUNK.to_bytes(8, "little"), timeout=120))
            assert got == down_bytes
            up = ch.stream_unary("/bare.Bare/Upload", ident, ident)
            view = memoryview(payload)
            up(iter([bytes(view[j:j + CHUNK]) for j in range(0, len(view), CHUNK)]), timeout=120)

        wall = run_devices(n, device)
        for c in channels:
            c.close()
    return wall


async def _aio_stream(target: str, total_bytes: int, streams: int) -> float:
    options = [("grpc.max_receive_message_length", 2 * CHUNK),
               ("grpc.max_send_message_length", 2 * CHUNK)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        ident = lambda b: b  # noqa: E731
        download = channel.unary_stream("/bare.Bare/Download", ident, ident)
        upload = channel.stream_unary("/bare.Bare/Upload", ident, ident)
        await upload(iter([b"connect"]))  # the connection is made before the clock starts
        block = bytes(CHUNK)
        per_stream = total_bytes // 2 // streams

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, per_stream, CHUNK):
                yield block[:min(CHUNK, per_stream - start)]

        async def one() -> None:
            got = 0
            async for chunk in download(per_stream.to_bytes(8, "little")
                                        + CHUNK.to_bytes(8, "little")):
                got += len(chunk)
            assert got == per_stream
            await upload(chunks())

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(streams)))
        return time.perf_counter() - started


def aio_stream_floor(total_bytes: int, streams: int = 4) -> float:
    """The machine's floor: seconds a plain grpc.aio client takes to move ``total_bytes``
    through a grpc.aio server with no logic (:class:`BareServer`), half down and half up,
    in 1 MiB messages on ``streams`` concurrent streams of one channel."""
    with BareServer() as server:
        return asyncio.run(_aio_stream(server.target, total_bytes, streams))


def git_commit(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--",
                            "coordinator", "core", "protos", "fedctl"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def main_round_path(args: argparse.Namespace) -> None:
    """``--round-path``: the plaintext round against the machine's floor (the same bytes
    over a plain grpc.aio stream in 1 MiB messages), measured in the same run, each repeat
    alternating the trees (``--before-tree``: an earlier version, served the same way)."""
    trees: dict[str, Path | None] = {"after": None}
    if args.before_tree is not None:
        trees = {"before": args.before_tree, "after": None}
    load_before = machine_load()
    walls: dict[str, list[float]] = {name: [] for name in trees}
    cpus: dict[str, list[float]] = {name: [] for name in trees}
    floors: list[float] = []
    threads: list[float] = []
    order: list[str] = []
    first: dict[str, float] = {}
    for r in range(args.repeats):
        names = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in names:
            result = ours(args.devices, tree=trees[name])
            first = first or result
            walls[name].append(result["wall_s"])
            cpus[name].append(result["coordinator_cpu_s"])
            order.append(name)
        moved = int(first["bytes"])
        floors.append(aio_stream_floor(moved))
        threads.append(bare(args.devices, int(first["model_bytes"]), int(first["params"]) * 4))
    floor = statistics.median(floors)
    moved = int(first["bytes"])
    print(json.dumps({
        "benchmark": "round_overhead",
        "mode": "round_path",
        "devices": args.devices,
        "repeats": args.repeats,
        "column": "plaintext: no TLS, --no-device-auth",
        "model_params": int(first["params"]),
        "bytes_moved": moved,
        "trees": {name: git_commit(tree if tree is not None else ROOT)
                  for name, tree in trees.items()},
        "order": order,
        "round_wall_s": {name: spread(ws) for name, ws in walls.items()},
        "round_wall_s_runs": {name: [round(w, 3) for w in ws] for name, ws in walls.items()},
        "coordinator_cpu_s": {name: spread(cs) for name, cs in cpus.items()},
        "floor": "plain grpc.aio stream, 1 MiB messages, 4 streams on one channel, half the "
                 "bytes down and half up",
        "floor_wall_s": spread(floors),
        "floor_mb_per_s": round(moved / floor / 1e6, 1),
        "ratio_to_floor": {name: round(statistics.median(ws) / floor, 2)
                           for name, ws in walls.items()},
        "target_ratio_to_floor": 1.5,
        "bare_threads": "the round's client pattern with no logic: 100 grpcio threads on 4 "
                        "channels, one download and one upload stream each",
        "bare_threads_wall_s": spread(threads),
        "limits": LIFTED_LIMITS_NOTE,
        "load_avg_1_5_15_before": load_before,
        "load_avg_1_5_15_after": machine_load(),
        "cpus": os.cpu_count(),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds per column, the columns alternating; medians reported")
    parser.add_argument("--observability", choices=["off", "on", "both"], default="off",
                        help="off: the four columns as deployed without observability "
                             "settings (the default); on: the same with /metrics scraped and "
                             "a Kafka sink; both: one column per mode of OBS_MODES (nosinks, "
                             "off, on) of --variant, interleaved")
    parser.add_argument("--variant", choices=list(VARIANTS), default="plaintext",
                        help="with --observability both: the variant the modes run")
    parser.add_argument("--round-path", action="store_true",
                        help="the plaintext round only, against the machine's floor (a plain "
                             "grpc.aio stream of the same bytes in 1 MiB messages) measured "
                             "in the same run")
    parser.add_argument("--before-tree", type=Path, default=None,
                        help="with --round-path: also serve rounds from this source tree "
                             "(e.g. a git worktree of an earlier commit), alternating")
    add_broker_and_mode_args(parser)
    args = parser.parse_args()
    if args.round_path:
        main_round_path(args)
        return
    if args.observability == "both":
        main_both(args)
        return
    load_before = machine_load()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    observed: list[ObservedCoordinator] = []
    with contextlib.ExitStack() as stack:
        kafka = (stack.enter_context(KafkaBroker(args.broker_storage)).address
                 if args.observability == "on" else "")
        for _ in range(args.repeats):
            for name, (tls, device_auth) in VARIANTS.items():
                runs[name].append(ours(args.devices, tls=tls, device_auth=device_auth,
                                       mode="on" if kafka else "", kafka=kafka,
                                       observed=observed))
    result = runs["plaintext"][0]
    wall = {name: statistics.median(r["wall_s"] for r in rs) for name, rs in runs.items()}
    plain = wall["plaintext"]
    model_bytes = int(result["model_bytes"])
    update_bytes = int(result["params"]) * 4
    floor = bare(args.devices, model_bytes, update_bytes)
    print(json.dumps({
        "benchmark": "round_overhead",
        "devices": args.devices,
        "repeats": args.repeats,
        "columns": {"plaintext": "no TLS, --no-device-auth", "tls": "TLS, --no-device-auth",
                    "auth": "no TLS, enrolled keys, signed check-ins",
                    "secured": "TLS, enrolled keys, signed check-ins"},
        "model_params": int(result["params"]),
        "round_wall_s": round(plain, 3),
        "round_wall_s_tls": round(wall["tls"], 3),
        "round_wall_s_auth": round(wall["auth"], 3),
        "round_wall_s_secured": round(wall["secured"], 3),
        "round_wall_s_runs": {name: [round(r["wall_s"], 3) for r in rs]
                              for name, rs in runs.items()},
        "bytes_moved": int(result["bytes"]),
        "bare_grpc_stream_wall_s": round(floor, 3),
        "ratio_to_bare": round(plain / floor, 2),
        "tls_ratio": round(wall["tls"] / plain, 3),
        "auth_ratio": round(wall["auth"] / plain, 3),
        "secured_ratio": round(wall["secured"] / plain, 3),
        "limits": LIFTED_LIMITS_NOTE,
        "secured_target_ratio": 1.3,
        "observability": args.observability,
        "observability_mode": OBS_MODES[args.observability],
        **({"kafka": kafka_totals(observed),
            "scrapes": sum(c.scraper.scrapes for c in observed if c.scraper is not None)}
           if observed else {}),
        "load_avg_1_5_15_before": load_before,
        "load_avg_1_5_15_after": machine_load(),
    }))


def main_both(args: argparse.Namespace) -> None:
    """``--observability both``: rounds of ``--variant`` in every mode of OBS_MODES, a fresh
    coordinator each, interleaved (nosinks, off, on, then on, off, nosinks, ...)."""
    tls, device_auth = VARIANTS[args.variant]
    modes = parse_modes(args.modes)
    load_before = machine_load()
    walls: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    order: list[str] = []
    observed: list[ObservedCoordinator] = []
    first: dict[str, float] = {}
    with KafkaBroker(args.broker_storage) as broker:
        for r in range(args.repeats):
            for m in mode_order(r, modes):
                result = ours(args.devices, tls=tls, device_auth=device_auth, mode=m,
                              kafka=broker.address, observed=observed)
                first = first or result
                walls[m].append(result["wall_s"])
                cpus[m].append(result["coordinator_cpu_s"])
                order.append(m)
    on = [c for c in observed if c.mode == "on"]
    scraped = [c for c in observed if c.scraper is not None]
    kafka = kafka_totals(on)
    floor = bare(args.devices, int(first["model_bytes"]), int(first["params"]) * 4)
    median = {m: statistics.median(ws) for m, ws in walls.items()}
    cpu_median = {m: statistics.median(v) for m, v in cpus.items()}
    # Wall time: overhead is how much longer a round takes.
    overhead = median["on"] / median["off"] - 1
    print(json.dumps({
        "benchmark": "round_overhead",
        "observability": "both",
        "variant": args.variant,
        "modes": OBS_MODES,
        "devices": args.devices,
        "repeats": args.repeats,
        "model_params": int(first["params"]),
        "order": order,
        "round_wall_s": {m: spread(ws) for m, ws in walls.items()},
        "round_wall_s_runs": {m: [round(w, 3) for w in ws] for m, ws in walls.items()},
        "on_off_ratio": round(median["on"] / median["off"], 3),
        "overhead_on_vs_off": round(overhead, 3),
        # Longer rounds than off, per mode.
        "overhead_vs_off": {m: round(median[m] / median["off"] - 1, 3) for m in modes},
        "coordinator_cpu_s": {m: spread(v) for m, v in cpus.items()},
        "cpu_overhead_on_vs_off": round(cpu_median["on"] / cpu_median["off"] - 1, 3),
        # More coordinator CPU per round than off, per mode.
        "cpu_overhead_vs_off": {m: round(cpu_median[m] / cpu_median["off"] - 1, 3)
                                for m in modes},
        "target_overhead": 0.05,
        "within_target": overhead <= 0.05,
        "cpu_within_target": cpu_median["on"] / cpu_median["off"] - 1 <= 0.05,
        "kafka": kafka,
        "kafka_all_sent": (kafka["sent"] == kafka["queued"] and kafka["dropped"] == 0
                           and kafka["failed"] == 0 and kafka["queued"] > 0),
        "scrapes": sum(c.scraper.scrapes for c in scraped if c.scraper is not None),
        "scrape_errors": sum(c.scraper.errors for c in scraped if c.scraper is not None),
        "bare_grpc_stream_wall_s": round(floor, 3),
        "limits": LIFTED_LIMITS_NOTE,
        "broker_storage": args.broker_storage,
        "load_avg_1_5_15_before": load_before,
        "load_avg_1_5_15_after": machine_load(),
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
