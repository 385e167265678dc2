"""How fast does the window show? ``lora-studio gui --smoke`` in fresh processes.

    .venv/bin/python benchmarks/startup.py [--runs 5] [--json-out benchmarks/results/startup-cpu.json]

Each run starts ``python -m studio gui --smoke`` in a new process (``QT_QPA_PLATFORM=offscreen``
unless a display is set, a fresh ``LORA_STUDIO_HOME`` so no earlier state helps) and records two
figures: what the program prints (``window shown in S s``: from the start of ``main`` to the
window's first show, which is what the user waits for) and the process's whole wall time (the
interpreter's start and imports included, and its exit). The first run warms the operating system's
file cache and is reported apart; the median is over the others.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402


def one_run() -> tuple[float, float]:
    env = dict(os.environ)
    if not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        env["QT_QPA_PLATFORM"] = "offscreen"
    with tempfile.TemporaryDirectory(prefix="lora-studio-startup-") as home:
        env["LORA_STUDIO_HOME"] = home
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "studio", "gui", "--smoke"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        wall = time.perf_counter() - t
    m = re.search(r"^window shown in (\d+(?:\.\d+)?) s$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise SystemExit(f"gui --smoke failed (exit {p.returncode}):\n{p.stdout}{p.stderr}")
    return float(m.group(1)), wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs after the first (default 5)")
    ap.add_argument("--json-out", default=None, help="write the figures and the machine to this JSON file")
    args = ap.parse_args(argv)
    info = common.machine()
    print(f"machine: {common.describe(info)}", file=sys.stderr)
    first = one_run()
    print(f"first run (cold cache): window shown in {first[0]:.2f} s, process {first[1]:.2f} s")
    shown, walls = [], []
    for i in range(args.runs):
        s, w = one_run()
        shown.append(s)
        walls.append(w)
        print(f"run {i + 1}: window shown in {s:.2f} s, process {w:.2f} s")
    result = {"benchmark": "startup", "machine": info, "first": {"shown_s": first[0], "process_s": first[1]},
              "shown_s": shown, "process_s": walls, "median_shown_s": statistics.median(shown),
              "median_process_s": statistics.median(walls)}
    print(f"median of {args.runs}: window shown in {result['median_shown_s']:.2f} s "
          f"(target < 2 s), process {result['median_process_s']:.2f} s")
    common.write_json(args.json_out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
