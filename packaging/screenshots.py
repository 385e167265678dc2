"""Screenshots of every page of the studio in a realistic state, for the README and for looking at.

    python packaging/screenshots.py OUT_DIR [--model default] [--steps 40] [--live-steps 8]

What it does, for real (nothing on the screenshots is made up):

1. in a fresh studio home (``--home``, default a temporary folder; the model cache of your own home
   is linked in so the bundled default is not converted again), trains three short adapters on the
   bundled sample dataset with ``core.train`` (attention-qv r8, all-linear r16, mlp r4), adds them to
   the library and combines two of them (``core.combine``, exact); a ``--home`` used before keeps
   the runs it has, so taking the pictures again skips the training;
2. opens the main window on ``--model`` and waits for each page's facts (summary, layers, data);
3. starts a fourth run from the Train page and takes its picture while it trains, then presses
   Generate on the Playground, which the run holding the model refuses (``job-refused``), and stops it;
4. loads the model, applies the all-linear adapter from the Library, shows its ΔW analysis, ticks
   the three runs on Compare runs, and generates with the base model and the adapter side by side.

Each page is saved as ``OUT_DIR/<n>-<page>.png`` (window size ``--size``, default 1280x800). On
the bundled default on a laptop CPU this takes a few minutes, mostly the training; with a tiny model
folder (``--model path``) it takes seconds, which is how it is tested.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "Two large oat milk lattes with an extra shot, please."
LIVE = "coffee-orders live"
RUNS = [  # (name, targets, rank): three shapes of adapter a person would compare
    ("coffee-orders all-linear r16", "all-linear", 16),
    ("coffee-orders attention-qv r8", "attention-qv", 8),
    ("coffee-orders mlp r4", "mlp", 4),
]


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def run_config(model: str, name: str, targets: str, rank: int, steps: int, out: Path):
    """The configuration of one short run on the bundled sample dataset."""
    from core.config import RunConfig
    from core.home import sample_dataset

    cfg = RunConfig()
    cfg.name, cfg.out = name, str(out)
    cfg.model.source, cfg.model.device = model, "auto"
    cfg.data.path, cfg.data.max_length, cfg.data.val_split = str(sample_dataset()), 160, 0.1
    cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha = targets, rank, 2.0 * rank
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = steps, 4, 1e-3
    cfg.train.warmup, cfg.train.eval_every, cfg.train.save_every = max(1, steps // 10), max(1, steps // 4), 0
    return cfg


def make_library(model: str, steps: int) -> list[Path]:
    """Train the adapters of :data:`RUNS`, adopt them into the library, combine two; return the runs."""
    from core.home import runs_dir
    from core.library import Library
    from core.train import Trainer
    from core.library_jobs import combine_into_library

    lib = Library()
    for e in lib.entries():  # the run in progress of a previous time is taken again below
        if e.name.startswith(LIVE):
            lib.remove(e.id)
    lib.empty_trash()
    for old in runs_dir().glob(f"*{LIVE.replace(' ', '-')}*"):
        shutil.rmtree(old, ignore_errors=True)
    run_dirs = []
    for name, targets, rank in RUNS:
        out = runs_dir() / name.replace(" ", "-")
        if (out / "adapter" / "adapter_config.json").is_file():  # a --home used before: keep its runs
            lib.adopt_run(out, name=name)
            run_dirs.append(out)
            continue
        t0 = time.perf_counter()
        result = Trainer(run_config(model, name, targets, rank, steps, out)).run()
        _log(f"trained {name}: {result.status}, final loss {result.final_loss}, "
             f"{time.perf_counter() - t0:.0f} s")
        lib.adopt_run(out, name=name)
        run_dirs.append(out)
    entries = {e.name: e for e in lib.entries()}
    if "attention-qv r8 + mlp r4" in entries:
        return run_dirs
    first = entries[RUNS[0][0]]
    lib.set_notes(first.id, "The one to use: answers orders as JSON. Trained on the bundled sample dataset.")
    parts = [entries[RUNS[1][0]], entries[RUNS[2][0]]]
    combine_into_library(str(lib.root), [e.id for e in parts], [1.0, 1.0], "exact", None,
                         "attention-qv r8 + mlp r4", "Combined (exact sum) of the attention and MLP adapters")
    _log("library ready: " + ", ".join(e.name for e in lib.entries()))
    return run_dirs


def palette_image(image):
    """The image with at most 256 colours: the 192 most frequent ones, then those farthest from the
    chosen ones (a plot's few coloured dots), every other pixel mapped to the nearest. A window is
    mostly flat colours, so this keeps the thin lines, text and plot colours that Qt's own colour-cube
    conversion drops, at a third of the file size and without dithering noise."""
    import numpy as np
    from PySide6.QtGui import QImage

    rgb = image.convertToFormat(QImage.Format.Format_RGB32)
    w, h = rgb.width(), rgb.height()
    pixels = np.frombuffer(rgb.constBits(), dtype=np.uint32, count=rgb.bytesPerLine() * h // 4)
    pixels = pixels.reshape(h, rgb.bytesPerLine() // 4)[:, :w] & 0xFFFFFF
    colors, inverse, counts = np.unique(pixels.ravel(), return_inverse=True, return_counts=True)
    channels = lambda c: np.stack([(c >> 16) & 255, (c >> 8) & 255, c & 255], axis=-1).astype(np.int32)  # noqa: E731
    rgb_all = channels(colors)
    order = np.argsort(-counts)
    chosen = list(order[:192])  # the flat colours of the window and the greys of its text
    # then the colours farthest from those chosen (a plot's few orange dots), among ones that show
    dist = ((rgb_all[:, None, :] - rgb_all[chosen][None, :, :]) ** 2).sum(-1).min(1)
    visible = counts >= 4
    while len(chosen) < min(256, len(colors)):
        i = int(np.argmax(np.where(visible, dist, -1)))
        if dist[i] <= 0:
            break
        chosen.append(i)
        dist = np.minimum(dist, ((rgb_all - rgb_all[i]) ** 2).sum(-1))
    keep = colors[np.array(chosen)]
    nearest = np.empty(len(colors), dtype=np.uint8)
    for start in range(0, len(colors), 4096):  # (colours × 256) distances, in slices
        d = ((channels(colors[start:start + 4096])[:, None, :] - channels(keep)[None, :, :]) ** 2).sum(-1)
        nearest[start:start + 4096] = d.argmin(1)
    index = np.ascontiguousarray(nearest[inverse].reshape(h, w))
    out = QImage(index.data, w, h, w, QImage.Format.Format_Indexed8)
    out.setColorTable([int(0xFF000000 | int(c)) for c in keep])
    return out.copy()  # own the pixels: index is freed when this returns


def wait_until(app, condition, timeout: float, what: str) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            _log(f"gave up waiting for {what} after {timeout:.0f} s")
            return False
        app.processEvents()
        time.sleep(0.02)
    app.processEvents()
    return True


def settle(app, seconds: float = 0.5) -> None:
    """Let timers (plot redraws) and queued signals run."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


def shoot_evaluate_and_sweep(app, window, run_dirs: list[Path], shot, sweep_steps: int) -> None:
    """The Evaluate page (the base model and two adapters on the first run's validation split) and the
    Sweep window (ranks 2 and 8 on q+v and all-linear, trained to the end, with its ΔW analysis)."""
    from PySide6.QtCore import Qt

    from core.home import runs_dir

    state, page = window.state, window.page("evaluate")
    if page is not None:
        window.show_page("evaluate")
        page.refresh_adapters()
        wanted = {RUNS[0][0], RUNS[1][0]}
        for i in range(page.adapter_list.count()):
            item = page.adapter_list.item(i)
            on = item.data(Qt.ItemDataRole.UserRole + 1) in wanted
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
        page.source.setCurrentIndex(1)
        page.path.setText(str(run_dirs[0]))
        for m, box in page.metric_boxes.items():
            box.setChecked(m in ("exact_match", "chrf", "json_valid", "json_fields", "loss"))
        page.max_new.setValue(64)
        page.limit.setValue(12)
        page.batch.setValue(4)
        page.start()
        wait_until(app, lambda: page.worker is None, 1800, "the evaluation")
        page.sort_metric.setCurrentText("json_fields")
        shot("evaluate")
    train = window.page("train")
    if train is None or not hasattr(train, "open_sweep"):
        return
    cfg = state.config
    cfg.name, cfg.train.steps, cfg.train.eval_every = "coffee-orders sweep", sweep_steps, 0
    cfg.data.val_split, cfg.data.max_length, cfg.train.lr = 0.1, 160, 1e-3
    window.show_page("train")
    train.open_sweep()
    d = train.sweep_dialog
    d.ranks.setText("2,8")
    for i in range(d.sets.count()):
        on = d.sets.item(i).text() in ("q+v", "all-linear")
        d.sets.item(i).setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
    d.folder.setText(str(runs_dir() / "coffee-orders-sweep"))
    for job, what in ((d.plan, "the grid's cost"), (d.start, "the sweep"), (d.analyse, "the ΔW analysis")):
        job()
        wait_until(app, lambda: d.worker is None, 3600, what)
    shot("sweep", widget=d)
    d.close()


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description="Open each page of the studio in a realistic state and save PNGs.")
    p.add_argument("out", help="folder for the PNG files (created)")
    p.add_argument("--model", default="default", help="base model spec (default: the bundled SmolLM2-135M)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of each library adapter (default 40)")
    p.add_argument("--live-steps", type=int, default=8,
                   help="steps the in-progress run takes before its picture (default 8)")
    p.add_argument("--sweep-steps", type=int, default=12, help="optimizer steps of each sweep cell (default 12)")
    p.add_argument("--home", help="studio home to build the library in (default: a new temporary folder)")
    p.add_argument("--size", default="1280x800", help="window size WxH (default 1280x800)")
    p.add_argument("--palette", action="store_true",
                   help="save 8-bit palette PNGs: a quarter of the size, as the README's are")
    return p.parse_args(argv)


