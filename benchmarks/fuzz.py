"""Coverage-guided fuzzing (atheris, libFuzzer) of every RPC's request handling and of
protos/convert.py's wire-to-core conversions. Prints one JSON line:
executions, seconds, coverage (libFuzzer's edges "cov" and features "ft" over the
instrumented packages core, coordinator and protos), crashes.

    python benchmarks/fuzz.py --execs 1000000              # every action
    python benchmarks/fuzz.py --seconds 30 --target convert
    python benchmarks/fuzz.py --execs 20000 --target CheckIn --target clock

What is fuzzed, and what counts as a crash, is described in benchmarks/_fuzz_targets.py.
Findings are deduplicated by signature (kind, action, exception and where in our code it
was raised); each comes with a reproducer (the request in protobuf text format) and, with
``--crash-dir``, is also written there. ``--known-crash SUBSTRING`` counts findings whose
signature contains SUBSTRING apart ("known") instead of as crashes. The exit status is 1
when there was a crash, else 0.

libFuzzer runs in a worker process (``--worker``), because it ends its process without
returning to Python: the worker writes what it found to a state file, and this process adds
libFuzzer's own verdicts: a hang (an input running past ``--timeout-s``), a process over
``--rss-limit-mb`` and anything that kills the worker count as crashes too; the worker is
then restarted for the remaining executions (at most ``--max-restarts`` times).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Packages whose bytecode is instrumented for coverage.
INSTRUMENTED = ["core", "coordinator", "protos"]
_STATS = re.compile(r"#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+)")
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


def main(argv: list[str] | None = None) -> int:
    """Arguments after ``--`` go to libFuzzer (the worker's)."""
    argv = sys.argv[1:] if argv is None else argv
    libfuzzer_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, libfuzzer_args = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--execs", type=int, default=0,
                        help="executions in total (0: until --seconds)")
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="stop after this long (0: until --execs)")
    parser.add_argument("--target", action="append", default=[],
                        help="an action (e.g. CheckIn, fedcoord.v1.DeviceService/UploadUpdate, "
                             "convert/task_spec_from_proto) or a group: device, admin, "
                             "convert, clock, all (default); repeatable")
    parser.add_argument("--known-crash", action="append", default=[], metavar="SUBSTRING",
                        help="findings whose signature contains this are counted as known")
    parser.add_argument("--timeout-s", type=int, default=10, help="an input running longer "
                        "is a hang")
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    parser.add_argument("--max-len", type=int, default=8192, help="largest input, bytes")
    parser.add_argument("--reset-every", type=int, default=500,
                        help="RPCs after which the coordinator is rebuilt")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's seed")
    parser.add_argument("--crash-dir", type=Path, help="write each finding here")
    parser.add_argument("--max-restarts", type=int, default=5)
    parser.add_argument("--list", action="store_true", help="print the actions and exit")
    parser.add_argument("--replay", metavar="HEX", action="append", default=[],
                        help="run these inputs (a finding's 'input', with the run's "
                             "--target) once each, without libFuzzer, and print what "
                             "happened; repeatable")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.libfuzzer_args = libfuzzer_args
    targets = args.target or ["all"]
    if args.worker is not None:
        return _worker(args, targets)
    if args.list or args.replay:
        return _worker(args, targets, list_only=True)
    if args.execs <= 0 and args.seconds <= 0:
        parser.error("give --execs or --seconds")
    return _drive(args, targets)


# ------------------------------------------------------------------ the driver


