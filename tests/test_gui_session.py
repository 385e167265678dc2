"""One owner of the model, seen from the window: a run started from the Train page trains the model
the window holds (no second copy) and holds it, so a Playground generation and a Library merge are
refused with one message naming the run; closing the window while a job runs never waits on the
GUI thread, and the process then ends by itself, also when a job does not stop in time."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import pytestqt  # noqa: F401  (a missing module fails, never skips)

from test_gui_train import LONG, _steps, dataset, window  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_trains_the_windows_model_and_other_jobs_are_refused_naming_it(window, qtbot):  # noqa: F811
    from core import models

    state = window.state
    m = state.config.model
    m.device = "cpu"
    state.set_loaded(models.load_model(m.source, device="cpu", precision=m.precision))
    loaded = state.loaded
    train = window.page("train")
    _steps(train, 100_000)
    errors: list[str] = []
    state.error.connect(errors.append)
    assert train.start()
    qtbot.waitUntil(lambda: train.plot.steps_received >= 1, timeout=LONG)
    holders = state.session.holders()
    assert [t.job for t in holders] == ["train"] and state.loaded is loaded  # the same model, trained on

    window.show_page("playground")
    play = window.page("playground")
    play.generate_button.click()
    assert play.worker is None
    refusal = f"The model is busy: {holders[0].label} is running; wait for it to end or stop it"
    assert errors[-1] == refusal and window.message_bar.text() == refusal
    assert refusal in play.availability.text()

    library = window.page("library")
    library.load_model()  # a load is refused too (it would replace the model under the run)
    assert errors[-1] == refusal and state.loaded is loaded
    errors.clear()
    window.page("model").load_model()  # the Model page's Load (or Reload) as well, before reading anything
    assert errors == [refusal] and window.page("model").load_panel.worker is None
    train.stop()
    qtbot.waitUntil(lambda: train.worker is None and not state.session.holders(), timeout=LONG)
    assert state.loaded is loaded and state.session.view.adapters == ()  # the run's adapter taken off again
    play.greedy.setChecked(True)
    play.max_tokens.setValue(4)
    play.generate_button.click()
    assert play.worker is not None
    qtbot.waitUntil(lambda: play.worker is None, timeout=LONG)
    assert len(play.results) == 2


def test_start_is_refused_while_a_generation_holds_the_model(window, qtbot):  # noqa: F811
    from core import models

    state = window.state
    state.set_loaded(models.load_model(state.config.model.source, device="cpu"))
    ticket = state.session.acquire("generate", "a Playground generation")
    try:
        assert not window.page("train").start()
        assert window.message_bar.text() == ("The model is busy: a Playground generation is running; wait for it "
                                             "to end or stop it")
        assert window.page("train").worker is None
    finally:
        ticket.release()


def test_the_model_pages_reload_holds_the_model_and_lets_the_old_one_go_first(window, qtbot):  # noqa: F811
    import gc
    import weakref

    from core import models

    state = window.state
    state.config.model.device = "cpu"
    state.set_loaded(models.load_model(state.config.model.source, device="cpu"))
    old = weakref.ref(state.loaded.model)
    page = window.page("model")
    page.load_model()
    panel = page.load_panel
    assert panel.worker is not None
    assert [t.job for t in state.session.holders()] == ["load"]  # taken on the click, before any reading
    assert state.session.busy_message("generate") == ("The model is busy: loading the model is running; wait for "
                                                      "it to end or stop it")
    qtbot.waitUntil(lambda: panel.worker is None, timeout=LONG)
    assert state.loaded is not None and not state.session.holders()
    assert panel.load_button.text() == "Reload model"
    gc.collect()
    assert old() is None  # nothing kept the replaced weights: a reload never holds two copies after it


CLOSE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from PySide6.QtCore import QTimer
    import studio.app as app_module
    from studio import workers

    saved, grace, stubborn = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "stubborn"
    app_module.CLOSE_GRACE_S = grace

    def job(*, cancelled):  # like an export: stops at its next safe point, then saves
        while not cancelled():
            time.sleep(0.01)
        if stubborn:
            time.sleep(120)  # a job that does not stop in time
        time.sleep(0.5)
        saved.write_text("saved")

    app = app_module.make_app()
    window = app_module.MainWindow(background=False)
    window.show()
    worker = workers.FunctionWorker(job)
    worker.heavy = False
    workers.start(worker)

    def close():
        t = time.perf_counter()
        window.close()
        print(f"close returned in {time.perf_counter() - t:.3f} s", flush=True)

    QTimer.singleShot(300, close)
    sys.exit(app_module.leave(app.exec()))
""")


@pytest.mark.parametrize("kind", ["stops", "stubborn"])
def test_closing_with_a_job_running_never_blocks_and_the_process_ends_by_itself(tmp_path, kind):
    script = tmp_path / "close.py"
    script.write_text(CLOSE_SCRIPT, encoding="utf-8")
    saved = tmp_path / "saved.txt"
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(script), str(saved), "1.5", kind], cwd=ROOT, capture_output=True,
                       text=True, timeout=90)
    took = time.perf_counter() - t
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Fatal" not in p.stderr and "Abort" not in p.stderr
    closed = float(p.stdout.split("close returned in ")[1].split()[0])
    assert closed < 0.5  # the window never waited for the job
    if kind == "stops":
        assert saved.read_text() == "saved"  # what the job had to save was saved before the exit
    else:
        assert not saved.exists() and took < 60  # left behind after the grace period, no abort


def test_a_jobs_ticket_is_back_before_the_page_hears_that_it_ended(qtbot):
    """A page re-enables its buttons when its job's worker reports; the model must already be free
    then, or the next click (Generate right after Unmerge) is refused by a job that is over."""
    from core.session import ModelSession
    from studio import workers

    session = ModelSession()
    seen = []
    for outcome in ("finished", "failed"):
        ticket = session.acquire("unmerge")

        def job(outcome=outcome):
            time.sleep(0.05)
            if outcome == "failed":
                raise ValueError("the job failed")
            return 1

        w = workers.FunctionWorker(job)
        w.heavy = False
        getattr(w, outcome).connect(lambda *_a: seen.append(ticket.released))
        with qtbot.waitSignal(w.done, timeout=10_000):
            workers.start(w, ticket=ticket)
    assert seen == [True, True]
