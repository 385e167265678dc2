"""Does the window stay responsive while a run trains? A heartbeat in the GUI thread, measured.

    .venv/bin/python benchmarks/gui_heartbeat.py [--model default] [--steps 12] [--interval 20]
        [--json-out benchmarks/results/gui_heartbeat-cpu.json]

The studio window (offscreen unless a display is set, in a fresh ``LORA_STUDIO_HOME`` that shares
this machine's converted models) is set up as a user would: the model chosen on the Model page, the
bundled sample dataset on the Data page (max length 128), the all-linear preset at r = 8, batch 4.
Train is pressed on the Train page; once the first step reached the plot, a ``QTimer`` in the GUI
thread beats every ``--interval`` ms until ``--steps`` steps have been plotted, and each gap between
two beats is recorded. A gap longer than the interval is time the GUI thread could not run: the
figure the window's responsiveness depends on (target: worst under 50 ms; the test suite fails
above 200 ms). Printed: the worst gap, the 99th percentile, the median, the beat count; with
``--trace-events``, what each long gap is made of (the Qt events over 8 ms that ran inside it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402


def wait_until(app, cond, timeout_s: float, what: str) -> None:
    """Run Qt's event loop, as the studio does (``QEventLoop.exec``), until ``cond()`` is true.

    (An earlier version polled with ``processEvents()`` and a 5 ms sleep; a timer could then fire
    only between sleeps, which added up to 5 ms, more under load, to every gap it measured.)"""
    from PySide6.QtCore import QEventLoop, QTimer

    if cond():
        return
    loop = QEventLoop()
    check = QTimer()
    check.setInterval(50)
    check.timeout.connect(lambda: cond() and loop.quit())
    deadline = QTimer()
    deadline.setSingleShot(True)
    deadline.timeout.connect(loop.quit)
    check.start()
    deadline.start(int(timeout_s * 1000))
    loop.exec()
    check.stop()
    deadline.stop()
    if not cond():
        raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="the model to train (default: the bundled default)")
    ap.add_argument("--steps", type=int, default=12, help="training steps to measure over (default 12)")
    ap.add_argument("--interval", type=int, default=20, help="heartbeat interval in ms (default 20)")
    ap.add_argument("--json-out", default=None, help="write the figures and the machine to this JSON file")
    ap.add_argument("--trace-events", action="store_true",
                    help="also time every Qt event the GUI thread handles and print, for each gap over 35 ms, "
                         "the events over 8 ms inside it (what the gap is made of; adds a little overhead)")
    return ap.parse_args(argv)


SLOW_EVENT_S = 0.008
LONG_GAP_S = 0.035


def traced_app():
    """A QApplication whose ``notify`` times each event it delivers: (start, seconds, event type,
    receiver class) of those over SLOW_EVENT_S, in ``app.slow_events``. Made before make_app, which
    then takes it as the instance."""
    from PySide6.QtWidgets import QApplication

    class TracedApp(QApplication):
        def notify(self, receiver, event):  # noqa: D401 - Qt's name
            t = time.perf_counter()
            done = super().notify(receiver, event)
            took = time.perf_counter() - t
            if took > SLOW_EVENT_S:
                self.slow_events.append((t, took, event.type().name, type(receiver).__name__))
            return done

    app = TracedApp(sys.argv[:1])
    app.slow_events = []
    return app


def print_gap_events(app, run: dict) -> None:
    """For each gap over LONG_GAP_S: the slow events that started inside it (ms from its start)."""
    for gap, end in zip(run["gaps"], run["ends"]):
        if gap <= LONG_GAP_S:
            continue
        start = end - gap
        inside = [f"{name} on {receiver} at +{1000 * (t - start):.0f} ms: {1000 * took:.1f} ms"
                  for t, took, name, receiver in app.slow_events if start - 0.002 <= t < end]
        print(f"gap {1000 * gap:.0f} ms: " + ("; ".join(inside) or "no Qt event over 8 ms inside it"))


def fresh_home() -> Path:
    """A new, temporary ``LORA_STUDIO_HOME`` that links in this machine's converted models."""
    from core.home import studio_home

    models = studio_home() / "models"  # the user's converted models, before the home moves
    home = Path(tempfile.mkdtemp(prefix="lora-studio-heartbeat-"))
    if models.is_dir():
        (home / "models").symlink_to(models, target_is_directory=True)
    os.environ["LORA_STUDIO_HOME"] = str(home)
    return home


