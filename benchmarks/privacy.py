"""Cost of differential privacy. Prints one JSON line per setting:

- ``local_dp_deployed`` (``--only deployed``, run first): local DP-SGD as device agents run
  it (the ``fused`` mode, noise from the secure source, ``local_dp_secure_noise=True``, drawn
  by the agent's noise worker process when it pays) against a non-private epoch, on the 54k
  and 199k MLPs at batch 10 and 64. Per setting: wall seconds per epoch and CPU seconds of the
  whole process tree (this process's threads, ``time.process_time``, plus the helper
  processes it started, from ``/proc/<pid>/task/*/schedstat``, and any reaped children,
  ``RUSAGE_CHILDREN``; the helpers' share of the private CPU apart), median, min and max over
  ``--runs`` runs with the non-private and the private epoch interleaved, the ratios of the
  medians, and the load average before and after. One JSON line per setting on stdout,
  appended to
  ``benchmarks/results/privacy-<date>.jsonl`` (``--out``).
- ``noise_fill`` (``--only noise``): CPU nanoseconds per coordinate of a DP-SGD step's noise
  from the secure source (hardened as devices draw it, and not), of its AES-CTR keystream
  alone, of the float32 log, sin and cos a hardened coordinate needs (the transform's
  floor), of the same transform as one C function compiled here with gcc (what a native
  kernel would cost), and of torch's (non-cryptographic) ``normal_`` for reference; same
  output.
- ``local_dp``: one epoch of DP-SGD (our ``fused`` Opacus mode, one-pass clipping, and
  each of Opacus's own grad-sample modes) against one epoch of non-private training
  (core.training.train_local), on scikit-learn's digits (1797 examples), for MLPs of ~5k,
  ~54k and ~199k parameters and the CNN (whose convolutions ``fused`` clips through
  Opacus's grad-sampler registry), at batch sizes 10 and 64. Wall
  and CPU times (all threads: ``fused`` draws noise on a second thread) are the best of
  ``--repeats`` after a warm-up, with one torch thread; the non-private and the private
  epoch alternate, so a shared machine's slow spells hit both sides of each ratio.
- ``central_dp``: a round's coordinator aggregation (FedAvg weighted mean of 100 updates of
  100k float32 parameters) against central DP on the same updates (clip each, sum, secure
  Gaussian noise, accountant check for the next round), with the overhead of each part.
- ``central_dp_round`` (``--round``): the whole coordinator over gRPC, 100 devices in 4 agent
  processes, a ~112k-parameter MLP: the same task with and without central DP (run plain,
  DP, DP, plain); the coordinator process's CPU seconds per round and the rounds' wall time. This is "a round's
  coordinator time": checking, spooling and folding 100 uploads, the database, the commit.

    python benchmarks/privacy.py --only deployed [--runs 5] [--out FILE] [--label TEXT]
    python benchmarks/privacy.py --only noise [--runs 5] [--out FILE] [--label TEXT]
    python benchmarks/privacy.py --summarize benchmarks/results/privacy-2026-12-07b.jsonl
    python benchmarks/privacy.py [--repeats 3] [--only local|central|round]
        [--models mlp-54k,cnn] [--modes fused,hooks]   (local: a subset of the rows)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.aggregation.fedavg import StreamingWeightedMean  # noqa: E402
from core.models import build_model  # noqa: E402
from core.privacy import ClippedSum, NoiseSource, epsilon  # noqa: E402
from core.training import train_local  # noqa: E402
from core.types import LocalTraining, ModelSpec  # noqa: E402
from device_agent.training.local_dp import GradSampleMode, train_local_dp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

MODELS = {
    "mlp-64-64-10": ModelSpec("mlp", {"input_dim": 64, "hidden": [64], "num_classes": 10}),
    "mlp-54k": ModelSpec("mlp", {"input_dim": 64, "hidden": [512, 40], "num_classes": 10}),
    "mlp-64-200-200-10": ModelSpec("mlp", {"input_dim": 64, "hidden": [200, 200],
                                           "num_classes": 10}),
    "mlp-199k": ModelSpec("mlp", {"input_dim": 64, "hidden": [512, 256, 128],
                                  "num_classes": 10}),
    "cnn": ModelSpec("cnn", {}),
}


def best_of(repeats: int, run: Callable[[], object]) -> float:
    return best_of_wall_cpu(repeats, run)[0]


def best_of_wall_cpu(repeats: int, run: Callable[[], object]) -> tuple[float, float]:
    """Best wall seconds and best CPU seconds (all threads of the process) of ``repeats``
    runs after a warm-up."""
    run()  # warm-up: first-call allocations, Opacus imports
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def paired_best(repeats: int, first: Callable[[], object], second: Callable[[], object]
                ) -> tuple[tuple[float, float], tuple[float, float]]:
    """Best (wall, CPU) seconds of each of two runs, alternated ``repeats`` times after a
    warm-up of each: a shared machine's slow spells then hit both sides of a ratio."""
    first()
    second()
    best = [[math.inf, math.inf], [math.inf, math.inf]]
    for _ in range(repeats):
        for side, run in enumerate((first, second)):
            start, cpu = time.perf_counter(), time.process_time()
            run()
            best[side][0] = min(best[side][0], time.perf_counter() - start)
            best[side][1] = min(best[side][1], time.process_time() - cpu)
    return (best[0][0], best[0][1]), (best[1][0], best[1][1])


