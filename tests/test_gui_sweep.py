"""The Sweep window over real core.sweep on a tiny checkpoint: the grid and its cost before it starts,
a sweep of two cells to the end (table, heatmap, best cell in the library), the ΔW analysis, and Stop
then Start continuing. Offscreen."""

from __future__ import annotations

import json

import pytestqt  # noqa: F401  (a missing module fails, never skips)

from PySide6.QtCore import Qt  # noqa: E402

from core.library import Library  # noqa: E402
from studio.pages.sweep import SweepDialog  # noqa: E402
from studio.state import StudioState  # noqa: E402


def _dialog(qtbot, tmp_path, checkpoint, steps):
    data = tmp_path / "orders.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?", "completion": str(2 * i)}) + "\n"
                            for i in range(24)))
    state = StudioState()
    cfg = state.config
    cfg.model.source, cfg.model.device = str(checkpoint), "cpu"
    cfg.data.path, cfg.data.val_split = str(data), 0.25
    cfg.train.steps, cfg.train.batch_size, cfg.train.save_every = steps, 2, 1
    d = SweepDialog(state)
    qtbot.addWidget(d)
    d.ranks.setText("1,2")
    for i in range(d.sets.count()):
        d.sets.item(i).setCheckState(Qt.CheckState.Checked if d.sets.item(i).text() in ("q+v", "all-linear")
                                     else Qt.CheckState.Unchecked)
    d.folder.setText(str(tmp_path / "sweep"))
    return d


def test_plan_cost_run_heatmap_and_analysis(qtbot, tmp_path, checkpoint):
    d = _dialog(qtbot, tmp_path, checkpoint, steps=2)
    d.plan_button.click()
    qtbot.waitUntil(lambda: d.worker is None, timeout=60_000)
    rows = [[d.table.item(i, j).text() for j in range(4)] for i in range(d.table.rowCount())]
    assert rows == [["all-linear", "1", "", "1,024"], ["all-linear", "2", "", "2,048"], ["q+v", "1", "", "224"],
                    ["q+v", "2", "", "448"]]
    assert d.cost.text().startswith("4 cells, 4 to train × 2 steps = 8 steps")
    d.start_button.click()
    qtbot.waitUntil(lambda: d.worker is None, timeout=240_000)
    assert [c.status for c in d.cells] == ["finished"] * 4, d.status.text()
    assert d.heat.rowCount() == 2 and d.heat.columnCount() == 2 and d.heat.item(1, 1).text()
    best = next(c for c in d.cells if c.best)
    assert "Best: " + best.key in d.status.text()
    assert [e.name for e in Library().entries()] == [f"{d.state.config.name or 'sweep'}-{best.key}"]
    d.analyse_button.click()
    qtbot.waitUntil(lambda: d.worker is None, timeout=60_000)
    assert "effective rank" in d.analysis.text() and "φ(r=1, r=2)" in d.analysis.text()
    d.plan_button.click()  # the grid of a finished sweep costs nothing more
    qtbot.waitUntil(lambda: d.worker is None, timeout=60_000)
    assert "0 to train" in d.cost.text() and "measured in this sweep's" in d.cost.text()
    for c in d.cells:  # Evaluate's scores of the cells (the E2E study writes BLEU) can be the heatmap's
        c.metrics = {"bleu": 10.0 * c.rank}
    d.show_cells(d.cells)
    d.heat_value.setCurrentText("metrics.bleu")
    assert [d.heat.item(i, 0).text() for i in range(2)] == ["10.0000", "20.0000"]
    d.heat_value.setCurrentText("best_eval_loss")
    d.grab().save(str(tmp_path / "sweep.png"))


def test_stop_then_start_continues(qtbot, tmp_path, checkpoint):
    d = _dialog(qtbot, tmp_path, checkpoint, steps=30)
    d.start_button.click()
    qtbot.waitUntil(lambda: d.progress.value() >= 2, timeout=120_000)
    d.stop_button.click()
    qtbot.waitUntil(lambda: d.worker is None, timeout=120_000)
    assert d.cells[0].status == "stopped" and all(c.status == "pending" for c in d.cells[1:])
    assert "Start continues them" in d.status.text()
    d.start_button.click()
    qtbot.waitUntil(lambda: d.worker is None, timeout=240_000)
    assert [c.status for c in d.cells] == ["finished"] * 4, d.status.text()
    from core.runs import read_metrics

    steps = [r["step"] for r in read_metrics(tmp_path / "sweep" / d.cells[0].run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 31))  # the stopped cell went on from its checkpoint


def test_the_sweep_trains_the_windows_model_and_waits_for_the_job_that_holds_it(qtbot, tmp_path, checkpoint):
    from core import models

    d = _dialog(qtbot, tmp_path, checkpoint, steps=1)
    d.ranks.setText("1")
    state = d.state
    state.set_loaded(models.load_model(str(checkpoint), device="cpu"))
    loaded = state.loaded
    ticket = state.session.acquire("generate", "a Playground generation")
    try:
        d.start_button.click()
        assert d.worker is None and d.status.text() == ("The model is busy: a Playground generation is running; "
                                                        "wait for it to end or stop it")
    finally:
        ticket.release()
    d.start_button.click()
    assert [t.label for t in state.session.holders()] == ["the sweep"]  # taken on the click
    qtbot.waitUntil(lambda: d.worker is None, timeout=240_000)
    assert [c.status for c in d.cells] == ["finished"] * 2, d.status.text()
    assert state.loaded is loaded and state.session.view.adapters == ()  # the same model; the cells' adapters off again
    assert not state.session.holders()