def _drive(args: argparse.Namespace, targets: list[str]) -> int:
    started = time.monotonic()
    executions = 0
    coverage = {"edges": 0, "features": 0}
    crashes: dict[str, dict[str, Any]] = {}
    worker: dict[str, Any] = {}
    restarts = 0
    peak_rss_mb = 0
    with tempfile.TemporaryDirectory(prefix="fedcoord-fuzz-") as tmp:
        while True:
            left_execs = args.execs - executions if args.execs else 0
            left_s = args.seconds - (time.monotonic() - started) if args.seconds else 0.0
            if (args.execs and left_execs <= 0) or (args.seconds and left_s < 1):
                break
            state = Path(tmp) / f"state-{restarts}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(state),
                   "--reset-every", str(args.reset_every)]
            for t in targets:
                cmd += ["--target", t]
            libfuzzer = [f"-timeout={args.timeout_s}", f"-rss_limit_mb={args.rss_limit_mb}",
                         f"-max_len={args.max_len}", f"-seed={args.seed + restarts}",
                         "-print_final_stats=1", f"-artifact_prefix={tmp}/",
                         f"-runs={left_execs}" if args.execs else "-runs=-1"]
            if args.seconds:
                libfuzzer.append(f"-max_total_time={max(1, int(left_s))}")
            proc = subprocess.run(cmd + ["--", *libfuzzer], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, errors="replace",
                                  env=dict(os.environ, PYTHONHASHSEED="0"))
            log = proc.stdout
            run = _parse_log(log)
            executions += run["executions"]
            peak_rss_mb = max(peak_rss_mb, run["peak_rss_mb"])
            coverage = {k: max(coverage[k], run[k]) for k in coverage}
            found = json.loads(state.read_text()) if state.exists() else {}
            worker = found or worker
            for signature, record in found.get("crashes", {}).items():
                merged = crashes.setdefault(signature, record)
                if merged is not record:
                    merged["count"] += record["count"]
            if proc.returncode == 0:
                break
            verdict = _verdict(log, proc.returncode, found.get("actions", []))
            if verdict is None:  # the worker stopped before fuzzing: nothing to restart
                sys.stderr.write(log[-4000:])
                return 2
            record = crashes.setdefault(verdict["signature"], verdict)
            if record is not verdict:
                record["count"] += 1
            restarts += 1
            if restarts > args.max_restarts:
                break
    known = {s: r for s, r in crashes.items() if any(k in s for k in args.known_crash)}
    unknown = {s: r for s, r in crashes.items() if s not in known}
    if args.crash_dir is not None:
        args.crash_dir.mkdir(parents=True, exist_ok=True)
        for i, record in enumerate(crashes.values()):
            (args.crash_dir / f"finding-{i:03d}.txt").write_text(
                "\n".join(f"{k}: {v}" for k, v in record.items() if k not in
                          ("reproducer", "traceback"))
                + f"\n\n{record.get('reproducer', '')}\n\n{record.get('traceback', '')}\n")
    for record in crashes.values():
        print(f"{'KNOWN' if record['signature'] in known else 'CRASH'} x{record['count']}: "
              f"{record['signature']}\n  {record.get('detail', '')[:300]}\n"
              f"  input (--replay): {record.get('input', '?')[:2000]}\n"
              + "".join(f"  | {line}\n" for line in record.get("reproducer", "").splitlines()
                        [:40]), file=sys.stderr)
    print(json.dumps({
        "benchmark": "fuzz",
        "targets": targets,
        "actions": worker.get("actions", []),
        "unimplemented": worker.get("unimplemented", []),
        "not_fuzzed": worker.get("not_fuzzed", []),
        "executions": executions,
        "seconds": round(time.monotonic() - started, 1),
        "coverage": coverage,
        "peak_rss_mb": peak_rss_mb,
        "restarts": restarts,
        "crashes": sum(r["count"] for r in unknown.values()),
        "crash_signatures": sorted(unknown),
        "known_crashes": sum(r["count"] for r in known.values()),
        "known_signatures": sorted(known),
        "per_action": worker.get("per_action", {}),
    }))
    return 1 if unknown else 0


def _parse_log(log: str) -> dict[str, int]:
    out = {"executions": 0, "edges": 0, "features": 0, "peak_rss_mb": 0}
    for m in _STATS.finditer(log):
        out["executions"] = max(out["executions"], int(m.group(1)))
        out["edges"] = max(out["edges"], int(m.group(3)))
        out["features"] = max(out["features"], int(m.group(4)))
    if (m2 := re.search(r"stat::number_of_executed_units:\s+(\d+)", log)) is not None:
        out["executions"] = int(m2.group(1))
    elif (m3 := _DONE.search(log)) is not None:
        out["executions"] = int(m3.group(1))
    if (m4 := re.search(r"stat::peak_rss_mb:\s+(\d+)", log)) is not None:
        out["peak_rss_mb"] = int(m4.group(1))
    return out


