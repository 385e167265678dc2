"""Training from the window (pytest-qt, offscreen, a tiny checkpoint): the whole flow into the
library, Stop, Pause/Resume, resuming an earlier run, a bad data file, closing the window during a
run, and the GUI thread's responsiveness while a run trains."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import pytestqt  # noqa: F401  (a missing module fails, never skips)

LONG = 120_000  # ms


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def dataset(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl",
                       [{"instruction": f"Add {i} and {i + 1}.", "output": f"{i} + {i + 1} = {2 * i + 1}."}
                        for i in range(32)])


@pytest.fixture
def window(qtbot, checkpoint, dataset):
    """The window with the tiny checkpoint chosen on the Model page and the small dataset on the Data page."""
    from studio.app import MainWindow

    w = MainWindow(background=False)
    qtbot.addWidget(w)
    w.show()
    with qtbot.waitSignal(w.state.tokenizer_changed, timeout=LONG, check_params_cb=lambda t: t is not None):
        w.page("model").choose(str(checkpoint))
    data = w.page("data")
    data.set_path(str(dataset))
    data.max_length.setValue(64)
    qtbot.waitUntil(lambda: data.prepared is not None and data.prepared["max_length"] == 64, timeout=LONG)
    t = w.state.config.train
    t.batch_size, t.lr, t.save_every, t.warmup = 4, 3e-3, 0, 0
    w.state.changed("train")
    w.page("train")._sync_from_config()
    yield w
    w.close()


def _steps(page, n: int) -> None:
    page.by_steps.setChecked(True)
    page.steps.setValue(n)


def _run_until_done(qtbot, page, timeout=LONG):
    qtbot.waitUntil(lambda: page.worker is None, timeout=timeout)


def test_whole_flow_model_layers_data_train_library(window, qtbot):
    from core.library import Library

    layers = window.page("layers")
    layers.preset_buttons["attention-qv"].click()
    layers.rank.setValue(4)
    assert window.state.config.lora.targets == "attention-qv"

    page = window.page("train")
    window.show_page("train")
    _steps(page, 12)
    library_signals = []
    window.state.library_changed.connect(lambda: library_signals.append(1))
    assert page.start()
    assert window.state.training
    _run_until_done(qtbot, page)
    qtbot.waitUntil(lambda: page.last_adopted is not None, timeout=LONG)

    assert page.last_result.status == "finished"
    assert page.plot.steps_received == 12  # the plot received every step
    page.plot.redraw()
    assert page.plot.steps.n == 12
    assert page.progress.value() == 12
    assert not window.state.training and page.start_button.isEnabled()
    entries = Library().entries()
    assert [e.name for e in entries] == [page.last_adopted.name]
    assert entries[0].rank == 4
    assert library_signals
    cfg = json.loads((Path(page.run_dir) / "config.json").read_text())
    assert cfg["lora"]["targets"] == "attention-qv" and cfg["lora"]["rank"] == 4


def test_stop_saves_a_checkpoint_and_keeps_the_partial_adapter_out_of_the_library(window, qtbot):
    from core.library import Library

    from PySide6.QtCore import Qt

    page = window.page("train")
    _steps(page, 100_000)
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow)
    qtbot.keyClick(window, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)  # Start
    assert page.worker is not None and window.stack.currentWidget() is page
    qtbot.waitUntil(lambda: page.plot.steps_received >= 3, timeout=LONG)
    qtbot.keyClick(window, Qt.Key.Key_Period, Qt.KeyboardModifier.ControlModifier)  # Stop
    _run_until_done(qtbot, page)
    assert page.last_result.status == "stopped"
    assert 3 <= page.last_result.step < 100_000
    assert page.last_result.checkpoint is not None and Path(page.last_result.checkpoint).is_dir()
    assert page.last_adopted is None and Library().entries() == []  # partial: not in the library
    assert page.status.text().startswith(f"Stopped at step {page.last_result.step} of 100000")


def test_pause_and_resume(window, qtbot, monkeypatch):
    import threading

    from studio import gc_guard

    collections = []  # (in the GUI thread, the page's state then): Pause frees what cycles hold
    real = gc_guard.collect_now
    monkeypatch.setattr(gc_guard, "collect_now", lambda: (collections.append(
        (threading.current_thread() is threading.main_thread(), page.pause_state)), real()))
    page = window.page("train")
    _steps(page, 100_000)
    page.start()
    qtbot.waitUntil(lambda: page.plot.steps_received >= 2, timeout=LONG)
    page.toggle_pause()
    assert page.pause_button.text() == "Pausing…" and not page.pause_button.isEnabled()
    qtbot.waitUntil(lambda: page.status.text().lower().startswith("paused"), timeout=LONG)
    assert page.pause_button.text() == "Resume" and page.pause_button.isEnabled()
    assert collections == [(True, "pausing")]  # by the GUI thread, before the run said it paused
    at_pause = page.plot.steps_received
    qtbot.wait(600)
    assert page.plot.steps_received == at_pause  # nothing trains while paused
    page.toggle_pause()
    assert page.pause_button.text() == "Pause"
    qtbot.waitUntil(lambda: page.plot.steps_received >= at_pause + 2, timeout=LONG)
    page.stop()
    _run_until_done(qtbot, page)
    assert page.last_result.status == "stopped"


def test_resume_an_earlier_run(window, qtbot):
    page = window.page("train")
    _steps(page, 40)
    window.state.config.train.save_every = 4
    page.start()
    qtbot.waitUntil(lambda: page.plot.steps_received >= 6, timeout=LONG)
    page.stop()
    _run_until_done(qtbot, page)
    first = page.last_result
    assert first.status == "stopped"
    qtbot.waitUntil(lambda: page.runs.count() == 1, timeout=LONG)
    assert "stopped" in page.runs.itemText(0)

    page.resume_selected()
    qtbot.waitUntil(lambda: page.worker is not None, timeout=LONG)
    _run_until_done(qtbot, page)
    assert page.last_result.status == "finished"
    assert page.last_result.step == 40
    assert Path(page.last_result.out) == Path(first.out)
    page.plot.redraw()
    assert page.plot.steps.n >= 40 - first.step  # the earlier steps came back from metrics.jsonl


def test_bad_data_file_fails_with_one_message(window, qtbot, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n", encoding="utf-8")
    window.state.config.data.path = str(bad)
    page = window.page("train")
    _steps(page, 5)
    page.start()
    _run_until_done(qtbot, page)
    msg = window.message_bar.text()
    assert "bad.jsonl" in msg and "Traceback" not in msg
    assert page.status.text().startswith("Failed: ") and "bad.jsonl" in page.status.text()
    assert page.start_button.isEnabled() and not window.state.training


def test_invalid_settings_do_not_start(window, qtbot):
    window.state.config.lora.targets = []
    assert not window.page("train").start()
    msg = window.message_bar.text()
    assert "Cannot start" in msg and ("--targets" in msg or "layers to adapt" in msg)  # the window's words


def test_closing_the_window_during_training_stops_the_worker(qtbot, checkpoint, dataset):
    from studio import workers
    from studio.app import MainWindow

    w = MainWindow(background=False)
    qtbot.addWidget(w)
    w.state.config.model.source = str(checkpoint)
    w.state.config.data.path = str(dataset)
    w.state.config.data.max_length = 64
    w.state.config.train.save_every = 0
    w.show()
    page = w.page("train")
    _steps(page, 100_000)
    page.start()
    worker = page.worker
    qtbot.waitUntil(lambda: page.plot.steps_received >= 2, timeout=LONG)
    t = time.perf_counter()
    w.close()  # asks first; the GUI thread never waits for the run
    assert time.perf_counter() - t < 1.0 and w.isVisible() and w.close_question is not None
    w.stop_and_close_button.click()
    qtbot.waitUntil(lambda: not w.isVisible(), timeout=LONG)
    closed_in = time.perf_counter() - t
    assert not worker.running  # the run's thread ended (its checkpoint saved) before the window closed
    # a short job still in flight (reading the runs, checking the library) was cancelled by closing and
    # ends by itself: the window does not wait for it (issue 17)
    qtbot.waitUntil(lambda: not workers.running(), timeout=LONG)
    status = json.loads((Path(page.run_dir) / "status.json").read_text())
    assert status["status"] == "stopped"
    print(f"window closed during training in {closed_in:.2f} s")


def test_gui_stays_responsive_while_training(window, qtbot):
    """A 20 ms heartbeat in the GUI thread never waits more than 200 ms while a run trains."""
    from PySide6.QtCore import QTimer

    page = window.page("train")
    _steps(page, 100_000)
    gaps: list[float] = []
    last = [time.perf_counter()]

    def beat():
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(beat)
    page.start()
    qtbot.waitUntil(lambda: page.plot.steps_received >= 1, timeout=LONG)  # past loading and tokenising
    last[0] = time.perf_counter()
    timer.start()
    qtbot.wait(4000)
    timer.stop()
    steps = page.plot.steps_received
    page.stop()
    _run_until_done(qtbot, page)
    worst = max(gaps)
    print(f"heartbeat: {len(gaps)} beats over {steps} training steps, worst gap {1000 * worst:.0f} ms, "
          f"median {1000 * sorted(gaps)[len(gaps) // 2]:.0f} ms")
    assert steps >= 3
    assert worst < 0.200


def test_stop_before_the_first_step(window, qtbot):
    from core.library import Library

    page = window.page("train")
    _steps(page, 50)
    page.start()
    assert not page.pause_button.isEnabled()  # nothing to pause before the first step
    page.stop()
    _run_until_done(qtbot, page)
    assert page.last_result is not None and page.last_result.status == "stopped"
    assert page.plot.steps_received == 0
    assert "nothing to add" in page.status.text()
    assert Library().entries() == []
    assert page.start_button.isEnabled()
