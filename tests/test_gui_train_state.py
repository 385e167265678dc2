"""The Train page follows what is really happening (issue 18): a failed Start is forgotten when the
input changes and leaves nothing on disk; Pause says "Pausing…" until the run has paused; closing
during a run asks first and never waits on the GUI thread; a stopped run's adapter stays out of the
library and is added once, when the resumed run finishes; Resume only for runs that can go on; a long
message never squeezes the settings; "Copy as command", "Load settings" and default names."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytestqt  # noqa: F401  (a missing module fails, never skips)
from test_gui_train import LONG, _run_until_done, _steps, dataset, window  # noqa: F401  (fixtures)


def _train_a_little(page, qtbot, steps: int, until: int | None = None):
    _steps(page, steps)
    assert page.start()
    if until is not None:
        qtbot.waitUntil(lambda: page.plot.steps_received >= until, timeout=LONG)
        page.stop()
    _run_until_done(qtbot, page)
    qtbot.waitUntil(lambda: not page.busy, timeout=LONG)


def test_a_failed_start_leaves_nothing_and_is_forgotten_when_the_input_changes(window, qtbot, tmp_path):
    from core.home import runs_dir

    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n", encoding="utf-8")
    good = window.state.config.data.path
    window.state.config.data.path = str(bad)
    page = window.page("train")
    window.show_page("train")
    _steps(page, 5)
    status_bar = []
    window.state.message.connect(status_bar.append)
    assert page.start()
    _run_until_done(qtbot, page)
    assert page.status.text().startswith("Failed: ") and "bad.jsonl" in window.message_bar.text()
    assert status_bar[-1] == "training failed"
    assert page.progress.format() == "%v / %m steps" and page.progress.maximum() == 1  # not "tokenising…"
    assert list(runs_dir().iterdir()) == []  # no empty run folder
    assert page.folder_label.text() == ""  # and no run folder named
    window.grab().save("/tmp/train-failed.png")

    window.state.config.data.path = good  # the input changes: the failure is about an input that is gone
    window.state.changed("data")
    assert page.status.text() == "Ready"
    qtbot.waitUntil(lambda: not window.message_bar.isVisible())
    assert window.message_bar.text() == "" and status_bar[-1] == ""
    window.grab().save("/tmp/train-after-failure-fixed.png")


def test_pause_says_pausing_until_paused_then_paused_at_step_n(window, qtbot):
    page = window.page("train")
    window.show_page("train")
    window.state.config.data.val_split = 0.5  # evaluations to interrupt
    window.state.config.train.eval_every = 1
    _steps(page, 100_000)
    page.start()
    qtbot.waitUntil(lambda: page.plot.steps_received >= 2, timeout=LONG)
    play = page._icons["Play"].cacheKey()
    page.toggle_pause()
    seen = []
    page.status.setText = (lambda orig: lambda t: (seen.append(t), orig(t)))(page.status.setText)
    assert page.pause_button.text() == "Pausing…" and not page.pause_button.isEnabled()
    assert page.pause_button.icon().cacheKey() != play
    qtbot.waitUntil(lambda: page.pause_state == "paused", timeout=LONG)
    step = page.progress.value()
    assert page.status.text() == f"Paused at step {step}; checkpoint saved"
    assert page.pause_button.text() == "Resume" and page.pause_button.isEnabled()
    assert page.pause_button.icon().cacheKey() == page._icons["Play"].cacheKey()
    # while it was on its way to the pause it never claimed to be training or evaluating
    assert not any(t.startswith(("Training", "Evaluating")) for t in seen), seen
    window.grab().save("/tmp/train-paused.png")
    qtbot.wait(300)
    assert page.progress.value() == step  # paused means paused
    page.toggle_pause()
    assert page.pause_button.text() == "Pause" and page.pause_state == "running"
    qtbot.waitUntil(lambda: page.progress.value() >= step + 2, timeout=LONG)
    page.stop()
    _run_until_done(qtbot, page)


def test_close_asks_first_cancel_keeps_training_stop_and_save_closes_without_blocking(window, qtbot):
    from core.library import Library
    from PySide6.QtWidgets import QMessageBox

    page = window.page("train")
    _steps(page, 100_000)
    page.start()
    qtbot.waitUntil(lambda: page.plot.steps_received >= 2, timeout=LONG)
    t = time.perf_counter()
    window.close()
    assert time.perf_counter() - t < 0.5  # the GUI thread waits for nothing
    box = window.close_question
    assert box is not None and window.isVisible() and "A run is training (step" in box.text()
    assert {b.text() for b in box.buttons()} >= {"Stop and save", "Keep training"}
    box.grab().save("/tmp/train-close-question.png")
    box.button(QMessageBox.StandardButton.Cancel).click()
    qtbot.waitUntil(lambda: window.close_question is None)
    at = page.plot.steps_received
    qtbot.waitUntil(lambda: page.plot.steps_received >= at + 2, timeout=LONG)  # still training
    assert window.isVisible()

    window.close()
    run_dir = page.run_dir
    window.stop_and_close_button.click()
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=LONG)
    assert not page.running
    status = json.loads((Path(run_dir) / "status.json").read_text())
    assert status["status"] == "stopped" and (Path(run_dir) / "checkpoints").is_dir()
    assert Library().entries() == []  # the partial adapter is not in the library


def test_keep_training_closes_when_the_run_has_finished_and_its_adapter_is_in(window, qtbot):
    from core.library import Library

    page = window.page("train")
    _steps(page, 12)
    page.start()
    qtbot.waitUntil(lambda: page.plot.steps_received >= 1, timeout=LONG)
    window.close()
    window.keep_training_button.click()
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=LONG)
    assert page.last_result.status == "finished" and page.last_adopted is not None
    assert [e.name for e in Library().entries()] == [page.last_adopted.name]


def test_a_resumed_run_adds_its_adapter_once_and_finished_runs_offer_no_resume(window, qtbot):
    from core.library import Library

    page = window.page("train")
    window.state.config.train.save_every = 2
    _train_a_little(page, qtbot, 30, until=4)
    first = page.last_result
    assert first.status == "stopped" and Library().entries() == []
    qtbot.waitUntil(lambda: page.runs.count() == 1, timeout=LONG)
    assert page.resume_button.isEnabled()
    # the banner offers it in one click, above every page
    assert page.banner.isVisible() and f"at step {first.step} of 30" in page.banner.label.text()
    window.grab().save("/tmp/train-resume-banner.png")
    page.banner.button.click()
    qtbot.waitUntil(lambda: page.worker is not None, timeout=LONG)
    _run_until_done(qtbot, page)
    qtbot.waitUntil(lambda: not page.busy, timeout=LONG)
    assert page.last_result.status == "finished" and Path(page.last_result.out) == Path(first.out)
    entries = Library().entries()
    assert len(entries) == 1 and entries[0].name == page.last_adopted.name  # once, the finished one
    assert entries[0].training["steps"] == 30 and entries[0].training["status"] == "finished"
    qtbot.waitUntil(lambda: "finished" in page.runs.itemText(0), timeout=LONG)
    assert not page.resume_button.isEnabled()  # a finished run has nothing left to continue
    assert page.earlier.load_button.isEnabled()
    assert not page.banner.isVisible()


def test_a_long_message_never_squeezes_the_settings_or_resizes_the_window(window, qtbot):
    page = window.page("train")
    window.show_page("train")
    window.resize(1100, 720)
    qtbot.waitUntil(lambda: page.settings_column.width() > 0)
    qtbot.wait(50)
    before = (window.size(), page.settings_column.width(), page.resume_button.width())
    long = ("Finished; the adapter is in the library as " + "a-very-long-run-name-" * 12).strip("-")
    page.status.setText(long)
    page.folder_label.setText("Run folder: /" + "/deeply/nested" * 30 + "/run")
    qtbot.wait(100)
    assert (window.size(), page.settings_column.width(), page.resume_button.width()) == before
    assert page.resume_button.width() >= page.resume_button.sizeHint().width()
    assert page.status.is_elided() and page.status.toolTip() == long
    assert page.status.shown_text().endswith("…")
    window.grab().save("/tmp/train-long-message.png")


def test_copy_as_command_gives_a_command_the_cli_parses_to_the_same_config(window, qtbot):
    from PySide6.QtWidgets import QApplication

    from studio import cli
    from studio.commands.train import build_config

    page = window.page("train")
    page.batch.setValue(3)
    page.lr.setValue(0.0007)
    page.seed.setValue(7)
    window.state.config.lora.targets = ["model.layers.0.self_attn.q_proj", "v_proj"]
    text = page.copy_command()
    assert QApplication.clipboard().text() == text
    argv = shlex.split(text)
    parsed = build_config(cli._parser().parse_args(argv[1:]))
    expected = window.state.config.copy()
    expected.data.path = parsed.data.path
    expected.out = parsed.out
    assert parsed.to_dict() == expected.to_dict()
    assert parsed.data.path == window.state.config.data.path
    assert Path(parsed.out).parent.name == "runs" and not Path(parsed.out).exists()


def test_load_settings_of_an_earlier_run_and_default_names(window, qtbot, checkpoint, dataset):  # noqa: F811
    from core.library import Library

    page = window.page("train")
    assert page.run_name.placeholderText().startswith(f"{checkpoint.name}-{dataset.stem}")
    page.batch.setValue(2)
    page.seed.setValue(11)
    page.warmup.setValue(1)
    _train_a_little(page, qtbot, 3)
    assert Path(page.run_dir).name == f"{checkpoint.name}-{dataset.stem}"  # not a timestamp
    assert [e.name for e in Library().entries()] == [f"{checkpoint.name}-{dataset.stem}"]
    _train_a_little(page, qtbot, 2)
    assert Path(page.run_dir).name == f"{checkpoint.name}-{dataset.stem}-2"

    page.batch.setValue(8)
    page.seed.setValue(99)
    page.steps.setValue(77)
    qtbot.waitUntil(lambda: page.runs.count() == 2, timeout=LONG)
    page.earlier.select(str(Path(page.run_dir).with_name(f"{checkpoint.name}-{dataset.stem}")))
    page.earlier.load_button.click()
    qtbot.waitUntil(lambda: page.batch.value() == 2, timeout=LONG)
    c = window.state.config
    assert (c.train.batch_size, c.train.seed, c.train.warmup, c.train.steps) == (2, 11, 1, 3)
    assert (page.seed.value(), page.steps.value(), page.warmup.value()) == (11, 3, 1)
    assert c.out == "" and c.name == ""  # a new run gets its own folder and name


def test_load_settings_never_turns_on_remote_code(window, qtbot, checkpoint):  # noqa: F811
    """An earlier run of this very model that had trust_remote_code on: its settings come back, its
    permission does not (as `train --config` never turns it on; only the Model page's box does)."""
    from core.config import RunConfig
    from core.home import runs_dir

    cfg = RunConfig()
    cfg.model.source, cfg.model.trust_remote_code, cfg.train.seed = window.state.config.model.source, True, 123
    run = runs_dir() / "remote-code-run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert window.state.config.model.trust_remote_code is False
    window.page("train").load_settings_of(str(run))
    qtbot.waitUntil(lambda: window.state.config.train.seed == 123, timeout=LONG)
    assert window.state.config.model.trust_remote_code is False


def test_on_the_next_start_the_window_offers_to_resume_an_unfinished_run(qtbot, checkpoint):
    from core.config import RunConfig
    from core.home import runs_dir
    from studio.app import MainWindow

    run = runs_dir() / "long-run"  # what a run stopped by closing the window leaves
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "checkpoints" / "step-4" / "state.json").write_text("{}")
    (run / "config.json").write_text(json.dumps(RunConfig().to_dict()))
    (run / "status.json").write_text(json.dumps({"status": "stopped", "step": 4, "total_steps": 200,
                                                 "name": "long-run"}))
    w = MainWindow(background=False)
    qtbot.addWidget(w)
    w.state.config.model.source = str(checkpoint)
    w.show()
    w._start_background()  # what the window does after its first paint
    banner = w.page("train").banner
    qtbot.waitUntil(banner.isVisible, timeout=LONG)
    assert banner.label.text() == "The run “long-run” stopped at step 4 of 200 and can be resumed."
    assert banner.button.text() == "Resume" and banner.path == str(run)
    w.grab().save("/tmp/startup-resume-banner.png")
    banner.dismiss()
    assert not banner.isVisible()
