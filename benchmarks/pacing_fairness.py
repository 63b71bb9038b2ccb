"""Does pace steering reward devices that ignore ``retry_after``? ``--devices`` honest
devices, which check in again exactly when told, and ``--cheaters`` devices that check in
every ``--cheat-every`` seconds whatever they are told, on the real round service
(:class:`coordinator.rounds.service.CoordinatorService`, in-memory store, manual clock: no
network, simulated time). One task whose rounds never get their reports, so a new attempt
(and selection window, ``--window`` seconds) opens at every deadline (``--deadline``). A
seated device comes back at the deadline. Prints one JSON line: per kind of device, the
share of windows in which a device was seen (offered to the draw) and of attempts in which
it was seated, and the cheaters' seat rate over the honest devices' (1: no advantage).

    python benchmarks/pacing_fairness.py --devices 1000 --pace 50 --window 1 --sim-s 600
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import tempfile
import time
from pathlib import Path

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.protocol import CheckInOutcome
from core.types import DeviceAttributes, ModelSpec, TaskSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--cheaters", type=int, default=10)
    parser.add_argument("--cheat-every", type=float, default=0.25)
    parser.add_argument("--pace", type=float, default=50.0)
    parser.add_argument("--window", type=float, default=1.0)
    parser.add_argument("--deadline", type=float, default=10.0)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--sim-s", type=float, default=600.0)
    parser.add_argument("--warmup-s", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    clock = ManualClock(1_700_000_000.0)
    t0 = clock.now()
    with tempfile.TemporaryDirectory() as tmp:
        service = CoordinatorService(
            InMemoryStore(), FileBlobStore(Path(tmp) / "blobs"), clock,
            rng=random.Random(args.seed),
            settings=CoordinatorSettings(checkin_pace_per_s=args.pace,
                                         max_failed_attempts=1 << 30))
        task_id = service.create_task(TaskSpec(
            name="fairness", model=ModelSpec("logistic_regression",
                                             {"input_dim": 4, "num_classes": 3}),
            rounds=1, clients_per_round=args.per_round, min_reports=args.per_round,
            selection_window_s=args.window, round_deadline_s=args.deadline)).record.task_id
        rng = random.Random(args.seed + 1)
        honest = [f"h{i}" for i in range(args.devices)]
        cheaters = [f"c{i}" for i in range(args.cheaters)]
        due = [(t0 + rng.uniform(0, 5), d) for d in honest + cheaters]
        heapq.heapify(due)
        seen: dict[str, set[int]] = {d: set() for d in honest + cheaters}
        seated: dict[str, set[int]] = {d: set() for d in honest + cheaters}
        windows: set[int] = set()
        attempts: set[int] = set()
        checkins = 0
        last_tick = t0
        while due and due[0][0] < t0 + args.sim_s:
            at, device = heapq.heappop(due)
            clock.advance(at - clock.now())
            if at - last_tick >= 0.05:
                service.tick()
                last_tick = at
            r = service.check_in(device, DeviceAttributes(), task_id)
            checkins += 1
            # The attempt: which deadline period it falls in (each attempt lasts a deadline).
            attempt = int((at - t0) // args.deadline)
            counted = at - t0 >= args.warmup_s
            if r.outcome is CheckInOutcome.ACCEPTED:
                if counted:
                    seated[device].add(attempt)
                    attempts.add(attempt)
                wait = args.deadline - (at - t0) % args.deadline + 0.01
            else:
                if "selection window open" in r.message and counted:
                    seen[device].add(attempt)
                    windows.add(attempt)
                wait = min(max(r.retry_after_s, 0.05), 60.0)
            if device.startswith("c"):
                wait = args.cheat_every
            heapq.heappush(due, (at + wait, device))

    def share(group: list[str], per: dict[str, set[int]], of: set[int]) -> float:
        return sum(len(per[d]) for d in group) / max(1, len(group) * len(of))

    honest_seated = share(honest, seated, attempts)
    cheater_seated = share(cheaters, seated, attempts)
    print(json.dumps({
        "benchmark": "pacing_fairness", "devices": args.devices, "cheaters": args.cheaters,
        "cheat_every_s": args.cheat_every, "pace_per_s": args.pace, "window_s": args.window,
        "deadline_s": args.deadline, "sim_s": args.sim_s, "windows": len(windows),
        "honest_seen_share": round(share(honest, seen, windows), 4),
        "cheater_seen_share": round(share(cheaters, seen, windows), 4),
        "honest_seated_share": round(honest_seated, 4),
        "cheater_seated_share": round(cheater_seated, 4),
        "cheater_advantage": round(cheater_seated / honest_seated, 2) if honest_seated else None,
        "checkins": checkins, "wall_s": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
