"""The Playground page: loads the session's model, streams two answers (base vs adapter) side by side
in a worker, stops on request, and stays off while the model trains. Tiny checkpoint, offscreen."""

from __future__ import annotations

import pytest
import torch

import pytestqt  # noqa: F401  (a missing module fails, never skips)

from core import lora  # noqa: E402
from core.generate import generate  # noqa: E402
from studio.pages.playground import BASE, PlaygroundPage  # noqa: E402
from studio.state import StudioState  # noqa: E402

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture
def page(qtbot, checkpoint):
    state = StudioState()
    state.config.model.source = str(checkpoint)
    state.config.model.device = "cpu"
    p = PlaygroundPage(state)
    qtbot.addWidget(p)
    yield p
    p.shutdown()
    for w in (p.worker, p.load_worker):
        if w is not None:
            w.wait(10_000)


def _load(qtbot, page):
    assert page.state.loaded is None
    assert not page.generate_button.isEnabled()
    assert "No model is loaded" in page.availability.text()
    with qtbot.waitSignal(page.state.loaded_changed, timeout=60_000):
        page.load_button.click()
    qtbot.waitUntil(lambda: page.load_worker is None, timeout=10_000)
    return page.state.loaded


def _add_adapter(page, name="tuned", seed=3):
    """An adapter with random B put on the model as a job of the session (which then shows it)."""
    with page.state.session.job("apply") as loaded:
        lora.inject_adapter(loaded.model, TARGETS, name, rank=4)
        torch.manual_seed(seed)
        for _, layer in lora.lora_layers(loaded.model):
            if name in layer.lora_B:
                torch.nn.init.normal_(layer.lora_B[name], std=2.0)


def _run(qtbot, page):
    page.generate_button.click()
    assert page.worker is not None
    assert page.stop_button.isEnabled() and not page.generate_button.isEnabled()
    qtbot.waitUntil(lambda: page.worker is None, timeout=60_000)


def test_base_and_adapter_answers_stream_side_by_side(qtbot, page):
    loaded = _load(qtbot, page)
    assert page.generate_button.isEnabled()
    assert "No adapter yet" in page.availability.text()
    _add_adapter(page)
    page.state.library_changed.emit()  # what the Library page says after applying an adapter
    assert [page.panes[1].choice.itemText(i) for i in range(page.panes[1].choice.count())] == [BASE, "adapter: tuned"]
    assert page.panes[0].selected() is None and page.panes[1].selected()["name"] == "tuned"

    page.greedy.setChecked(True)
    page.max_tokens.setValue(12)
    page.prompt.setPlainText("Write a haiku")
    _run(qtbot, page)
    base, tuned = (p.answer() for p in page.panes)
    assert len(page.results) == 2
    assert "tokens/s" in page.panes[0].stats.text() and "tokens/s" in page.panes[1].stats.text()
    # each pane holds exactly what core.generate gives for that choice
    active_before = lora.active_adapters(loaded.model)
    lora.set_active_adapters(loaded.model, [])
    assert base == generate(loaded.model, loaded.tokenizer, "Write a haiku", max_new_tokens=12, greedy=True)
    lora.set_active_adapters(loaded.model, ["tuned"])
    assert tuned == generate(loaded.model, loaded.tokenizer, "Write a haiku", max_new_tokens=12, greedy=True)
    lora.set_active_adapters(loaded.model, active_before)
    assert base != tuned
    assert page.results[0].token_ids != page.results[1].token_ids
    # the worker put the model's active adapters back as they were
    assert lora.active_adapters(loaded.model) == ["tuned"]