def set_up_run(app, w, args):
    """Set the window up as a user would (model, sample dataset, all-linear r = 8, batch 4, by steps);
    return the Train page, showing."""
    got = []
    w.state.tokenizer_changed.connect(lambda t: got.append(t))
    w.page("model").choose(args.model)
    wait_until(app, lambda: any(t is not None for t in got), 600, "the model's tokenizer")
    data = w.page("data")
    data.set_path(str(ROOT / "resources" / "sample_dataset.jsonl"))
    data.max_length.setValue(128)
    wait_until(app, lambda: data.prepared is not None and data.prepared["max_length"] == 128, 600,
               "the dataset")
    w.page("layers").preset_buttons["all-linear"].click()
    w.page("layers").rank.setValue(8)
    t = w.state.config.train
    t.batch_size, t.save_every, t.eval_every = 4, 0, 0
    w.state.config.data.val_split = 0.0
    w.state.changed("train")
    page = w.page("train")
    page._sync_from_config()
    page.by_steps.setChecked(True)
    page.steps.setValue(args.steps + 1000)  # stopped after the measured steps
    w.show_page("train")
    return page


def measure_heartbeat(app, page, args) -> dict:
    """Press Train; from the first plotted step, beat every ``--interval`` ms until ``--steps`` more
    are plotted; stop the run. The gaps between beats, the perf_counter at each beat, the steps, the
    seconds measured and those from Train to the first step."""
    from PySide6.QtCore import QTimer

    gaps: list[float] = []
    ends: list[float] = []
    last = [0.0]

    def beat():
        now = time.perf_counter()
        gaps.append(now - last[0])
        ends.append(now)
        last[0] = now

    timer = QTimer()
    timer.setInterval(args.interval)
    timer.timeout.connect(beat)
    started = time.perf_counter()
    if not page.start():
        raise SystemExit("the Train page did not start a run")
    wait_until(app, lambda: page.plot.steps_received >= 1, 900, "the first training step")
    load_s = time.perf_counter() - started
    first = page.plot.steps_received
    last[0] = time.perf_counter()
    timer.start()
    t0 = time.perf_counter()
    wait_until(app, lambda: page.plot.steps_received >= first + args.steps, 3600, "the measured steps")
    timer.stop()
    measured_s = time.perf_counter() - t0
    steps = page.plot.steps_received - first
    page.stop()
    wait_until(app, lambda: page.worker is None, 600, "the run to stop")
    return {"gaps": gaps, "ends": ends, "steps": steps, "measured_s": measured_s, "load_s": load_s}


def summarise(args, info: dict, run: dict) -> dict:
    """Print the worst gap, the 99th percentile and the median; return the figures for the JSON."""
    gaps, steps, measured_s, load_s = run["gaps"], run["steps"], run["measured_s"], run["load_s"]
    ms = sorted(1000 * g for g in gaps)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    result = {"benchmark": "gui_heartbeat", "model": args.model, "machine": info, "interval_ms": args.interval,
              "steps": steps, "seconds": round(measured_s, 2), "start_to_first_step_s": round(load_s, 2),
              "beats": len(ms), "worst_ms": round(ms[-1], 1), "p99_ms": round(p99, 1),
              "median_ms": round(statistics.median(ms), 1),
              "longest": [{"end_s": round(e, 4), "ms": round(1000 * g, 1)}  # perf_counter at the late beat
                          for g, e in sorted(zip(gaps, run["ends"]), reverse=True)[:10]]}
    print(f"machine: {common.describe(info)}")
    print(f"{steps} training steps in {measured_s:.1f} s on {args.model} (first step after {load_s:.1f} s); "
          f"{len(ms)} heartbeats at {args.interval} ms: worst gap {ms[-1]:.0f} ms, 99th percentile "
          f"{p99:.0f} ms, median {statistics.median(ms):.0f} ms (target: worst < 50 ms)")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    info = common.machine()
    home = fresh_home()
    from studio.app import MainWindow, make_app

    if args.trace_events:
        traced_app()
    app = make_app()
    w = MainWindow(background=False)
    w.resize(1280, 800)
    w.show()
    try:
        run = measure_heartbeat(app, set_up_run(app, w, args), args)
    finally:
        w.close()
        app.processEvents()
        shutil.rmtree(home, ignore_errors=True)
    result = summarise(args, info, run)
    if args.trace_events:
        print_gap_events(app, run)
    common.write_json(args.json_out, result)
    main.result = result
    return 0


if __name__ == "__main__":
    sys.exit(main())
