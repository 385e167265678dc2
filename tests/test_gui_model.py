"""The Model page (pytest-qt, offscreen): trust_remote_code belongs to one model, the bundled default
says what it is (a 4-bit GGUF de-quantised), and the page's parts (list, summary, memory, load) work
together after the page was split into them."""

from __future__ import annotations

import json

import pytest

import pytestqt  # noqa: F401  (a missing module fails, never skips)
from conftest import tiny_checkpoint

LONG = 60_000  # ms; the first worker imports torch and transformers


@pytest.fixture
def page(qtbot, checkpoint):
    from studio.pages.model import ModelPage
    from studio.state import StudioState

    state = StudioState()
    state.config.model.source = str(checkpoint)
    p = ModelPage(state)
    qtbot.addWidget(p)
    p.show()
    with qtbot.waitSignal(state.tokenizer_changed, timeout=LONG, check_params_cb=lambda t: t is not None):
        state.refresh_model_info()
    yield p
    p.shutdown()


def _remote_code_checkpoint(folder):
    """A checkpoint whose config names an architecture only its own Python code defines (auto_map)."""
    folder = tiny_checkpoint(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="acme-custom", auto_map={"AutoConfig": "configuration_acme.AcmeConfig",
                                                   "AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_trust_remote_code_is_cleared_when_the_page_switches_model(page, qtbot, tmp_path):
    state = page.state
    page.trust.setChecked(True)
    assert state.config.model.trust_remote_code is True
    qtbot.waitUntil(lambda: state.tokenizer is not None, timeout=LONG)  # read again with the permission
    other = _remote_code_checkpoint(tmp_path / "acme")
    with qtbot.waitSignal(state.model_info_failed, timeout=LONG) as failed:
        page.model_list.picked.emit(str(other))  # what a click on its row does
    # not carried over: the other model's code is refused until it is allowed for that model
    assert state.config.model.source == str(other)
    assert state.config.model.trust_remote_code is False and not page.trust.isChecked()
    assert "only when you allow it for that model" in failed.args[0]
    # choosing the same model again keeps a permission given to it
    page.trust.setChecked(True)
    page.choose(str(other))
    assert state.config.model.trust_remote_code is True and page.trust.isChecked()


def test_a_model_change_from_elsewhere_clears_it_too(page, qtbot, tmp_path):
    """The Train page's 'load settings' and the Hub box choose models through the state as well."""
    page.trust.setChecked(True)
    second = tiny_checkpoint(tmp_path / "second")
    with qtbot.waitSignal(page.state.tokenizer_changed, timeout=LONG, check_params_cb=lambda t: t is not None):
        page.state.set_model(str(second))
    assert not page.trust.isChecked() and page.state.config.model.trust_remote_code is False
    assert page.summary_labels["name"].text().startswith("second")


def test_the_bundled_default_says_it_is_a_dequantised_4_bit_gguf(qtbot):
    from studio.pages.model_summary import SummaryBox

    box = SummaryBox()
    qtbot.addWidget(box)
    box.show()
    default = {"name": "SmolLM2-135M-Instruct", "kind": "default", "dtype": "GGUF Q4_1", "parameters": 134515008,
               "converted": True, "size_bytes": 97_000_000, "chat_template": True}
    box.show_summary(default, "bfloat16")
    note = box.note.text()
    assert box.note.isVisible()
    assert note.startswith("SmolLM2-135M-Instruct from a 4-bit GGUF (Q4_1), de-quantised to bfloat16.")
    assert "close to, but not identical to, one trained on the original HuggingFaceTB/SmolLM2-135M-Instruct" in note
    assert box.labels["dtype"].text() == "GGUF Q4_1" and box.labels["name"].text().endswith("(bundled)")
    box.show_summary(dict(default, converted=False), None)  # before the first-use conversion
    assert "de-quantised once, on first use" in box.note.text()
    box.show_summary({"name": "tiny", "kind": "folder", "dtype": "float32", "chat_template": False})
    assert not box.note.isVisible() and box.note.text() == ""
    # a model without a chat template: the summary points at the choice, it does not pick one silently
    assert box.labels["chat_template"].text() == "none (choose one on the Data page)"


def test_list_summary_and_memory_follow_the_chosen_model(page, qtbot, tmp_path):
    page.refresh_list()
    qtbot.waitUntil(lambda: page.table.rowCount() > 0, timeout=LONG)
    specs = [m["spec"] for m in page.models]
    assert page.state.config.model.source in specs and "default" in specs
    assert page.summary_labels["architecture"].text() == "LlamaForCausalLM"
    assert not page.summary_box.note.isVisible()  # a folder of the user's: nothing to say
    qtbot.waitUntil(lambda: page.memory is not None, timeout=LONG)
    assert page.memory_labels["total"].text() not in ("…", "–") and "batch" in page.memory_note.text()
    page.state.training = True  # no model change during a run; the list goes back to the chosen row
    page.choose("default")
    assert page.state.config.model.source != "default"
