"""The fuzz suite's long mode: many more hostile files per reader than the tests run, for N minutes.

Every reader of tests/fuzz_targets.py (each dataset format, adapter folders, adapter zips by bytes
and by members, run configs, model folders, GGUF headers, the library's own files, training on a
damaged dataset) gets cases in turn, each made from a deterministic seed: case ``S`` of reader ``R``
is the same file on every machine, so ``--targets R --replay S`` reproduces a failure. A case fails
when the command or core call ends in anything but success or our one-line error (a traceback, a
RecursionError / MemoryError / OverflowError, a second error line), runs past ``--bound`` seconds,
or writes outside the places it was told to (tests/fuzzing.py).

    .venv/bin/python benchmarks/fuzz.py --minutes 60 --json-out benchmarks/results/fuzz-cpu.json
    .venv/bin/python benchmarks/fuzz.py --targets gguf --replay 1234      # one case, with its detail

It prints a line per reader every few minutes, then the cases per reader, what they ended in and
every distinct failure with the case that found it. Exit 1 when anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests", ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="how long to run (default: 5)")
    p.add_argument("--targets", default="", help="comma-separated readers (default: all)")
    p.add_argument("--first-seed", type=int, default=100_000,
                   help="case seeds start here (the test suite uses 0-99) (default: 100000)")
    p.add_argument("--replay", type=int, default=None, metavar="SEED", help="run only this case, print its detail")
    p.add_argument("--bound", type=float, default=60.0, help="seconds a case may take (default: 60)")
    p.add_argument("--keep", default=None, metavar="DIR", help="copy each failing case's files here")
    p.add_argument("--report-every", type=float, default=300.0, help="seconds between progress lines")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def _summary(tally, started: float, machine: dict, args) -> dict:
    return {"benchmark": "fuzz", "minutes": round((time.time() - started) / 60, 2), "machine": machine,
            "first_seed": args.first_seed, "bound_s": args.bound,
            "cases": tally.cases, "outcomes": tally.kinds,
            "failures": [{"reader": r, "failure": f, "case": c} for (r, f), c in tally.failures.items()]}


def main(argv=None) -> int:
    args = _args(argv)
    import conftest  # noqa: F401  (test environment: offline, two torch threads)
    import fuzz_targets as ft
    import fuzzing
    from common import describe, machine
    from core import atomic

    names = [n for n in args.targets.split(",") if n] or list(ft.BY_NAME)
    unknown = [n for n in names if n not in ft.BY_NAME]
    if unknown:
        print(f"error: --targets: unknown reader(s) {', '.join(unknown)}; known: {', '.join(ft.BY_NAME)}",
              file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="lora-studio-fuzz-"))
    try:
        print("building the seed files ...", file=sys.stderr, flush=True)
        seeds = ft.Seeds(work / "seeds")
        if args.replay is not None:
            for n in names:
                outcome, what = ft.run_case(ft.BY_NAME[n], seeds, work / f"{n}-{args.replay}", args.replay,
                                            bound=args.bound)
                print(f"{what}\n  -> {outcome.kind} in {outcome.seconds:.2f} s\n{outcome.detail}")
            return 0
        info = machine()
        print(f"machine: {describe(info)}", flush=True)
        tally = fuzzing.Tally()
        started = last_report = time.time()
        deadline = started + args.minutes * 60
        i = 0
        while time.time() < deadline:
            for n in names:
                seed = args.first_seed + i
                case_dir = work / "cases" / f"{n}-{seed}"
                if args.json_out:  # a case that kills the process (a segfault in a library) is named here
                    Path(args.json_out + ".current").write_text(f"{n} seed {seed}\n")
                try:
                    outcome, what = ft.run_case(ft.BY_NAME[n], seeds, case_dir, seed, bound=args.bound)
                except Exception as e:  # the harness failed to make the case: say so, go on
                    outcome, what = fuzzing.Outcome("harness", f"{type(e).__name__}: {e}"), f"{n} seed {seed}"
                tally.add(n, outcome, what)
                if outcome.failed:
                    print(f"FAILED {what}: {outcome.kind}: {outcome.detail.splitlines()[0] if outcome.detail else ''}",
                          flush=True)
                    if args.keep and (case_dir / "input").is_dir():
                        shutil.copytree(case_dir / "input", Path(args.keep) / f"{n}-{seed}", dirs_exist_ok=True)
                shutil.rmtree(case_dir, ignore_errors=True)
                if time.time() >= deadline:
                    break
            i += 1
            if time.time() - last_report >= args.report_every:
                last_report = time.time()
                done = sum(tally.cases.values())
                print(f"[{(last_report - started) / 60:5.1f} min] {done} cases, "
                      f"{sum(1 for _ in tally.failures)} distinct failures", flush=True)
                if args.json_out:
                    atomic.write_json(args.json_out, _summary(tally, started, info, args))
        result = _summary(tally, started, info, args)
        if args.json_out:
            atomic.write_json(args.json_out, result)
        _print(result)
        return 1 if result["failures"] else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _print(result: dict) -> None:
    print(f"\n{result['minutes']:.1f} minutes, {sum(result['cases'].values())} cases")
    print(f"{'reader':<22}{'cases':>8}  outcomes")
    for reader, n in result["cases"].items():
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(result["outcomes"][reader].items()))
        print(f"{reader:<22}{n:>8}  {kinds}")
    print(f"\nfailures: {len(result['failures'])} distinct" + (":" if result["failures"] else ""))
    for f in result["failures"]:
        print(f"- [{f['reader']}] {f['failure']}\n    {f['case'].splitlines()[0][:300]}")


if __name__ == "__main__":
    sys.exit(main())
