"""Secure aggregation cost: our SecAgg+ against our plaintext round and Flower 1.42's SecAgg+.

One JSON line per setting on stdout. For each n (devices), d (parameters) and dropout:

* ``engine: fedcoord`` - one SecAgg+ round in this process (core.secagg.inprocess.run_round:
  the same client and server objects the coordinator and agents use, minus the network),
  including quantization of float updates and dequantization of the sum. Reports the
  wall time, the compute per device (mean) and on the coordinator, bytes sent and received
  per device, and the same round in plaintext (weighted float sum, as the coordinator's
  accumulator does) for the ratio. Dropouts: that fraction of devices vanish after sharing
  their keys, before uploading (the costliest case: their masks must be rebuilt).
* ``engine: flower`` - Flower 1.42's SecAggPlusWorkflow + secaggplus_mod in its simulation
  engine (benchmarks/flower_secagg.py), with the same n, d, dropout and share count, secure
  and plaintext. Needs the ``benchmark`` extra; skipped with a reason otherwise.
* ``--grpc``: one n=100 round over real gRPC with agent processes, secure against plain
  (benchmarks/_common.py starts the coordinator; agents train one epoch of a 100k-parameter
  MLP on tiny digits shards, so the protocol dominates).

Share count: Flower's ``num_shares`` (a fraction of n, default 0.1) gives its neighbours; we
use the same number of share holders (k + 1, k even), and threshold 0.5 of them, as Flower's
``reconstruction_threshold`` default here. ``--auto`` adds a line with the parameters our
coordinator derives for 2^-40 security with 5% corrupt devices and 10% dropout.

Usage: python benchmarks/secagg.py [--n 10,50,100,200] [--d 10000,100000,1000000]
       [--dropout 0,0.1] [--no-flower] [--grpc] [--auto]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.aggregation.fedavg import StreamingWeightedMean  # noqa: E402
from core.secagg import encoding  # noqa: E402
from core.secagg.inprocess import run_round  # noqa: E402
from core.secagg.messages import Stage  # noqa: E402
from core.secagg.params import SecAggConfig, SecAggParams, derive  # noqa: E402


def params_for(n: int, share_fraction: float, threshold: float) -> SecAggParams:
    holders = max(3, math.ceil(share_fraction * n))
    k = min(n - 1, holders - 1 + (holders - 1) % 2)
    t = max(2, math.ceil(threshold * (k + 1)))
    growth = math.ceil(math.log2(n))
    return SecAggParams(num_devices=n, neighbours=k, threshold=t, value_bits=32 - growth,
                        ring_bits=32, clip=1.0, weight_cap=1024, security_failure=math.nan,
                        correctness_failure=math.nan)


def bytes_per_device(p: SecAggParams, d: int) -> dict[str, int]:
    """Protocol bytes (payloads, no framing): keys, k share ciphertexts each way, the masked
    vector, and the unmasking shares."""
    share = 4 * 16  # a 32-byte secret in 16 field elements of 4 bytes
    ciphertext = 12 + 8 + 2 * share + 16  # nonce, (sender, recipient), two shares, tag
    sent = 2 * 32 + 32 + p.neighbours * (4 + ciphertext) + (d + 1) * p.ring_bits // 8 + (
        (p.neighbours + 1) * (4 + share))
    received = p.neighbours * (4 + 2 * 32 + 32) + p.neighbours * (4 + ciphertext) + (
        (p.neighbours + 1) * 4)
    return {"bytes_sent_per_device": sent, "bytes_received_per_device": received,
            "plaintext_bytes_per_device": 4 * d}


def fedcoord_round(p: SecAggParams, d: int, dropout: float, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    n = p.num_devices
    updates = {f"dev-{i}": rng.uniform(-0.5, 0.5, d).astype(np.float32) for i in range(n)}
    examples = {w: int(e) for w, e in zip(updates, rng.integers(50, 500, n), strict=True)}

    t0 = time.perf_counter()
    acc = StreamingWeightedMean(d)
    for w, u in updates.items():
        acc.add_chunk(0, u, float(examples[w]))
        acc.finish_update(float(examples[w]))
    acc.mean()
    plaintext_s = time.perf_counter() - t0

    start = time.perf_counter()
    encode_s = 0.0
    inputs = {}
    for w, u in updates.items():
        t1 = time.perf_counter()
        inputs[w] = encoding.encode_update(u, examples[w], p, rng).vector
        encode_s += time.perf_counter() - t1
    dropped = set(random.Random(seed).sample(sorted(updates), round(dropout * n)))
    out = run_round(p, inputs, context=b"bench", drops={Stage.MASKED_INPUT: dropped},
                    rng=random.Random(seed))
    t2 = time.perf_counter()
    mean, _ = encoding.decode_mean(out.result.total, len(out.result.survivors), p)
    decode_s = time.perf_counter() - t2
    wall = time.perf_counter() - start
    survivors = out.result.survivors
    w = np.array([examples[s] for s in survivors], dtype=np.float64)
    exact = sum(wi * updates[s].astype(np.float64) for wi, s in zip(w, survivors, strict=True))
    err = float(np.max(np.abs(mean - exact / w.sum())))
    return {
        "round_wall_s": round(wall, 4),
        "plaintext_round_s": round(plaintext_s, 4),
        "secure_over_plaintext": round(wall / plaintext_s, 1),
        "device_compute_s": round((out.timings.clients_s + encode_s) / n, 5),
        "coordinator_compute_s": round(out.timings.server_s + decode_s, 4),
        "client_stage_s": {k: round(v / n, 5) for k, v in out.timings.per_stage_clients_s.items()},
        "survivors": len(survivors),
        "max_abs_err": err,
        "error_bound": encoding.max_mean_error(len(survivors), int(w.clip(max=1024).sum()), p),
    }


def flower_round(n: int, d: int, dropout: float, share_fraction: float, threshold: float,
                 secure: bool, timeout_s: float) -> dict[str, object]:
    try:
        import flwr  # noqa: F401
    except ImportError:
        return {"ok": False, "error": "flwr not installed (pip install '.[benchmark]')"}
    from flower_secagg import run_flower_round

    return dict(run_flower_round(n, d, secure=secure, num_shares=share_fraction,
                                 reconstruction_threshold=threshold, dropout=dropout,
                                 rounds=2, timeout_s=timeout_s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="10,50,100,200")
    ap.add_argument("--d", default="10000,100000,1000000")
    ap.add_argument("--dropout", default="0,0.1")
    ap.add_argument("--shares", type=float, default=0.1, help="share holders as a fraction of n")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--flower-timeout", type=float, default=600)
    ap.add_argument("--auto", action="store_true", help="also our derived parameters")
    ap.add_argument("--grpc", action="store_true", help="also an n=100 round over gRPC")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    for n in (int(x) for x in args.n.split(",")):
        for d in (int(x) for x in args.d.split(",")):
            for dropout in (float(x) for x in args.dropout.split(",")):
                p = params_for(n, args.shares, args.threshold)
                settings = [("shares", p)]
                if args.auto:
                    settings.append(("auto", derive(SecAggConfig(), n) if n >= 50 else p))
                for label, params in settings:
                    row: dict[str, object] = {
                        "benchmark": "secagg", "engine": "fedcoord", "params": label, "n": n,
                        "d": d, "dropout": dropout, "neighbours": params.neighbours,
                        "threshold": params.threshold, **bytes_per_device(params, d),
                    }
                    row.update(fedcoord_round(params, d, dropout, args.seed))
                    print(json.dumps(row), flush=True)
                if not args.no_flower:
                    for secure in (True, False):
                        row = {"benchmark": "secagg", "engine": "flower", "n": n, "d": d,
                               "dropout": dropout, "secure": secure,
                               "num_shares": args.shares, "threshold": args.threshold}
                        row.update(flower_round(n, d, dropout, args.shares, args.threshold,
                                                secure, args.flower_timeout))
                        print(json.dumps(row), flush=True)
    if args.grpc:
        from secagg_grpc import grpc_round_pair

        for row in grpc_round_pair(n=100, seed=args.seed):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
