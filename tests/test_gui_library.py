"""The Library page over a real core.library with adapters made by core.lora + core.adapter on a tiny
checkpoint: listing, search, sort, notes, rename, delete and undo, apply/swap/merge/unmerge (checked
on the model's logits), an incompatible adapter greyed and refused, combine, export, import, and the
ΔW analysis; Compare runs; and the whole flow from the Train page through the Library to a merged
export and the Playground. Offscreen; dialogs are answered through the page's ask_* hooks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pytestqt  # noqa: F401  (a missing module fails, never skips)

from PySide6.QtCore import Qt  # noqa: E402

from conftest import TOKENIZER_VOCAB, tiny_llama, token_batch  # noqa: E402
from core import adapter as adapter_io  # noqa: E402
from core import lora, models  # noqa: E402
from core.library import Library  # noqa: E402
from studio.pages.library import COLUMN, LibraryPage  # noqa: E402
from studio.state import StudioState  # noqa: E402

ATTN_QV = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
           "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
MLP = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]


def make_adapter(folder: Path, model, targets, *, rank, seed, base: str, curve=None, alpha=None):
    """An adapter with random nonzero B (so it changes outputs) written by core.adapter."""
    lora.inject_adapter(model, targets, "tmp", rank=rank, alpha=alpha or 2 * rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            if "tmp" in layer.lora_B:
                layer.lora_B["tmp"].copy_(torch.randn(layer.lora_B["tmp"].shape, generator=g) * 0.5)
    studio = {}
    if curve:
        studio = {"loss_curve": curve, "training": {"steps": len(curve), "final_loss": curve[-1][1]}}
    adapter_io.save_adapter(model, folder, "tmp", base_model=base, studio=studio)
    lora.remove_adapter(model, "tmp")
    return folder


@pytest.fixture
def setup(tmp_path, checkpoint):
    """A library with three adapters for the tiny checkpoint and one for another architecture."""
    base = str(checkpoint)
    loaded = models.load_model(base, device="cpu")
    lib = Library()
    made = tmp_path / "made"
    a = lib.add_folder(make_adapter(made / "qv", loaded.model, ATTN_QV, rank=4, seed=1, base=base,
                                    curve=[[1, 2.5], [2, 2.1], [3, 1.7]]), name="qv-small")
    b = lib.add_folder(make_adapter(made / "mlp", loaded.model, MLP, rank=8, seed=2, base=base,
                                    curve=[[1, 3.0], [2, 2.0]]), name="mlp-wide")
    c = lib.add_folder(make_adapter(made / "qv2", loaded.model, ATTN_QV, rank=2, seed=3, base=base),
                       name="qv-other")
    other = tiny_llama(seed=5, vocab_size=TOKENIZER_VOCAB, hidden_size=48, num_attention_heads=4,
                       num_key_value_heads=2)
    d = lib.add_folder(make_adapter(made / "wide", other, ATTN_QV, rank=4, seed=4, base="some/other-model"),
                       name="other-arch")
    return {"loaded": loaded, "lib": lib, "entries": {e.name: e for e in (a, b, c, d)}, "base": base}


@pytest.fixture
def page(qtbot, setup):
    state = StudioState()
    state.config.model.source = setup["base"]
    state.config.model.device = "cpu"
    p = LibraryPage(state)
    p.resize(1300, 800)
    qtbot.addWidget(p)
    p.show()
    yield p
    p.shutdown()
    for w in (p.job, p.check_worker, p.analysis_worker):
        if w is not None:
            w.wait(20_000)


def names_in_view(page) -> list[str]:
    col = COLUMN["name"]
    return [page.proxy.index(r, col).data() for r in range(page.proxy.rowCount())]


def wait_idle(qtbot, page, timeout=60_000):
    qtbot.waitUntil(lambda: page.job is None and page.check_worker is None, timeout=timeout)


def load(qtbot, page, setup):
    page.state.set_loaded(setup["loaded"])
    wait_idle(qtbot, page)
    assert len(page.model.compat) == 4


def test_lists_filters_and_sorts(qtbot, page, setup):
    assert sorted(names_in_view(page)) == ["mlp-wide", "other-arch", "qv-other", "qv-small"]
    row = {page.proxy.index(r, COLUMN["name"]).data(): r for r in range(page.proxy.rowCount())}["qv-small"]
    cell = lambda key: page.proxy.index(row, COLUMN[key]).data()  # noqa: E731
    assert cell("rank") == "4" and cell("alpha") == "8"
    assert "q_proj" in cell("targets") and "v_proj" in cell("targets")
    assert cell("loss") == "1.7000"
    assert cell("base_model") == Path(setup["base"]).name  # a folder by its name; the full path in the tooltip
    assert page.proxy.index(row, COLUMN["base_model"]).data(Qt.ItemDataRole.ToolTipRole) == setup["base"]
    page.search.setText("qv")
    assert sorted(names_in_view(page)) == ["qv-other", "qv-small"]
    page.search.setText("down_proj")  # targets are searchable too
    assert names_in_view(page) == ["mlp-wide"]
    page.search.clear()
    i = page.base_filter.findData("some/other-model")
    assert i > 0
    page.base_filter.setCurrentIndex(i)
    assert names_in_view(page) == ["other-arch"]
    page.base_filter.setCurrentIndex(0)
    page.table.sortByColumn(COLUMN["rank"], Qt.SortOrder.AscendingOrder)
    assert names_in_view(page)[0] == "qv-other" and names_in_view(page)[-1] == "mlp-wide"
    page.table.sortByColumn(COLUMN["loss"], Qt.SortOrder.AscendingOrder)
    view = names_in_view(page)
    assert view[:2] == ["qv-small", "mlp-wide"]  # 1.7 < 2.0, adapters without a loss last
    page.table.sortByColumn(COLUMN["loss"], Qt.SortOrder.DescendingOrder)
    assert names_in_view(page)[:2] == ["mlp-wide", "qv-small"]


def test_details_notes_rename_delete_undo(qtbot, page, setup):
    page.select_name("qv-small")
    assert "qv-small" in page.title.text()
    assert "r = 4" in page.facts.text()
    assert page.curve.final_losses() == {"qv-small": pytest.approx(1.7)}
    page.notes.setPlainText("good at questions")
    assert page.save_notes_button.isEnabled()
    page.save_notes_button.click()
    assert Library().resolve("qv-small").notes == "good at questions"
    # notes typed and not saved are saved when the selection moves on
    page.notes.setPlainText("edited again")
    page.select_name("mlp-wide")
    assert Library().resolve("qv-small").notes == "edited again"

    page.select_name("qv-small")
    page.ask_text = lambda *a: "questions-v1"
    page.rename_button.click()
    assert "questions-v1" in names_in_view(page) and "qv-small" not in names_in_view(page)
    assert [e.name for e in page.selected_entries()] == ["questions-v1"]

    page.select_name("questions-v1")
    page.delete_button.click()
    assert "questions-v1" not in names_in_view(page)
    assert page.undo_bar.isVisible() and "questions-v1" in page.undo_bar.label.text()
    assert [e.name for e in Library().trash()] == ["questions-v1"]
    page.undo_bar.undo.click()
    assert "questions-v1" in names_in_view(page)
    restored = Library().resolve("questions-v1")
    assert restored.notes == "edited again"
    assert not page.undo_bar.isVisible()


def reference_logits(setup, name: str | None, merged=False):
    """Logits of a fresh copy of the base model with library adapter ``name`` loaded by core.adapter."""
    fresh = models.load_model(setup["base"], device="cpu").model
    if name:
        adapter_io.load_adapter(fresh, setup["entries"][name].path, name="x")
        if merged:
            lora.merge_adapter(fresh, "x")
    with torch.no_grad():
        return fresh(token_batch(vocab=TOKENIZER_VOCAB)).logits


def logits(model):
    with torch.no_grad():
        return model(token_batch(vocab=TOKENIZER_VOCAB)).logits


def test_apply_swap_merge_unmerge_change_outputs(qtbot, page, setup):
    load(qtbot, page, setup)
    model = setup["loaded"].model
    base = logits(model)
    page.select_name("qv-small")
    assert page.apply_button.isEnabled()
    assert not page.swap_button.isEnabled()  # nothing active to swap out yet
    page.apply_button.click()
    wait_idle(qtbot, page)
    qv = setup["entries"]["qv-small"].id
    assert lora.active_adapters(model) == [qv]
    torch.testing.assert_close(logits(model), reference_logits(setup, "qv-small"), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(model), base, atol=1e-3)
    assert page.model.on_model == {qv: "active"}
    assert "qv-small (active)" in page.model_line.text()

    page.select_name("mlp-wide")
    assert page.swap_button.isEnabled()
    page.swap_button.click()
    wait_idle(qtbot, page)
    mlp = setup["entries"]["mlp-wide"].id
    assert lora.active_adapters(model) == [mlp]
    torch.testing.assert_close(logits(model), reference_logits(setup, "mlp-wide"), atol=1e-5, rtol=0)

    unmerged = logits(model)
    page.merge_button.click()
    wait_idle(qtbot, page)
    assert lora.merged_adapters(model) == [mlp]
    assert page.model.on_model[mlp] == "merged"
    torch.testing.assert_close(logits(model), unmerged, atol=1e-4, rtol=0)
    assert page.unmerge_button.isEnabled()
    page.unmerge_button.click()
    wait_idle(qtbot, page)
    assert lora.merged_adapters(model) == []
    torch.testing.assert_close(logits(model), unmerged, atol=1e-4, rtol=0)

    page.detach_button.click()
    wait_idle(qtbot, page)
    assert mlp not in lora.adapter_names(model)
    page.select_name("qv-small")
    page.detach_button.click()
    wait_idle(qtbot, page)
    torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=0)


def test_incompatible_adapter_is_greyed_and_cannot_be_applied(qtbot, page, setup):
    load(qtbot, page, setup)
    other = setup["entries"]["other-arch"].id
    assert page.model.compat[other].problems
    assert all(page.model.compat[e.id].ok for n, e in setup["entries"].items() if n != "other-arch")
    page.select_name("other-arch")
    assert not page.apply_button.isEnabled() and not page.merge_button.isEnabled()
    assert "Does not fit" in page.apply_button.toolTip()
    row = names_in_view(page).index("other-arch")
    assert "Cannot be applied" in page.proxy.index(row, 0).data(Qt.ItemDataRole.ToolTipRole)
    assert page.proxy.index(row, 0).data(Qt.ItemDataRole.ForegroundRole) is not None
    assert "Does not fit the loaded model" in page.compat_label.text()
    errors = []
    page.state.error.connect(errors.append)
    page.apply_selected()  # even called directly, it refuses
    assert errors and "cannot be applied" in errors[0]
    assert lora.adapter_names(setup["loaded"].model) == []


def test_fingerprint_mismatch_asks_first(qtbot, page, setup):
    load(qtbot, page, setup)
    entry = setup["entries"]["qv-other"]
    from core.library_jobs import Compat

    page.model.compat[entry.id] = Compat([], ["trained on different weights"])
    page.select_name("qv-other")
    asked = []
    page.ask_confirm = lambda title, text: asked.append(text) or False
    page.apply_button.click()
    assert asked and "different weights" in asked[0]
    assert page.job is None and lora.adapter_names(setup["loaded"].model) == []
    page.ask_confirm = lambda title, text: True
    page.apply_button.click()
    wait_idle(qtbot, page)
    assert lora.active_adapters(setup["loaded"].model) == [entry.id]


def test_export_adapter_folder_and_zip_then_import(qtbot, page, setup, tmp_path):
    page.select_name("mlp-wide")
    dest = tmp_path / "out" / "mlp-folder"
    page.ask_save_path = lambda *a: (str(dest), False)
    page.export_button.click()
    assert (dest / "adapter_config.json").is_file() and (dest / "adapter_model.safetensors").is_file()
    page.ask_save_path = lambda *a: (str(tmp_path / "out" / "mlp"), True)
    page.export_button.click()
    zipped = tmp_path / "out" / "mlp.zip"
    assert zipped.is_file()
    page.ask_import_path = lambda folder: str(zipped)
    page.import_dialog(folder=False)
    assert len(names_in_view(page)) == 5
    new = [e for e in page.selected_entries()]
    assert len(new) == 1 and new[0].name.startswith("mlp-wide") and new[0].name != "mlp-wide"
    assert new[0].rank == 8
    errors = []
    page.state.error.connect(errors.append)
    page.import_path(str(tmp_path / "nothing-here"))
    assert errors and "no such file" in errors[0]


def test_combine_creates_an_entry(qtbot, page, setup):
    import core.combine  # noqa: F401  (a missing module fails, never skips)
    page.select_ids([setup["entries"]["qv-small"].id, setup["entries"]["qv-other"].id])
    assert page.combine_button.isEnabled()
    page.ask_combine = lambda entries, title, with_name: {
        "weights": [1.0 if e.name == "qv-small" else 0.5 for e in entries], "mode": "exact", "rank": None,
        "name": "qv-blend"}
    page.combine_button.click()
    wait_idle(qtbot, page)
    assert "qv-blend" in names_in_view(page)
    blend = Library().resolve("qv-blend")
    assert blend.rank is not None and blend.rank >= 4
    assert "qv-small × 1" in blend.notes and "qv-other × 0.5" in blend.notes
    # "Came from" names the adapters it was combined from, never the temporary folder it was written to
    assert blend.imported_from.startswith("combined (exact sum) from ")
    assert sorted(blend.imported_from.split(" from ", 1)[1].split(", ")) == ["qv-other × 0.5", "qv-small × 1"]
    assert "Came from" in page.facts.text() and blend.imported_from in page.facts.text()
    assert "lora-studio-combine" not in page.facts.text()
    # exact: the combined ΔW is the weighted sum of the two
    a = adapter_io.read_adapter(setup["entries"]["qv-small"].path)
    b = adapter_io.read_adapter(setup["entries"]["qv-other"].path)
    c = adapter_io.read_adapter(blend.path)
    m = ATTN_QV[0]
    torch.testing.assert_close(c.delta(m), a.delta(m) + 0.5 * b.delta(m), atol=1e-5, rtol=1e-4)
    assert [e.name for e in page.selected_entries()] == ["qv-blend"]

    page.select_ids([setup["entries"]["qv-small"].id, setup["entries"]["qv-other"].id])
    page.ask_combine = lambda entries, title, with_name: {"weights": [1.0, 1.0], "mode": "svd", "rank": 2,
                                                          "name": "qv-svd2"}
    page.combine_button.click()
    wait_idle(qtbot, page)
    assert Library().resolve("qv-svd2").rank == 2


def test_window_keeps_its_width_after_combine_and_columns_fit(qtbot, setup, tmp_path):
    """The window never resizes itself: a combined entry's long name and paths elide or wrap; and at
    the default width every column of the table is visible (none hidden off to the right)."""
    from studio.app import MainWindow

    w = MainWindow(background=False)
    qtbot.addWidget(w)
    w.state.config.model.source = setup["base"]
    w.resize(1200, 800)
    w.show()
    w.show_page("library")
    page = w.page("library")
    w.state.set_loaded(setup["loaded"])
    wait_idle(qtbot, page)
    qtbot.waitUntil(lambda: w.width() == 1200)

    def all_columns_visible():
        view = page.table.viewport().width()
        last = max(page.table.columnViewportPosition(c) + page.table.columnWidth(c) for c in range(len(COLUMN)))
        return page.table.horizontalScrollBar().maximum() == 0 and last <= view + 1

    assert all_columns_visible()
    page.select_ids([setup["entries"]["qv-small"].id, setup["entries"]["qv-other"].id])
    long_name = "a combination of qv-small and qv-other with a name longer than any column should be " * 2
    page.ask_combine = lambda entries, title, with_name: {"weights": [1.0, 0.5], "mode": "exact", "rank": None,
                                                          "name": long_name.strip()[:120]}
    page.combine_button.click()
    wait_idle(qtbot, page)
    qtbot.wait(50)
    assert page.current_entry().name.startswith("a combination")
    assert w.width() == 1200
    assert all_columns_visible()
    page.tabs.setCurrentIndex(0)
    w.grab().save(str(tmp_path / "library-after-combine.png"))
    w.close()


def test_combine_dialog_offers_exact_svd_and_task_merges(qtbot, page, setup):
    from studio.widgets.combine_dialog import CombineDialog

    entries = [setup["entries"]["qv-small"], setup["entries"]["qv-other"]]
    d = CombineDialog(entries, title="Combine adapters", with_name=True)
    qtbot.addWidget(d)
    assert d.values()["mode"] == "exact" and d.values()["rank"] is None and not d.rank.isEnabled()
    d.svd.setChecked(True)
    assert d.rank.isEnabled() and not d.task_mode.isEnabled()
    d.rank.setValue(3)
    assert d.values()["mode"] == "svd" and d.values()["rank"] == 3
    d.task.setChecked(True)
    assert d.task_mode.isEnabled() and d.values()["mode"] == "ties"
    d.task_mode.setCurrentIndex(d.task_mode.findData("dare_ties"))
    assert d.values() == {"weights": [1.0, 1.0], "mode": "dare_ties", "rank": 3, "name": d.name.text().strip()}
    from core import combine
    assert {d.task_mode.itemData(i) for i in range(d.task_mode.count())} | {"exact", "svd"} == set(combine.MODES)
    # and a task merge goes all the way through the page
    page.select_ids([e.id for e in entries])
    page.ask_combine = lambda entries, title, with_name: {"weights": [1.0, 1.0], "mode": "ties", "rank": 2,
                                                          "name": "qv-ties"}
    page.combine_button.click()
    wait_idle(qtbot, page)
    assert Library().resolve("qv-ties").rank == 2


def test_export_merged_model_in_a_worker(qtbot, page, setup, tmp_path):
    page.select_name("qv-small")
    out = tmp_path / "merged"
    page.ask_merged_export = lambda suggestion: {"out": str(out), "dtype": "fp32"}
    page.export_merged_button.click()
    assert page.job is not None and page.job_row.isVisible()
    wait_idle(qtbot, page, timeout=120_000)
    assert (out / "config.json").is_file()
    assert page.last_report and Path(page.last_report["out"]) == out
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(plain), reference_logits(setup, "qv-small"), atol=1e-4, rtol=0)


def test_export_merged_offers_bf16_fp16_fp32_and_writes_the_chosen_one(qtbot, page, setup, tmp_path):
    """The window offers the command line's precisions (bf16 first: a quarter of fp32's 517 MiB
    would not have surprised anyone); the written model is in the chosen dtype, with normal modes."""
    import os
    import stat

    from safetensors import safe_open

    from studio.widgets.export_dialog import MergedExportDialog

    d = MergedExportDialog(str(tmp_path / "m"), parameters=134_515_008, checkpoint_dtype="float32")
    qtbot.addWidget(d)
    keys = [d.precision.itemData(i) for i in range(d.precision.count())]
    assert keys == ["bf16", "fp16", "fp32", "auto"] and d.values()["dtype"] == "bf16"
    assert "256.6 MiB" in d.precision.itemText(0) and "513.1 MiB" in d.precision.itemText(2)
    d.precision.setCurrentIndex(1)
    assert d.values() == {"out": str(tmp_path / "m"), "dtype": "fp16"}

    page.select_name("qv-small")
    out = tmp_path / "merged-bf16"
    asked = []
    page.ask_merged_export = lambda suggestion: asked.append(suggestion) or {"out": str(out), "dtype": "bf16"}
    old = os.umask(0o022)
    try:
        page.export_merged_button.click()
        wait_idle(qtbot, page, timeout=120_000)
    finally:
        os.umask(old)
    assert asked and asked[0].endswith("-merged")
    assert page.last_report["dtype"] in ("bf16", "bfloat16", "torch.bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def test_export_merged_cancel_leaves_nothing(qtbot, page, setup, tmp_path):
    page.select_name("qv-small")
    out = tmp_path / "merged-cancelled"
    page.ask_merged_export = lambda suggestion: {"out": str(out), "dtype": "fp32"}
    page.export_merged_button.click()
    with qtbot.waitSignal(page.job.cancelled, timeout=60_000):
        page.job_cancel.click()
    wait_idle(qtbot, page)
    assert not out.exists()


def test_delta_analysis_tab(qtbot, page, setup):
    import core.analysis  # noqa: F401  (a missing module fails, never skips)
    page.select_name("qv-small")
    page.tabs.setCurrentWidget(page.delta)
    qtbot.waitUntil(lambda: bool(page.delta.facts), timeout=30_000)
    assert set(page.delta.facts) == set(ATTN_QV)
    f = page.delta.facts[ATTN_QV[0]]
    assert len(f.singular_values) >= 1 and f.effective_rank is not None and 1 <= f.effective_rank <= 4
    page.delta.choose(ATTN_QV[1])
    assert page.delta.chooser.currentData() == ATTN_QV[1]


def test_empty_library_says_what_to_do(qtbot):
    state = StudioState()
    p = LibraryPage(state)
    qtbot.addWidget(p)
    p.show()
    assert p.empty.isVisible() and "Train an adapter" in p.empty.text()
    assert not p.delete_button.isEnabled() and p.import_button.isEnabled()


# -- Compare runs ------------------------------------------------------------------------------------

def make_run(folder: Path, *, name: str, rank: int, lr: float, losses: list[float], evals=()):
    """A run folder as core.runs writes it: config.json, metrics.jsonl, status.json."""
    from core.config import RunConfig
    from core.runs import RunFolder

    cfg = RunConfig()
    cfg.name, cfg.out = name, str(folder)
    cfg.lora.rank, cfg.train.lr = rank, lr
    run = RunFolder(folder)
    run.write_config(cfg)
    for i, loss in enumerate(losses, start=1):
        run.append_metric({"step": i, "loss": loss, "lr": lr, "tokens": 100 * i, "step_seconds": 0.1})
    for step, v in evals:
        run.append_metric({"step": step, "eval_loss": v})
    run.close()
    run.write_status("finished", step=len(losses), total_steps=len(losses), name=name)
    return folder


def test_compare_runs_overlays_curves_and_highlights_differences(qtbot, tmp_path):
    from core.home import runs_dir
    from studio.pages.compare import ComparePage

    a = make_run(runs_dir() / "run-a", name="rank 4", rank=4, lr=2e-4, losses=[3.0, 2.5, 2.0], evals=[(3, 2.2)])
    b = make_run(runs_dir() / "run-b", name="rank 16", rank=16, lr=2e-4, losses=[3.0, 2.2, 1.6, 1.4])
    elsewhere = make_run(tmp_path / "elsewhere" / "run-c", name="lr high", rank=4, lr=1e-3, losses=[3.1, 2.9])
    page = ComparePage(StudioState())
    qtbot.addWidget(page)
    page.show()
    assert page.run_table.rowCount() == 2
    assert page.config_table.rowCount() == 0
    page.set_checked([str(a), str(b)])
    assert page.curves.final_losses() == {"rank 4": pytest.approx(2.0), "rank 16": pytest.approx(1.4)}
    assert "lora.rank" in page.differing and "train.lr" not in page.differing
    rows = {page.config_table.item(r, 0).text(): r for r in range(page.config_table.rowCount())}
    rank_row, lr_row = rows["lora.rank"], rows["train.lr"]
    assert [page.config_table.item(rank_row, c).text() for c in (1, 2)] in (["4", "16"], ["16", "4"])
    assert page.config_table.item(rank_row, 1).background().color().alpha() > 0
    assert page.config_table.item(lr_row, 1).background().style() == Qt.BrushStyle.NoBrush
    assert page.config_table.item(rows["best validation loss"], 1).text() in ("2.2000", "–")
    page.only_diff.setChecked(True)
    assert not page.config_table.isRowHidden(rank_row) and page.config_table.isRowHidden(lr_row)

    page.add_root(str(elsewhere.parent))
    assert page.run_table.rowCount() == 3
    page.set_checked([str(a), str(b), str(elsewhere)])
    assert "train.lr" in page.differing
    assert len(page.curves.series) == 3


def test_applied_adapter_shows_in_the_playground_by_its_library_name(qtbot, page, setup):
    from studio.pages.playground import PlaygroundPage

    load(qtbot, page, setup)
    page.select_name("qv-small")
    page.apply_button.click()
    wait_idle(qtbot, page)
    play = PlaygroundPage(page.state)
    qtbot.addWidget(play)
    assert play.panes[0].choice.currentText().startswith("Base model")
    assert play.panes[1].choice.currentText() == "adapter: qv-small"
    play.greedy.setChecked(True)
    play.max_tokens.setValue(10)
    play.generate_button.click()
    qtbot.waitUntil(lambda: play.worker is None, timeout=60_000)
    assert len(play.results) == 2 and play.results[0].token_ids != play.results[1].token_ids


def test_merge_does_not_make_other_adapters_look_foreign(qtbot, page, setup):
    """Merging changes the weights the fingerprint hashes; the other adapters still fit, no warning."""
    load(qtbot, page, setup)
    before = {k: (list(v.problems), list(v.warnings)) for k, v in page.model.compat.items()}
    page.select_name("qv-small")
    page.merge_button.click()
    wait_idle(qtbot, page)
    page.reload()  # what happens whenever the page is shown again
    wait_idle(qtbot, page)
    assert {k: (list(v.problems), list(v.warnings)) for k, v in page.model.compat.items()} == before
    # an adapter imported while another is merged is checked on shapes only
    exported = Path(page.library.export(setup["entries"]["qv-other"].id, str(Path(setup["base"]).parent / "x")))
    entry = page.import_path(str(exported))
    wait_idle(qtbot, page)
    assert page.model.compat[entry.id].ok and not page.model.compat[entry.id].warnings


def test_playground_puts_a_library_adapter_on_the_model_when_chosen(qtbot, page, setup):
    from studio.pages.playground import PlaygroundPage

    load(qtbot, page, setup)
    model = setup["loaded"].model
    play = PlaygroundPage(page.state)
    qtbot.addWidget(play)
    labels = [play.panes[1].choice.itemText(i) for i in range(play.panes[1].choice.count())]
    assert "library: mlp-wide" in labels and "library: qv-small" in labels
    assert play.panes[1].select_adapter(setup["entries"]["mlp-wide"].id)
    play.greedy.setChecked(True)
    play.max_tokens.setValue(10)
    play.generate_button.click()
    qtbot.waitUntil(lambda: play.worker is None and not page.state.session.holders(), timeout=60_000)
    mlp = setup["entries"]["mlp-wide"].id
    qtbot.waitUntil(lambda: mlp in page.model.on_model, timeout=10_000)
    assert mlp in lora.adapter_names(model) and lora.active_adapters(model) == []  # loaded, left inactive
    assert page.model.on_model[mlp] == "loaded"  # the Library heard of it
    assert play.panes[1].choice.currentText() == "adapter: mlp-wide"
    assert play.results[0].token_ids != play.results[1].token_ids
    # an adapter that does not fit is refused with one clear message, and the model is left alone
    errors = []
    page.state.error.connect(errors.append)
    assert play.panes[0].select_adapter(setup["entries"]["other-arch"].id)
    play.generate_button.click()
    qtbot.waitUntil(lambda: play.worker is None, timeout=60_000)
    assert errors and "does not fit" in errors[0]
    assert setup["entries"]["other-arch"].id not in lora.adapter_names(model)


def test_delete_key_moves_the_selection_to_the_trash(qtbot, page, setup):
    page.select_name("qv-other")
    page.table.setFocus()
    qtbot.keyClick(page.table, Qt.Key.Key_Delete)
    assert "qv-other" not in names_in_view(page)
    assert [e.name for e in Library().trash()] == ["qv-other"]


# -- the whole flow through the window ---------------------------------------------------------------

def test_trained_adapter_goes_from_the_train_page_to_library_merge_export_and_playground(qtbot, checkpoint,
                                                                                          tmp_path):
    """Train a few steps from the window; the adapter appears in the Library, which loads the model,
    applies and merges it and exports the merged model; the Playground answers with it and without."""
    from studio.app import MainWindow

    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{i} + {i + 1} = {2 * i + 1}."} for i in range(24)]
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    w = MainWindow(background=False)
    qtbot.addWidget(w)
    w.show()
    state = w.state
    with qtbot.waitSignal(state.tokenizer_changed, timeout=120_000, check_params_cb=lambda t: t is not None):
        w.page("model").choose(str(checkpoint))
    state.config.model.device = "cpu"
    state.config.data.path, state.config.data.max_length = str(data_file), 64
    state.config.lora.targets, state.config.lora.rank = "attention-qv", 4
    t = state.config.train
    t.steps, t.batch_size, t.lr, t.save_every, t.warmup = 6, 4, 1e-2, 0, 0
    state.changed("all")
    train = w.page("train")
    train._sync_from_config()
    train.steps.setValue(6)
    assert train.start(cfg=None)
    qtbot.waitUntil(lambda: train.worker is None, timeout=120_000)
    qtbot.waitUntil(lambda: getattr(train, "last_adopted", None) is not None, timeout=60_000)

    library = w.page("library")
    w.show_page("library")
    assert len(library.model.entries) == 1
    entry = library.model.entries[0]
    assert entry.rank == 4 and len(entry.loss_curve) == 6
    library.select_ids([entry.id])
    assert library.curve.final_losses()[entry.name] == pytest.approx(entry.loss_curve[-1][1])
    library.load_model()
    qtbot.waitUntil(lambda: state.loaded is not None, timeout=120_000)
    wait_idle(qtbot, library)
    assert library.model.compat[entry.id].ok
    model = state.loaded.model
    base = logits(model)
    library.apply_button.click()
    wait_idle(qtbot, library)
    tuned = logits(model)
    assert not torch.allclose(base, tuned, atol=1e-4)
    library.merge_button.click()
    wait_idle(qtbot, library)
    torch.testing.assert_close(logits(model), tuned, atol=1e-4, rtol=0)

    out = tmp_path / "merged"
    library.ask_merged_export = lambda suggestion: {"out": str(out), "dtype": "fp32"}
    library.export_merged_button.click()
    wait_idle(qtbot, library, timeout=120_000)
    from transformers import AutoModelForCausalLM

    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out).eval()), tuned, atol=1e-4, rtol=0)
    library.unmerge_button.click()
    wait_idle(qtbot, library)

    play = w.page("playground")
    w.show_page("playground")
    assert play.panes[1].selected()["name"] == entry.id
    play.greedy.setChecked(True)
    play.max_tokens.setValue(12)
    play.generate_button.click()
    qtbot.waitUntil(lambda: play.worker is None, timeout=60_000)
    assert len(play.results) == 2 and all(p.stats.text().endswith(("turn", "limit")) for p in play.panes)
    w.close()


def test_list_sorts_by_the_scores_evaluate_stored_with_each_adapter(qtbot, page, setup):
    """Issue 16: the Score column shows the chosen metric of each adapter's evaluation.json and sorts
    by it, adapters never evaluated last; the metric is chosen beside the search box."""
    from core import atomic

    assert not page.score_metric.isVisible() and page.table.isColumnHidden(COLUMN["score"])
    for name, em, chrf in (("qv-small", 0.25, 41.0), ("mlp-wide", 0.75, 38.5), ("qv-other", 0.5, None)):
        scores = {"exact_match": em, **({"chrf": chrf} if chrf is not None else {})}
        atomic.write_json(setup["entries"][name].path / "evaluation.json",
                          {"data": "held-out.jsonl", "examples": 8, "scores": scores, "base_scores": None})
    page.reload()
    assert [page.score_metric.itemData(i) for i in range(page.score_metric.count())] == ["exact_match", "chrf"]
    assert not page.table.isColumnHidden(COLUMN["score"])
    assert page.model.headerData(COLUMN["score"], Qt.Orientation.Horizontal) == "exact_match"
    page.table.sortByColumn(COLUMN["score"], Qt.SortOrder.DescendingOrder)
    assert names_in_view(page) == ["mlp-wide", "qv-other", "qv-small", "other-arch"]
    page.table.sortByColumn(COLUMN["score"], Qt.SortOrder.AscendingOrder)
    assert names_in_view(page) == ["qv-small", "qv-other", "mlp-wide", "other-arch"]
    page.score_metric.setCurrentIndex(page.score_metric.findData("chrf"))
    assert page.model.headerData(COLUMN["score"], Qt.Orientation.Horizontal) == "chrf"
    page.table.sortByColumn(COLUMN["score"], Qt.SortOrder.DescendingOrder)
    assert names_in_view(page)[:2] == ["qv-small", "mlp-wide"]  # 41.0 > 38.5; the others have no chrF
    row = names_in_view(page).index("qv-small")
    assert page.proxy.index(row, COLUMN["score"]).data() == "41.0"
