"""The Evaluate page over real core.evaluate on a tiny checkpoint: an adapter from the library against
the base model, both tables filled, scores stored with the adapter, export, and Cancel. Offscreen."""

from __future__ import annotations

import json

import pytest
import torch

import pytestqt  # noqa: F401  (a missing module fails, never skips)

from PySide6.QtCore import Qt  # noqa: E402

from core import adapter as adapter_io  # noqa: E402
from core import lora, models, targets  # noqa: E402
from core.library import Library  # noqa: E402
from studio.pages.evaluate import EvaluatePage  # noqa: E402
from studio.state import StudioState  # noqa: E402


@pytest.fixture
def page(qtbot, tmp_path, checkpoint):
    loaded = models.load_model(str(checkpoint), device="cpu")
    torch.manual_seed(1)
    lora.inject_adapter(loaded.model, targets.resolve_targets(loaded.model, "attention-qv"), "x", rank=4)
    for _, layer in lora.lora_layers(loaded.model):
        torch.nn.init.normal_(layer.lora_B["x"], std=0.5)
    folder = adapter_io.save_adapter(loaded.model, tmp_path / "made" / "qv", "x", base_model=str(checkpoint))
    entry = Library().add_folder(folder, name="qv-four")
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?", "completion": json.dumps({"sum": 2 * i})})
                            + "\n" for i in range(6)))
    state = StudioState()
    state.config.model.source = str(checkpoint)
    p = EvaluatePage(state, None)
    qtbot.addWidget(p)
    p.resize(1300, 760)
    p.path.setText(str(held))
    p.max_new.setValue(6)
    p.batch.setValue(2)
    for m in ("json_valid", "json_fields"):
        p.metric_boxes[m].setChecked(True)
    p.adapter_list.item(0).setCheckState(Qt.CheckState.Checked)
    return p, entry


def test_evaluate_fills_both_tables_stores_and_exports(page, qtbot, tmp_path):
    p, entry = page
    assert p.start_button.isEnabled() and not p.cancel_button.isEnabled()
    p.start_button.click()
    qtbot.waitUntil(lambda: p.worker is None, timeout=120_000)
    assert p.result is not None, p.status.text()
    assert [p.summary.verticalHeaderItem(i).text() for i in range(2)] == ["base", "qv-four"]
    heads = [p.summary.horizontalHeaderItem(j).text() for j in range(p.summary.columnCount())]
    assert heads[:3] == ["exact_match", "bleu", "chrf"] and heads[-2:] == ["loss", "perplexity"]
    assert "BLEU" in p.summary.horizontalHeaderItem(1).toolTip()
    assert p.examples.rowCount() == 6 and p.examples.horizontalHeaderItem(7).text().startswith("Δ ")
    stored = json.loads((entry.path / "evaluation.json").read_text())
    assert stored["scores"] == p.result.systems[1].scores and stored["base_scores"] == p.result.systems[0].scores
    p.export(str(tmp_path / "e.csv"), "csv")
    assert (tmp_path / "e.csv").read_text().splitlines()[1].startswith("base,")
    p.export(str(tmp_path / "e.json"), "json")
    assert len(json.loads((tmp_path / "e.json").read_text())["predictions"]) == 12
    p.sort_metric.setCurrentText("json_fields")
    p.examples.sortItems(7, Qt.SortOrder.DescendingOrder)
    p.grab().save(str(tmp_path / "evaluate.png"))


def test_cancel_stops_and_shows_no_result(page, qtbot):
    p, _ = page
    p.max_new.setValue(200)
    p.start_button.click()
    p.cancel_button.click()
    qtbot.waitUntil(lambda: p.worker is None, timeout=120_000)
    assert p.result is None and p.status.text() == "Cancelled."
    assert p.start_button.isEnabled()


def test_the_library_shows_the_stored_evaluation(page, qtbot):
    from studio.pages.library import LibraryPage

    p, entry = page
    p.start_button.click()
    qtbot.waitUntil(lambda: p.worker is None, timeout=120_000)
    lib = LibraryPage(p.state, None)
    qtbot.addWidget(lib)
    lib._show_entry(Library().get(entry.id))
    text = lib.facts.text()
    assert "Evaluation" in text and "bleu" in text and "(base " in text and "6 examples of held.jsonl" in text


def test_it_answers_on_the_windows_model_and_waits_for_the_job_that_holds_it(page, qtbot):
    from core import adapter as adapter_io

    p, entry = page
    state = p.state
    errors: list[str] = []
    state.error.connect(errors.append)
    p.start_button.click()  # no model loaded yet: it loads the Model page's choice into the window
    qtbot.waitUntil(lambda: p.worker is None, timeout=120_000)
    first = state.loaded
    assert p.result is not None and first is not None and not state.session.holders()
    assert state.session.history == ["evaluate"]
    p.start_button.click()  # the second answers on the same model: no second copy
    qtbot.waitUntil(lambda: p.worker is None, timeout=120_000)
    assert state.loaded is first and state.session.view.adapters == ()  # its adapters taken off again

    ticket = state.session.acquire("train", "training run-1")
    try:
        p.start_button.click()
        assert p.worker is None and errors[-1] == ("The model is busy: training run-1 is running; wait for it to "
                                                   "end or stop it")
    finally:
        ticket.release()
    with state.session.job("merge") as loaded:  # a merged adapter would make "base" answer as the adapter
        adapter_io.load_adapter(loaded.model, entry.path, "m")
        lora.merge_adapter(loaded.model, "m")
    p.start_button.click()
    qtbot.waitUntil(lambda: p.worker is None, timeout=120_000)
    assert "m is merged into the loaded model's weights, so the base model's answers would be the merged" in errors[-1]