#: (label, grad-sample mode, keyword arguments): every Opacus mode, and ``fused`` as it runs
#: by default (noise drawn ahead on a second thread on a multi-core machine, for models of
#: 32k parameters and up), in line, and from the secure (AES-CTR) source as production
#: devices draw it.
LOCAL_VARIANTS: list[tuple[str, GradSampleMode, dict[str, bool]]] = [
    ("fused", GradSampleMode.FUSED, {}),
    ("fused-inline", GradSampleMode.FUSED, {"prefetch_noise": False}),
    ("fused-secure", GradSampleMode.FUSED, {"secure_mode": True}),
    *[(mode.value, mode, {}) for mode in GradSampleMode if mode is not GradSampleMode.FUSED],
]


def local_dp(repeats: int, models: list[str] | None = None,
             modes: list[str] | None = None) -> None:
    from sklearn.datasets import load_digits

    # Agents keep their noise worker process between rounds: start it before timing.
    from device_agent.training.noise_worker import NoiseWorker

    worker = NoiseWorker.claim(wait=60.0)
    if worker is not None:
        worker.finish()
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    for name, spec in MODELS.items():
        if models and name not in models:
            continue
        params = sum(p.numel() for p in build_model(spec).parameters())
        for batch in (10, 64):
            config = LocalTraining(epochs=1, batch_size=batch, learning_rate=0.05)

            def plain() -> None:
                train_local(build_model(spec), x, y, config, seed=0)  # noqa: B023

            for label, mode, kwargs in LOCAL_VARIANTS:
                if modes and label not in modes:
                    continue

                def private(mode: GradSampleMode = mode, kwargs: dict[str, bool] = kwargs
                            ) -> None:
                    train_local_dp(build_model(spec), x, y, config, noise_multiplier=1.0,  # noqa: B023
                                   max_grad_norm=1.0, delta=1e-5, seed=0, grad_sample_mode=mode,
                                   **kwargs)

                try:
                    (base, base_cpu), (dp, dp_cpu) = paired_best(repeats, plain, private)
                except Exception as exc:  # noqa: BLE001 - reported as the setting's result
                    print(json.dumps({"bench": "local_dp", "model": name, "batch": batch,
                                      "mode": label, "error": repr(exc)[:200]}), flush=True)
                    continue
                print(json.dumps({
                    "bench": "local_dp", "model": name, "params": params, "batch": batch,
                    "mode": label, "plain_epoch_s": round(base, 4),
                    "dp_epoch_s": round(dp, 4), "ratio": round(dp / base, 2),
                    "plain_cpu_s": round(base_cpu, 4), "dp_cpu_s": round(dp_cpu, 4),
                    "cpu_ratio": round(dp_cpu / base_cpu, 2)}), flush=True)