def use_studio_home(home_arg: str | None) -> Path:
    """Make ``--home`` (or a new temporary folder) the studio home, with your own model cache linked in."""
    from core.home import studio_home

    own_models = studio_home() / "models"
    home = Path(home_arg).expanduser() if home_arg else Path(tempfile.mkdtemp(prefix="lora-studio-shots-"))
    home.mkdir(parents=True, exist_ok=True)
    if own_models.is_dir() and not (home / "models").exists():
        (home / "models").symlink_to(own_models, target_is_directory=True)  # reuse the converted default
    os.environ["LORA_STUDIO_HOME"] = str(home)
    _log(f"studio home: {home}")
    return home


def make_shooter(app, window, out: Path, palette: bool):
    """``shot(key, suffix="", widget=None)``: save the window (or ``widget``) as the next
    ``OUT_DIR/<n>-<key><suffix>.png``; and the list of the files saved."""
    shots: list[Path] = []

    def shot(key: str, suffix: str = "", widget=None) -> None:
        settle(app)
        path = out / f"{len(shots) + 1:02d}-{key}{suffix}.png"
        image = (widget or window).grab().toImage()
        if palette:
            image = palette_image(image)
        image.save(str(path), "PNG", 0)
        shots.append(path)
        _log(f"saved {path.name}")

    return shot, shots


