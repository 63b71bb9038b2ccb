"""The README's benchmark tables, regenerated from committed result files (JSON lines).

    python benchmarks/readme_tables.py simulation benchmarks/results/simulation-2026-12-06.jsonl
    python benchmarks/readme_tables.py secagg benchmarks/results/secagg-2026-11-25.jsonl
    python benchmarks/readme_tables.py transport benchmarks/results/secagg-transport-2026-12-06.jsonl

Prints Markdown. Simulation: one row per (model, cores, engine) with every repeat's devices/s,
then our speed-ups within each group (same cores, same repeat), the only ratios to quote.
Secure aggregation: the in-process table (both sides without a network) with, besides the
plain ratio, the ratio of each side's added cost over its own plaintext round. Transport: our
gRPC rounds and Flower's deployment-engine rounds at the same n and d.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

NAMES = {"ours": "fedcoord", "flower": "Flower 1.42 (Ray)", "pfl": "pfl 0.6",
         "sequential": "sequential torch loop"}
MODELS = {"lr": "logistic regression", "mlp": "MLP 60-200-200-10"}
ENGINE_ORDER = ["ours", "pfl", "flower", "sequential"]


def _rows(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def simulation(path: str) -> None:
    rows = [r for r in _rows(path) if r.get("benchmark") == "simulation"]
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["cores"], r["engine"])].append(r)
    print("| model | cores | engine (training processes) | devices/s, each run | round 1 "
          "| peak RSS | final accuracy |")
    print("|---|---|---|---|---|---|---|")
    for model in MODELS:
        for cores in sorted({c for m, c, _ in groups if m == model}):
            for engine in ENGINE_ORDER:
                runs = sorted(groups.get((model, cores, engine), []), key=lambda r: r["repeat"])
                if not runs:
                    continue
                if "devices_per_s" not in runs[0]:
                    reason = runs[0].get("skipped") or runs[0].get("error", "")
                    print(f"| {MODELS[model]} | {cores} | {NAMES[engine]} | - ({reason[:60]}) "
                          "| | | |")
                    continue
                speed = " / ".join(_num(r["devices_per_s"]) for r in runs)
                if engine == "ours":
                    speed = f"**{speed}**"
                first = " / ".join(f"{r['round1_s']:.1f} s" for r in runs)
                rss = f"{max(r['peak_rss_mb'] for r in runs):,.0f} MB"
                acc = " / ".join(sorted({f"{r['final_accuracy']:.4f}" for r in runs}))
                print(f"| {MODELS[model]} | {cores} | {NAMES[engine]} ({runs[0]['processes']}) "
                      f"| {speed} | {first} | {rss} | {acc} |")
    print()
    for model in MODELS:
        for cores in sorted({c for m, c, _ in groups if m == model}):
            ours = sorted(groups.get((model, cores, "ours"), []), key=lambda r: r["repeat"])
            peers = {e: [r.get("speedup", {}).get(e) for r in ours] for e in ENGINE_ORDER[1:]}
            parts = [f"{e} " + " / ".join(f"{x:.1f}x" for x in xs if x)
                     for e, xs in peers.items() if any(xs)]
            print(f"- {MODELS[model]}, {cores} core(s): ours over " + ", ".join(parts))


def secagg(path: str) -> None:
    rows = _rows(path)
    flower = {(r["n"], r["d"], r["dropout"], r["secure"]): r["round_wall_s"]
              for r in rows if r["engine"] == "flower" and r.get("ok")}
    ours = {(r["n"], r["d"], r["dropout"]): r for r in rows
            if r["engine"] == "fedcoord" and r.get("params", "shares") == "shares"}
    print("| n | d | dropout | fedcoord SecAgg+ | Flower 1.42 SecAgg+ | ratio | fedcoord plaintext "
          "| Flower plaintext | ratio of added cost |")
    print("|---|---|---|---|---|---|---|---|---|")

    def s(x: float) -> str:
        return f"{x:.3f}" if x < 0.1 else f"{x:.2f}" if x < 10 else f"{x:.1f}"

    def ratio(x: float) -> str:
        return f"{x:.0f}x" if x >= 10 else f"{x:.1f}x"

    sizes = {10_000: "10k", 100_000: "100k", 1_000_000: "1M"}
    # The README's rows: d = 100k at every n, and n = 100 at every d.
    settings = {(n, d) for n, d, _ in ours if d == 100_000 or n == 100}
    for n, d in sorted(settings, key=lambda k: (k[1] != 100_000, k)):
        pairs = [(ours[(n, d, p)], flower.get((n, d, p, True)), flower.get((n, d, p, False)))
                 for p in (0.0, 0.1) if (n, d, p) in ours]
        if any(f is None or g is None for _, f, g in pairs):
            continue
        cells = [" / ".join(s(o["round_wall_s"]) for o, _, _ in pairs) + " s",
                 " / ".join(s(f) for _, f, _ in pairs) + " s",
                 " / ".join(ratio(f / o["round_wall_s"]) for o, f, _ in pairs),
                 " / ".join(s(o["plaintext_round_s"]) for o, _, _ in pairs) + " s",
                 " / ".join(s(g) for _, _, g in pairs) + " s",
                 " / ".join(ratio((f - g) / (o["round_wall_s"] - o["plaintext_round_s"]))
                            for o, f, g in pairs)]
        print(f"| {n} | {sizes.get(d, d)} | 0 / 10% | " + " | ".join(cells) + " |")


def transport(path: str) -> None:
    for r in _rows(path):
        if r["engine"] == "fedcoord":
            print(f"fedcoord n={r['n']} d={r['d']} k={r['neighbours']} t={r['threshold']}: "
                  f"secure {r['secure_round_s']} s {r['secure_rounds_s']}, plain "
                  f"{r['plaintext_round_s']} s {r['plaintext_rounds_s']}")
        else:
            kind = "secure" if r["secure"] else "plain"
            print(f"flower n={r['n']} d={r['d']} shares={r['num_shares']} t={r['threshold']}: "
                  f"{kind} {r.get('round_s')} s {r.get('round_walls_s')} ok={r['ok']}")


if __name__ == "__main__":
    {"simulation": simulation, "secagg": secagg, "transport": transport}[sys.argv[1]](sys.argv[2])