def _verdict(log: str, returncode: int, actions: list[str]) -> dict[str, Any] | None:
    """What libFuzzer says ended the worker (None: it never started fuzzing): the input that
    was running (its action from the worker's list) and where Python was."""
    if "INITED" not in log and "ALARM" not in log:
        return None
    artifacts = re.findall(r"Test unit written to (\S+)", log)
    data = b""
    if artifacts and Path(artifacts[-1]).exists():
        data = Path(artifacts[-1]).read_bytes()
    if "ALARM: working on the last Unit" in log or "Timeout:" in log:
        kind = "hang"
    elif "out-of-memory" in log:
        kind = "oom"
    elif "Uncaught Python exception" in log:
        kind = "uncaught"
    else:
        kind = f"exit-{returncode}"
    action = actions[data[0] % len(actions)] if data and actions else "?"
    # Python's stack at the end (faulthandler's "most recent call first"): our innermost frame.
    stack = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', log.split("Current thread")[-1])
    ours = [f for f in stack if any(p in f[0] for p in ("/core/", "/coordinator/", "/protos/"))]
    where = f"{os.path.relpath(ours[0][0], ROOT)}:{ours[0][1]} {ours[0][2]}" if ours else "?"
    tail = log[-3000:]
    return {"signature": f"{kind} {action} @ {where}", "kind": kind, "action": action,
            "count": 1, "where": where, "input": data.hex(),
            "detail": f"the input ran past the time or memory limit ({kind})",
            "reproducer": f"# input (action byte, payload)\n{data.hex()}", "traceback": tail}


# ------------------------------------------------------------------ the worker


def _worker(args: argparse.Namespace, targets: list[str], *, list_only: bool = False) -> int:
    import logging

    import atheris

    sys.path.insert(0, str(ROOT))
    # Expected refusals are logged by the service; findings are recorded here instead.
    logging.disable(logging.CRITICAL)
    with atheris.instrument_imports(include=INSTRUMENTED):
        from benchmarks import _fuzz_targets as ft
    work = Path(tempfile.mkdtemp(prefix="fedcoord-fuzz-")) if list_only else \
        args.worker.parent / f"{args.worker.stem}-work"
    fuzzer = ft.Fuzzer(targets, root=work, reset_every=args.reset_every)
    if list_only:
        if not args.replay:
            for action in fuzzer.actions:
                print(action.name)
            print("unimplemented:", ", ".join(fuzzer.unimplemented) or "none")
            print("not fuzzed:", ", ".join(fuzzer.not_fuzzed) or "none")
        crashed = False
        for data in (bytes.fromhex(h) for h in args.replay):
            name = fuzzer.actions[data[0] % len(fuzzer.actions)].name if data else "-"
            try:
                fuzzer.one_input(data)
                print(f"{name}: no finding")
            except ft.Crash as crash:
                crashed = True
                print(f"{name}: {crash.signature}\n{crash.detail}\n{crash.reproducer}\n"
                      f"{crash.trace}")
        fuzzer.close()
        return 1 if crashed else 0
    state_path: Path = args.worker
    corpus = work / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(fuzzer.seeds()):
        (corpus / f"seed-{i:04d}").write_bytes(seed)
    crashes: dict[str, dict[str, Any]] = {}
    per_action = {a.name: 0 for a in fuzzer.actions}
    last_write = [0.0]

    def write_state(force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - last_write[0] < 1.0:
            return
        last_write[0] = now
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "actions": [a.name for a in fuzzer.actions], "unimplemented": fuzzer.unimplemented,
            "not_fuzzed": fuzzer.not_fuzzed, "executions": fuzzer.executions,
            "per_action": per_action, "crashes": crashes}))
        tmp.replace(state_path)

    def test_one_input(data: bytes) -> None:
        if data:
            per_action[fuzzer.actions[data[0] % len(fuzzer.actions)].name] += 1
        try:
            fuzzer.one_input(data)
        except ft.Crash as crash:
            record = crashes.get(crash.signature)
            if record is None:
                crashes[crash.signature] = {**crash.record(), "count": 1, "input": data.hex()}
                write_state(force=True)
            else:
                record["count"] += 1
        write_state()

    write_state(force=True)
    libfuzzer = [sys.argv[0], *args.libfuzzer_args, str(corpus)]
    atheris.Setup(libfuzzer, test_one_input)
    atheris.Fuzz()
    return 0  # not reached: libFuzzer exits the process


if __name__ == "__main__":
    sys.exit(main())