def shoot_setup_pages(app, window, shot) -> None:
    """The Model, Layers and Data pages, once the model's facts and tokenizer are in."""
    from studio import workers

    state = window.state
    wait_until(app, lambda: state.model_info is not None or state.model_error, 600, "the model's facts")
    wait_until(app, lambda: state.tokenizer is not None or state.model_error, 300, "the tokenizer")
    for key in ("model", "layers", "data"):
        window.show_page(key)
        wait_until(app, lambda: not workers.running(), 300, f"the {key} page")
        shot(key)


def shoot_live_run(app, window, shot, live_steps: int) -> None:
    """A run in progress on the Train page, and Generate on the Playground refused while it holds the
    model; then the run is stopped."""
    from studio import workers

    state, train = window.state, window.page("train")
    if train is None:
        return
    state.config.lora.targets, state.config.lora.rank, state.config.lora.alpha = "all-linear", 16, 32.0
    state.config.train.steps, state.config.train.lr, state.config.train.eval_every = 200, 1e-3, 3
    state.config.train.warmup = 2  # the learning rate's warmup shows in its plot below the loss
    state.config.data.val_split, state.config.data.max_length = 0.1, 160
    state.config.name = LIVE
    state.changed("all")
    window.show_page("train")
    if not train.start():
        return
    steps = {"n": 0}
    train.worker.progress.connect(lambda ev: steps.__setitem__("n", steps["n"] + hasattr(ev, "tokens")))
    wait_until(app, lambda: steps["n"] >= live_steps, 900, "the live run's steps")
    shot("train", "-running")
    # the run holds the model: Generate on the Playground is refused with the run's name
    window.show_page("playground")
    window.page("playground").generate_button.click()
    shot("job-refused")
    window.message_bar.hide()
    window.show_page("train")
    train.stop()
    wait_until(app, lambda: train.worker is None and not workers.running(), 600, "the run to stop")


