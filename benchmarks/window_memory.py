"""The window's peak memory while it trains, against the command line's on the same run.

    .venv/bin/python benchmarks/window_memory.py [--model default] [--steps 5]
        [--json-out benchmarks/results/window_memory-cpu.json]

The same run (the bundled sample dataset, max length 128, all-linear r = 8, batch 4, ``--steps``
steps, fp32 on the CPU, no evaluation, no checkpoint before the end) is trained four ways, each in a
fresh process whose peak resident memory (``ru_maxrss``, from ``wait4``) is the figure:

* ``cli``: ``lora-studio train`` (``python -m studio train``);
* ``window``: the studio window (offscreen) with the model loaded first, as after using the
  Playground or the Library, then Start on the Train page: the run trains the window's model;
* ``window-fresh``: the window with no model loaded: the run loads it into the window's session;
* ``window-second-copy``: the window with the model loaded, and a TrainWorker that loads its own
  copy (what Start did before the session owned the model): what reusing it saves.

Each child prints one JSON line; the parent reports each peak and the window's against the CLI's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402

CASES = ("cli", "window", "window-fresh", "window-second-copy")


def cli_command(args, out: Path) -> list[str]:
    from core.home import sample_dataset

    return [sys.executable, "-m", "studio", "train", "--model", args.model, "--data", str(sample_dataset()),
            "--out", str(out), "--steps", str(args.steps), "--batch-size", "4", "--max-length", "128",
            "--targets", "all-linear", "--rank", "8", "--alpha", "16", "--device", "cpu", "--precision", "fp32",
            "--val-split", "0", "--eval-every", "0", "--save-every", "0", "--no-library"]


def _hwm() -> int | None:
    """This process's peak resident memory so far (Linux), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def window_child(case: str, model: str, steps: int) -> None:
    """One window run in this process; prints its result as a JSON line."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from gui_heartbeat import wait_until

    from core import models
    from studio import workers
    from studio.app import MainWindow, make_app

    app = make_app()
    w = MainWindow(background=False)
    w.show()
    state = w.state
    c = state.config
    c.model.source, c.model.device, c.model.precision = model, "cpu", "fp32"
    from core.home import sample_dataset

    c.data.path, c.data.max_length, c.data.val_split = str(sample_dataset()), 128, 0.0
    c.lora.targets, c.lora.rank, c.lora.alpha = "all-linear", 8, 16.0
    c.train.batch_size, c.train.save_every, c.train.eval_every, c.train.steps = 4, 0, 0, steps
    state.changed("all")
    page = w.page("train")
    page._sync_from_config()
    page.by_steps.setChecked(True)
    page.steps.setValue(steps)
    if case != "window-fresh":
        state.set_loaded(models.load_model(model, device="cpu", precision="fp32"))
    before = _hwm()  # the window, set up (and the model loaded, unless window-fresh): before the run
    t0 = time.perf_counter()
    if case == "window-second-copy":
        worker = workers.TrainWorker(page._new_config())  # no session: the trainer loads its own copy
        result = []
        worker.finished.connect(result.append)
        worker.failed.connect(lambda m: result.append(m))
        workers.start(worker)
        wait_until(app, lambda: not worker.running and result, 1800, "the run")
        status = getattr(result[0], "status", result[0])
    else:
        if not page.start():
            raise SystemExit("the Train page did not start a run: " + w.message_bar.text())
        wait_until(app, lambda: page.worker is None, 1800, "the run")
        status = getattr(page.last_result, "status", w.message_bar.text())
    seconds = round(time.perf_counter() - t0, 1)
    wait_until(app, lambda: not page.busy and not workers.running(), 600, "the adapter to reach the library")
    print(json.dumps({"case": case, "status": status, "seconds": seconds, "peak_before_run_bytes": before,
                      "model_kept_loaded": state.loaded is not None}), flush=True)
    w.close()


def run_case(case: str, args, home: Path) -> dict:
    env = dict(os.environ, LORA_STUDIO_HOME=str(home), QT_QPA_PLATFORM="offscreen")
    out = home / "runs" / f"bench-{case}"
    cmd = (cli_command(args, out) if case == "cli" else
           [sys.executable, __file__, "--child", case, "--model", args.model, "--steps", str(args.steps)])
    # wait4 on our own child, so the peak is that process's alone (its output in files: no pipe fills)
    logs = [home / f"{case}.out", home / f"{case}.err"]
    with open(logs[0], "w") as o, open(logs[1], "w") as e:
        p = subprocess.Popen(cmd, env=env, stdout=o, stderr=e, cwd=ROOT)
        t0 = time.perf_counter()
        _, status, usage = os.wait4(p.pid, 0)
    stdout, stderr = logs[0].read_text(), logs[1].read_text()
    if status != 0:
        raise SystemExit(f"{case} failed:\n{stderr[-3000:]}")
    row = {"case": case, "peak_rss_bytes": usage.ru_maxrss * 1024, "wall_seconds": round(time.perf_counter() - t0, 1)}
    lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    if lines:
        row.update({k: v for k, v in lines[-1].items() if k != "case"})
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="the model to train (default: the bundled default)")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps of each run (default 5)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"which of {', '.join(CASES)} (default: all)")
    ap.add_argument("--json-out", default=None, help="write the figures and the machine to this JSON file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        window_child(args.child, args.model, args.steps)
        return 0

    info = common.machine()
    from core.home import studio_home

    models = studio_home() / "models"  # this machine's converted models, shared with the runs
    home = Path(tempfile.mkdtemp(prefix="lora-studio-memory-"))
    if models.is_dir():
        (home / "models").symlink_to(models, target_is_directory=True)
    rows = []
    try:
        for case in args.cases.split(","):
            row = run_case(case, args, home)
            rows.append(row)
            print(f"{case:20s} peak RSS {row['peak_rss_bytes'] / 2**20:8.0f} MiB  ({row['wall_seconds']} s)",
                  flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    by = {r["case"]: r for r in rows}
    ratio = {c: round(by[c]["peak_rss_bytes"] / by["cli"]["peak_rss_bytes"], 3) for c in by if "cli" in by}
    for c, r in ratio.items():
        if c != "cli":
            print(f"{c} / cli: {r:.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "benchmark": "window_memory", "model": args.model, "steps": args.steps,
            "run": "sample dataset, max length 128, all-linear r=8, batch 4, fp32, cpu",
            "rows": rows, "ratio_to_cli": ratio, "machine": info, "command": " ".join(sys.argv),
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