#: The models and batch sizes of issue 19's target for local DP as deployed.
DEPLOYED_MODELS = ("mlp-54k", "mlp-199k")
DEPLOYED_BATCHES = (10, 64)


def _helper_pids() -> list[int]:
    """Live processes this process started (the noise worker), read from /proc."""
    import psutil

    return [child.pid for child in psutil.Process().children(recursive=True)]


def _task_cpu_s(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` (``schedstat``: nanoseconds, unlike ``stat``'s
    10 ms ticks, which are coarser than a 30 ms epoch); 0 once it is gone."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def tree_cpu_s() -> tuple[float, float]:
    """CPU seconds so far of (this process, all its threads; its live helper processes and
    its reaped children): every process and thread a training call can use."""
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (time.process_time(), sum(_task_cpu_s(pid) for pid in _helper_pids())
            + reaped.ru_utime + reaped.ru_stime)


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 5), "min": round(min(values), 5),
            "max": round(max(values), 5)}


def local_dp_deployed(runs: int, out: Path | None, label: str = "") -> None:
    """Local DP-SGD as agents run it against non-private training: see the module
    docstring. Each run times one non-private and one private epoch, alternating which goes
    first, after one warm-up of each."""
    from sklearn.datasets import load_digits

    # Agents keep their noise worker process between rounds: start it before timing.
    from device_agent.training.noise_worker import NoiseWorker

    worker = NoiseWorker.claim(wait=60.0)
    if worker is not None:
        worker.finish()
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    for name in DEPLOYED_MODELS:
        spec = MODELS[name]
        params = sum(p.numel() for p in build_model(spec).parameters())
        for batch in DEPLOYED_BATCHES:
            config = LocalTraining(epochs=1, batch_size=batch, learning_rate=0.05)

            def plain() -> None:
                train_local(build_model(spec), x, y, config, seed=0)  # noqa: B023

            def private() -> None:
                # The agent's call (device_agent/runtime/device.py) with its defaults.
                train_local_dp(build_model(spec), x, y, config, noise_multiplier=1.0,  # noqa: B023
                               max_grad_norm=1.0, delta=1e-5, seed=0, secure_mode=True)

            load_before = os.getloadavg()
            plain()
            private()
            times: dict[str, list[tuple[float, float, float]]] = {"plain": [], "private": []}
            for index in range(runs):
                order = (("plain", plain), ("private", private))
                for side, run in order if index % 2 == 0 else order[::-1]:
                    start, (own, helpers) = time.perf_counter(), tree_cpu_s()
                    run()
                    own_end, helpers_end = tree_cpu_s()
                    times[side].append((time.perf_counter() - start, own_end - own,
                                        helpers_end - helpers))
            load_after = os.getloadavg()
            wall = {side: [w for w, _, _ in runs_] for side, runs_ in times.items()}
            cpu = {side: [o + h for _, o, h in runs_] for side, runs_ in times.items()}
            helper_cpu = [h for _, _, h in times["private"]]
            line = {
                "bench": "local_dp_deployed", "date": datetime.date.today().isoformat(),
                "model": name, "params": params, "batch": batch,
                "mode": "fused, secure noise (local_dp_secure_noise=True)", "runs": runs,
                "plain_wall_s": _summary(wall["plain"]),
                "private_wall_s": _summary(wall["private"]),
                "plain_cpu_s": _summary(cpu["plain"]),
                "private_cpu_s": _summary(cpu["private"]),
                # Of which the noise worker process (and any other helper): drawing noise.
                "private_helper_cpu_s": _summary(helper_cpu),
                "wall_ratio": round(statistics.median(wall["private"])
                                    / statistics.median(wall["plain"]), 3),
                "cpu_ratio": round(statistics.median(cpu["private"])
                                   / statistics.median(cpu["plain"]), 3),
                "wall_ratio_per_run": _summary([p / q for p, q in zip(
                    wall["private"], wall["plain"], strict=True)]),
                "cpu_ratio_per_run": _summary([p / q for p, q in zip(
                    cpu["private"], cpu["plain"], strict=True)]),
                "loadavg_1m_before": round(load_before[0], 2),
                "loadavg_1m_after": round(load_after[0], 2),
                "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "git": _git_head(), "label": label,
            }
            _emit(line, out)


def _git_head() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


#: The hardened transform of ``core.privacy.noise.fill_gaussian_`` (same keystream layout,
#: pairing and float32 arithmetic) as one C function, for ``--only noise`` only: what a fused
#: native kernel would cost. Built with ``-ffast-math`` so that gcc calls glibc's vectorized
#: ``logf``, ``sinf`` and ``cosf`` (libmvec, AVX2); the int64 conversion has its own loop, as
#: AVX2 has no vector form of it.
_NATIVE_FILL_C = r"""
#include <math.h>
#include <stdint.h>
#define STRIP 4096
void fill(const unsigned char *raw, long pairs, float *dest, float *sines, float scale2) {
    const int64_t *w = (const int64_t *)raw;
    const int32_t *a = (const int32_t *)(raw + 8 * pairs);
    float u[STRIP], r[STRIP], t[STRIP];
    for (long b = 0; b < pairs; b += STRIP) {
        int n = pairs - b < STRIP ? (int)(pairs - b) : STRIP;
        for (int i = 0; i < n; i++) u[i] = fabsf((float)w[b + i]);
        for (int i = 0; i < n; i++)
            r[i] = sqrtf(-2.0f * scale2 * logf((u[i] + 0.5f) * 0x1p-63f));
        for (int i = 0; i < n; i++) t[i] = (float)a[b + i] * (float)(M_PI * 0x1p-31);
        for (int i = 0; i < n; i++) dest[b + i] = r[i] * cosf(t[i]);
        for (int i = 0; i < n; i++) sines[b + i] = r[i] * sinf(t[i]);
    }
    for (long i = 0; i + 1 < pairs; i++) dest[i] += sines[i + 1];
    dest[pairs - 1] += sines[0];
}
"""


def _native_fill() -> Callable[[torch.Tensor, float, bytes | None], None] | None:
    """``fill(block, std, key)``: the C transform over AES-256-CTR keystream (a fresh key when
    ``key`` is None), 2^16 coordinates a pass as ``fill_gaussian_``; None without gcc or
    AVX2. Compiled into a private temporary directory."""
    import ctypes
    import shutil
    import subprocess
    import tempfile

    from core.privacy.noise import _CHUNK, _aes_ctr

    gcc = shutil.which("gcc")
    if gcc is None or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    directory = Path(tempfile.mkdtemp(prefix="fedcoord-native-noise-"))
    (directory / "fill.c").write_text(_NATIVE_FILL_C)
    try:
        subprocess.run([gcc, "-O3", "-mavx2", "-mfma", "-ffast-math", "-fPIC", "-shared",
                        str(directory / "fill.c"), "-o", str(directory / "fill.so"), "-lm"],
                       check=True, capture_output=True)
    except subprocess.CalledProcessError:
        return None
    kernel = ctypes.CDLL(str(directory / "fill.so")).fill
    kernel.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_float]
    raw = bytearray(12 * _CHUNK)
    address = ctypes.addressof((ctypes.c_char * len(raw)).from_buffer(raw))
    zeros = memoryview(bytes(12 * _CHUNK))
    sines = torch.empty(_CHUNK)

    def fill(block: torch.Tensor, std: float, key: bytes | None) -> None:
        flat = block.view(-1)
        encryptor = _aes_ctr(key)
        for first in range(0, flat.numel(), _CHUNK):
            pairs = min(flat.numel() - first, _CHUNK)
            encryptor.update_into(zeros[:12 * pairs], raw)
            kernel(address, pairs, flat[first:].data_ptr(), sines.data_ptr(), std * std / 2)

    return fill


def noise_fill(runs: int, out: Path | None, label: str = "") -> None:
    """CPU nanoseconds per coordinate of a step's noise (``--only noise``), for a 54k and a
    199k vector, 20 steps a draw as the agent's blocks: the secure fill as devices draw it
    (hardened), unhardened, its AES-256-CTR keystream alone (12 bytes a coordinate) and
    AES-128's for comparison, one float32 log, sin and cos a coordinate (what any
    Box-Muller fill computes: with the AES bytes, the floor of the secure fill in torch ops),
    the same hardened transform as one C function (``native_c_hardened``, where gcc and AVX2
    are there; its largest difference from the fill under one fixed key beside it), and
    torch's own ``normal_`` (Mersenne Twister: not a CSPRNG) as a reference. Median and
    min over ``runs`` interleaved runs."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from core.privacy.noise import fill_gaussian_

    chunk_in = torch.rand(1 << 16) + 0.5
    chunk_out = torch.empty(1 << 16)
    native = _native_fill()
    for name, numel in (("mlp-54k", 54_210), ("mlp-199k", 198_794)):
        block = torch.empty(20 * numel)
        raw = bytearray(12 * block.numel() + 16)
        zeros = bytes(12 * block.numel())

        def keystream(key_bytes: int) -> None:
            encryptor = Cipher(algorithms.AES(os.urandom(key_bytes)),  # noqa: B023
                               modes.CTR(bytes(16))).encryptor()
            encryptor.update_into(zeros, raw)  # noqa: B023

        def transcendentals() -> None:
            # The floor of any Box-Muller fill: one float32 log, sin and cos a coordinate
            # (hardened: one pair a coordinate), 2^16 at a time as the fill does.
            for _ in range(0, block.numel(), chunk_in.numel()):  # noqa: B023
                torch.log(chunk_in, out=chunk_out)
                torch.sin(chunk_in, out=chunk_out)
                torch.cos(chunk_in, out=chunk_out)

        variants: dict[str, Callable[[], object]] = {
            "secure_hardened": lambda: fill_gaussian_(  # noqa: B023
                block, stddev=1.0, source=NoiseSource.secure()),  # noqa: B023
            "secure_unhardened": lambda: fill_gaussian_(  # noqa: B023
                block, stddev=1.0, source=NoiseSource.secure(), hardened=False),  # noqa: B023
            "aes256_ctr_12_bytes": lambda: keystream(32),
            "aes128_ctr_12_bytes": lambda: keystream(16),
            "float32_log_sin_cos": transcendentals,
            "torch_normal_mt19937": lambda: block.normal_(),  # noqa: B023
        }
        native_error = None
        if native is not None:
            variants["native_c_hardened"] = lambda: native(block, 1.0, None)  # noqa: B023
            # The same transform: under one fixed key it must give fill_gaussian_'s noise.
            key = bytes(range(32))
            fill_gaussian_(block, stddev=1.0, source=NoiseSource._fixed_key_for_tests(key))
            expected = block.clone()
            native(block, 1.0, key)
            native_error = (block - expected).abs().max().item()
        times: dict[str, list[float]] = {key: [] for key in variants}
        for run in variants.values():
            run()
        load_before = os.getloadavg()
        for _ in range(runs):
            for key, run in variants.items():
                cpu = time.process_time()
                run()
                times[key].append((time.process_time() - cpu) / block.numel() * 1e9)
        line = {"bench": "noise_fill", "date": datetime.date.today().isoformat(),
                "model": name, "coordinates": numel, "runs": runs,
                "ns_per_coordinate": {key: _summary(values) for key, values in times.items()},
                "native_c_max_abs_difference": native_error,
                "loadavg_1m_before": round(load_before[0], 2),
                "loadavg_1m_after": round(os.getloadavg()[0], 2), "git": _git_head(),
                "label": label}
        _emit(line, out)


#: Examples in scikit-learn's digits, which ``local_dp_deployed`` trains on (one epoch).
DIGITS_EXAMPLES = 1797
#: The issue-19 targets for local DP as deployed: private / non-private epoch.
TARGET_WALL_RATIO, TARGET_CPU_RATIO = 1.5, 1.6


def summarize(path: Path) -> None:
    """``--summarize FILE``: one JSON line per setting of a results file, pooling its passes
    (every label): for ``local_dp_deployed``, the passes' wall and CPU ratios (min, max,
    median), the trainer's and the noise worker's CPU over the non-private epoch's, and the
    CPU a coordinate of one step that all of DP may add within the CPU target
    (``(TARGET_CPU_RATIO - 1)`` x the non-private epoch's CPU / steps / parameters); for
    ``noise_fill``, each variant's per-pass medians. What the README's tables quote."""
    deployed: dict[tuple[str, int], list[dict[str, Any]]] = {}
    noise: dict[str, list[dict[str, Any]]] = {}
    for text in path.read_text().splitlines():
        line = json.loads(text)
        if line["bench"] == "local_dp_deployed":
            deployed.setdefault((line["model"], line["batch"]), []).append(line)
        elif line["bench"] == "noise_fill":
            noise.setdefault(line["model"], []).append(line)
    for (model, batch), passes in deployed.items():
        plain = [p["plain_cpu_s"]["median"] for p in passes]
        helper = [p["private_helper_cpu_s"]["median"] for p in passes]
        trainer = [p["private_cpu_s"]["median"] - h for p, h in zip(passes, helper, strict=True)]
        steps = math.ceil(DIGITS_EXAMPLES / batch)
        print(json.dumps({
            "summary": "local_dp_deployed", "file": path.name, "model": model, "batch": batch,
            "passes": len(passes), "labels": sorted({p["label"].split(", pass")[0] for p in passes}),
            "wall_ratio": _summary([p["wall_ratio"] for p in passes]),
            "cpu_ratio": _summary([p["cpu_ratio"] for p in passes]),
            "trainer_cpu_ratio": _summary([t / q for t, q in zip(trainer, plain, strict=True)]),
            "noise_worker_cpu_ratio": _summary([h / q for h, q in zip(helper, plain,
                                                                       strict=True)]),
            "dp_budget_ns_per_coordinate_step": _summary(
                [(TARGET_CPU_RATIO - 1) * q / steps / passes[0]["params"] * 1e9 for q in plain]),
            "loadavg_1m": _summary([p[key] for p in passes
                                    for key in ("loadavg_1m_before", "loadavg_1m_after")]),
        }), flush=True)
    for model, passes in noise.items():
        variants = {key for p in passes for key in p["ns_per_coordinate"]}
        print(json.dumps({
            "summary": "noise_fill", "file": path.name, "model": model, "passes": len(passes),
            "ns_per_coordinate": {key: _summary([p["ns_per_coordinate"][key]["median"]
                                                 for p in passes if key in p["ns_per_coordinate"]])
                                  for key in sorted(variants)},
        }), flush=True)


def _emit(line: dict[str, object], out: Path | None) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as results:
            results.write(text + "\n")


def central_dp(repeats: int, devices: int = 100, size: int = 100_000) -> None:
    rng = np.random.default_rng(0)
    updates = [rng.normal(scale=0.01, size=size).astype(np.float32) for _ in range(devices)]
    weights = rng.integers(10, 200, size=devices).astype(float)
    source = NoiseSource.secure()

    def aggregate() -> None:
        acc = StreamingWeightedMean(size)
        for update, weight in zip(updates, weights, strict=True):
            acc.add_chunk(0, update, float(weight))
            acc.finish_update(float(weight))
        acc.mean()

    def clipped_sum() -> ClippedSum:
        acc = ClippedSum(size, l2_clip_norm=0.5)
        for update in updates:
            acc.add(update)
        return acc

    filled = clipped_sum()

    def noise() -> None:
        filled.release_mean(noise_multiplier=1.0, source=source)

    round_no = iter(range(1, 10**9))

    def accountant() -> None:
        # The budget check before each round: epsilon after one more round.
        epsilon(noise_multiplier=1.0, sampling_rate=0.01, steps=next(round_no), delta=1e-5)

    t_agg = best_of(repeats, aggregate)
    t_clip = best_of(repeats, clipped_sum)
    t_noise = best_of(repeats, noise)
    t_acc = best_of(repeats, accountant)
    start = time.perf_counter()
    epsilon(noise_multiplier=1.01, sampling_rate=0.01, steps=1, delta=1e-5)
    t_acc_cold = time.perf_counter() - start
    dp_total = t_clip + t_noise + t_acc
    print(json.dumps({
        "bench": "central_dp", "devices": devices, "params": size,
        "aggregation_s": round(t_agg, 5), "clipped_sum_s": round(t_clip, 5),
        "noise_s": round(t_noise, 5), "accountant_s": round(t_acc, 6),
        "accountant_first_call_s": round(t_acc_cold, 4),
        "overhead_vs_aggregation": round(dp_total / t_agg - 1, 3),
        "overhead_noise_and_accountant": round((t_noise + t_acc) / t_agg, 3)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["deployed", "noise", "local", "central", "round"])
    parser.add_argument("--runs", type=int, default=5,
                        help="deployed: interleaved runs per setting (at least 3)")
    parser.add_argument("--out", type=Path, default=RESULTS / f"privacy-{datetime.date.today()}"
                        ".jsonl", help="deployed: JSON lines appended here ('-': none)")
    parser.add_argument("--label", default="", help="deployed: a tag kept in each line "
                        "(e.g. before / after a change)")
    parser.add_argument("--models", help="local: comma-separated, of " + ",".join(MODELS))
    parser.add_argument("--modes", help="local: comma-separated, of " + ",".join(
        label for label, _, _ in LOCAL_VARIANTS))
    parser.add_argument("--summarize", type=Path, metavar="FILE",
                        help="print the pooled passes of a results file (deployed, noise) "
                        "and exit")
    args = parser.parse_args()
    if args.summarize is not None:
        if not args.summarize.is_file():
            parser.error(f"--summarize: no such file: {args.summarize}")
        summarize(args.summarize)
        return
    models = args.models.split(",") if args.models else None
    modes = args.modes.split(",") if args.modes else None
    for given, known in ((models or [], MODELS), (modes or [], [v[0] for v in LOCAL_VARIANTS])):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"unknown {', '.join(unknown)}; known: {', '.join(known)}")
    if args.runs < 3:
        parser.error("--runs must be at least 3 (medians of interleaved runs)")
    torch.set_num_threads(1)  # as device agents train (AgentConfig.torch_threads)
    if args.only in (None, "deployed"):
        local_dp_deployed(args.runs, None if str(args.out) == "-" else args.out, args.label)
    if args.only in (None, "noise"):
        noise_fill(args.runs, None if str(args.out) == "-" else args.out, args.label)
    if args.only in (None, "central"):
        central_dp(args.repeats)
    if args.only in (None, "round"):
        central_dp_round()
    if args.only in (None, "local"):
        local_dp(args.repeats, models, modes)


DP_CENTRAL = ("privacy: {mode: central, noise_multiplier: 1.0, delta: 1.0e-5, clip: 1.0, "
              "population: 100, sampling: fixed, max_epsilon: 1000.0}\n")


def central_dp_round(devices: int = 100, processes: int = 4, rounds: int = 4) -> None:
    from benchmarks._common import CoordinatorSubprocess
    from benchmarks.secagg_grpc import run

    # Plain, DP, DP, plain on one coordinator: a drift over the run (a growing database,
    # warmer caches) weighs on both sides alike.
    runs: dict[str, list[tuple[list[float], float]]] = {"plain": [], "dp": []}
    with CoordinatorSubprocess() as coord:
        for index, kind in enumerate(("plain", "dp", "dp", "plain")):
            runs[kind].append(run(coord, f"{kind}{index}", devices, processes, rounds,
                                  DP_CENTRAL if kind == "dp" else "", measure_cpu=True))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    # Round 1 of each task includes its start-up.
    plain, private = ([t for times, _ in runs[k] for t in times[1:]] for k in ("plain", "dp"))
    plain_cpu, dp_cpu = (mean([cpu for _, cpu in runs[k]]) for k in ("plain", "dp"))
    steady = mean
    print(json.dumps({
        "bench": "central_dp_round", "devices": devices, "params": 112_520,
        "coordinator_cpu_s_per_round_plain": round(plain_cpu, 3),
        "coordinator_cpu_s_per_round_dp": round(dp_cpu, 3),
        "coordinator_overhead": round(dp_cpu / plain_cpu - 1, 3),
        "round_s_plain": round(steady(plain), 3), "round_s_dp": round(steady(private), 3),
        "round_overhead": round(steady(private) / steady(plain) - 1, 3),
    }), flush=True)


if __name__ == "__main__":
    main()