def shoot_library(app, window, shot):
    """The model loaded and the first run's adapter applied from the Library, its ΔW analysis, and the
    GGUF export dialog; returns the Library page."""
    from studio.widgets import gguf_dialog

    state, library = window.state, window.page("library")
    window.show_page("library")
    library.reload()
    library.load_model()
    wait_until(app, lambda: state.loaded is not None, 600, "the model to load")
    wait_until(app, lambda: library.job is None and library.check_worker is None, 300, "the compatibility checks")
    library.select_name(RUNS[0][0])
    library.apply_selected()
    wait_until(app, lambda: library.job is None, 300, "the adapter to apply")
    library.tabs.setCurrentIndex(0)
    shot("library")
    library.tabs.setCurrentWidget(library.delta)
    wait_until(app, lambda: library.analysis_worker is None, 300, "the ΔW analysis")
    shot("library", "-delta")
    entry = next(e for e in library.model.entries if e.name == RUNS[0][0])
    dialog = gguf_dialog.GgufExportDialog(str(Path.home() / f"SmolLM2-135M-Instruct-{entry.name}-gguf"),
                                          parameters=(state.model_info.summary or {}).get("parameters"),
                                          adapter_parameters=entry.trainable_params,
                                          playground=gguf_dialog.playground_settings(library), parent=window)
    dialog.show()
    shot("export-gguf", widget=dialog)
    dialog.close()
    return library


def shoot_compare_and_playground(app, window, library, run_dirs: list[Path], shot) -> None:
    """The three runs on Compare runs, and the base model and the first adapter answering side by side."""
    compare = window.page("compare")
    if compare is not None:
        window.show_page("compare")
        compare.refresh()
        compare.set_checked([str(r) for r in run_dirs])
        shot("compare")
    playground = window.page("playground")
    window.show_page("playground")
    playground.refresh()
    playground.prompt.setPlainText(PROMPT)
    playground.greedy.setChecked(True)
    playground.max_tokens.setValue(80)
    playground.panes[0].select_adapter(None)
    playground.panes[1].select_adapter(next(e.id for e in library.model.entries if e.name == RUNS[0][0]))
    playground.generate()
    wait_until(app, lambda: playground.worker is None, 600, "the answers")
    shot("playground")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.size.lower().split("x"))
    use_studio_home(args.home)
    model = args.model if args.model == "default" else str(Path(args.model).expanduser().resolve())
    run_dirs = make_library(model, args.steps)

    from studio.app import MainWindow, make_app

    app = make_app()
    window = MainWindow(background=False)
    window.resize(width, height)
    window.state.config.model.source = model
    window.show()
    window.state.refresh_model_info()
    shot, shots = make_shooter(app, window, out, args.palette)
    shoot_setup_pages(app, window, shot)
    shoot_live_run(app, window, shot, args.live_steps)
    library = shoot_library(app, window, shot)
    shoot_compare_and_playground(app, window, library, run_dirs, shot)
    shoot_evaluate_and_sweep(app, window, run_dirs, shot, args.sweep_steps)
    window.close()
    _log(f"{len(shots)} screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