def test_two_adapters_and_streamed_pieces(qtbot, page):
    loaded = _load(qtbot, page)
    _add_adapter(page, "one", seed=1)
    _add_adapter(page, "two", seed=2)
    page.refresh()
    assert page.panes[0].select_adapter("one") and page.panes[1].select_adapter("two")
    page.refresh()  # a refresh keeps what the user chose
    assert page.panes[0].selected()["name"] == "one" and page.panes[1].selected()["name"] == "two"
    page.greedy.setChecked(True)
    page.max_tokens.setValue(10)
    pieces: dict[int, list[str]] = {0: [], 1: []}
    page.generate_button.click()
    page.worker.progress.connect(lambda item: item[0] == "token" and pieces[item[1]].append(item[2]))
    qtbot.waitUntil(lambda: page.worker is None, timeout=60_000)
    assert pieces[0] and pieces[1]
    assert "".join(pieces[0]) == page.panes[0].answer() == page.results[0].text
    assert "".join(pieces[1]) == page.panes[1].answer() == page.results[1].text


def test_stop_ends_generation(qtbot, page):
    _load(qtbot, page)
    page.max_tokens.setValue(120)
    page.generate_button.click()
    with qtbot.waitSignal(page.worker.cancelled, timeout=30_000):
        page.stop_button.click()
    qtbot.waitUntil(lambda: page.worker is None, timeout=10_000)
    assert page.generate_button.isEnabled()
    assert len(page.results) < 2
    assert any(p.stats.text() in ("stopped", "not generated") for p in page.panes)


def test_no_generation_while_training_holds_the_model(qtbot, page):
    """Generate while a run holds the model is refused with the session's message naming the run."""
    loaded = _load(qtbot, page)
    errors = []
    page.state.error.connect(errors.append)
    ticket = page.state.session.acquire("train", "training (step 2 of 40)")
    page.state.set_training(True)
    assert "The model is busy: training (step 2 of 40) is running" in page.availability.text()
    page.generate_button.click()
    assert page.worker is None and errors == [
        "The model is busy: training (step 2 of 40) is running; wait for it to end or stop it"]
    ticket.release()
    page.state.set_training(False)
    qtbot.waitUntil(lambda: "busy" not in page.availability.text(), timeout=5_000)
    _run(qtbot, page)
    assert len(page.results) == 2 and page.state.loaded is loaded


def test_settings_round_trip(qtbot, page, tmp_path):
    from PySide6.QtCore import QSettings

    s = QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat)
    page.prompt.setPlainText("hello there")
    page.max_tokens.setValue(77)
    page.greedy.setChecked(True)
    page.save_settings(s)
    other = PlaygroundPage(page.state)
    qtbot.addWidget(other)
    other.restore_settings(s)
    assert other.prompt.toPlainText() == "hello there"
    assert other.max_tokens.value() == 77 and other.greedy.isChecked()
    assert not other.temperature.isEnabled()


GUARD_PROBE = """
import sys
if sys.argv[1] == "guard":
    import studio  # noqa: F401  (applies studio.refcount_guard)
from PySide6.QtCore import QCoreApplication, QObject, Signal
app = QCoreApplication([])
class Emitter(QObject):
    piece = Signal(object)
e = Emitter()
got = []
e.piece.connect(got.append)
for i in range(20000):
    e.piece.emit(("token", 0, "x"))
print(len(got))
"""


def test_thousands_of_streamed_tokens_do_not_exhaust_true(tmp_path):
    """PySide6 6.12 on CPython 3.11 drops a reference to True on every Signal.emit; without
    studio.refcount_guard 20,000 streamed tokens abort the interpreter ("bool_dealloc: deallocating
    True or False"). Both processes are run: the one without the guard must die (else the bug is
    gone, and the guard with it: see studio/refcount_guard.py), the one with it must live."""
    import subprocess
    import sys

    probe = tmp_path / "probe.py"
    probe.write_text(GUARD_PROBE, encoding="utf-8")
    guarded = subprocess.run([sys.executable, str(probe), "guard"], capture_output=True, text=True, timeout=120)
    assert guarded.returncode == 0 and guarded.stdout.strip() == "20000", guarded.stderr[-1000:]
    bare = subprocess.run([sys.executable, str(probe), "bare"], capture_output=True, text=True, timeout=120)
    if sys.version_info < (3, 12):
        assert bare.returncode != 0 and "deallocating True or False" in bare.stderr, (
            "PySide6 no longer drops references to True: remove studio/refcount_guard.py")
    else:  # immortal singletons: no guard needed, none applied
        assert bare.returncode == 0
