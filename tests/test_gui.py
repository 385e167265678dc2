"""The window without training: start-up, workers, the Model, Layers and Data pages (pytest-qt,
offscreen, a tiny checkpoint folder as the chosen model)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import pytestqt  # noqa: F401  (a missing module fails, never skips)

ROOT = Path(__file__).resolve().parents[1]
LONG = 60_000  # ms; the first worker imports torch and transformers


def _wait_until(qtbot, cond, timeout=LONG):
    qtbot.waitUntil(cond, timeout=timeout)


@pytest.fixture
def window(qtbot, checkpoint):
    from studio.app import MainWindow

    w = MainWindow(background=False)
    qtbot.addWidget(w)
    w.state.config.model.source = str(checkpoint)
    w.show()
    with qtbot.waitSignal(w.state.tokenizer_changed, timeout=LONG, check_params_cb=lambda t: t is not None):
        w.state.refresh_model_info()
    yield w
    w.close()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def small_dataset(tmp_path: Path, n: int = 24) -> Path:
    return write_jsonl(tmp_path / "small.jsonl",
                       [{"instruction": f"Add {i} and {i + 1}.", "output": f"{i} + {i + 1} = {2 * i + 1}."}
                        for i in range(n)])


# -- start-up ---------------------------------------------------------------------------------------

def test_gui_smoke_prints_the_line_and_exits_0(tmp_path):
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", LORA_STUDIO_HOME=str(tmp_path / "home"))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "studio", "gui", "--smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t
    assert p.returncode == 0, p.stderr
    m = re.search(r"^window shown in (\d+\.\d+) s$", p.stdout, re.M)
    assert m, p.stdout
    print(f"gui --smoke: {m.group(0)} (process wall {wall:.2f} s)")


def test_window_and_pages_import_no_torch(tmp_path):
    """The window shows before torch loads: nothing the window imports at start pulls it in."""
    code = ("import sys\n"
            "from studio.app import make_app, MainWindow\n"
            "app = make_app()\n"
            "w = MainWindow(background=False)\n"
            "w.show(); app.processEvents()\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
            "print('pages', [p.KEY for p in w.pages]); print('heavy', heavy)\n"
            "w.close()\n"
            "sys.exit(1 if heavy else 0)\n")
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", LORA_STUDIO_HOME=str(tmp_path / "home"))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    for key in ("model", "layers", "data", "train"):
        assert f"'{key}'" in p.stdout


def test_modules_imported_after_qt_leave_no_source_in_memory(tmp_path):
    """PySide6 reads the source of every module imported after it (PYSIDE-2029) and linecache kept
    it: 100 MiB of the window's memory while training. studio.import_guard asks the same question
    without keeping it; a module naming PySide6 is still recognised as one."""
    (tmp_path / "before_guard.py").write_text("X = 1\n" * 1000)
    (tmp_path / "after_guard.py").write_text("X = 1\n" * 1000)
    (tmp_path / "uses_qt.py").write_text("import PySide6  # noqa\n")
    code = textwrap.dedent(f"""
        import linecache, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import PySide6.QtCore
        import before_guard  # PySide6's own hook: its source stays in linecache
        kept_before = before_guard.__file__ in linecache.cache
        from studio import import_guard
        assert import_guard.install(), "PySide6 no longer has shibokensupport.feature._mod_uses_pyside"
        import after_guard, uses_qt
        feature = sys.modules["shibokensupport.feature"]
        print(kept_before, before_guard.__file__ in linecache.cache, after_guard.__file__ in linecache.cache,
              feature.pyside_feature_dict["uses_qt"], feature.pyside_feature_dict["after_guard"])
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, QT_QPA_PLATFORM="offscreen"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "False", "False", "0", "-1"]  # the guard also drops what was kept


def test_cycles_made_in_a_worker_thread_are_collected_in_the_gui_thread():
    """studio.gc_guard: with it, garbage cycles a worker makes are freed by the GUI thread's timer
    (a cycle holding a widget freed in a worker aborts Qt); without it, Python collects them in the
    worker thread that crossed the threshold, which the second run shows."""
    code = textwrap.dedent("""
        import gc, sys, threading, time
        from PySide6.QtWidgets import QApplication
        from studio import gc_guard
        app = QApplication([])
        if sys.argv[1] == "guard":
            assert gc_guard.install() and not gc.isenabled()
        freed = []

        class Node:
            def __init__(self):
                self.me = self  # a cycle: only the collector frees it
            def __del__(self):
                freed.append(threading.current_thread() is threading.main_thread())

        def work():
            for _ in range(20_000):
                Node()

        t = threading.Thread(target=work)
        t.start()
        t.join()
        deadline = time.monotonic() + 3
        while len(freed) < 19_000 and time.monotonic() < deadline:
            app.processEvents()
            time.sleep(0.01)
        print(len(freed) >= 19_000, all(freed))
    """)
    runs = {}
    for mode in ("guard", "none"):
        p = subprocess.run([sys.executable, "-c", code, mode], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, QT_QPA_PLATFORM="offscreen"))
        assert p.returncode == 0, p.stderr
        runs[mode] = p.stdout.split()
    assert runs["guard"] == ["True", "True"]  # all freed, all in the GUI thread
    assert runs["none"][1] == "False"  # without the guard the worker thread collected some


def test_sidebar_order_and_shortcuts(qtbot):
    from PySide6.QtCore import Qt

    from studio.app import MainWindow

    w = MainWindow(background=False)
    qtbot.addWidget(w)
    w.show()
    w.activateWindow()
    qtbot.waitUntil(w.isActiveWindow)  # shortcuts work in the active window
    keys = [p.KEY for p in w.pages]
    assert keys[:4] == ["model", "layers", "data", "train"]
    order = ["model", "layers", "data", "train", "library", "compare", "playground", "evaluate"]
    assert [k for k in order if k in keys] == keys
    qtbot.keyClick(w, Qt.Key.Key_3, Qt.KeyboardModifier.ControlModifier)
    assert w.stack.currentWidget() is w.page("data")
    qtbot.keyClick(w, Qt.Key.Key_1, Qt.KeyboardModifier.ControlModifier)
    assert w.stack.currentWidget() is w.page("model")


# -- workers ----------------------------------------------------------------------------------------

def test_function_worker_result_progress_and_cancel(qtbot):
    from studio.workers import FunctionWorker, start

    def job(n, *, progress, cancelled):
        for i in range(n):
            if cancelled():
                return "should not arrive"
            progress(i)
            time.sleep(0.01)
        return n * 2

    w = FunctionWorker(job, 5)
    seen, got = [], []
    w.progress.connect(seen.append)
    w.finished.connect(got.append)
    with qtbot.waitSignals([w.finished, w.done], order="strict", timeout=LONG):
        start(w)
    assert got == [10]
    assert seen == [0, 1, 2, 3, 4]

    w2 = FunctionWorker(job, 10_000)
    results = []
    w2.finished.connect(results.append)
    with qtbot.waitSignals([w2.cancelled, w2.done], order="strict", timeout=LONG):
        start(w2)
        qtbot.wait(50)
        w2.cancel()
    assert results == []  # no result after a cancel


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread nice levels are Linux's")
def test_worker_threads_and_the_threads_they_start_run_below_the_window(qtbot):
    """A job's thread, and a thread it starts (as torch's OpenMP threads are), are WORKER_NICE
    nice levels below the GUI thread, so the window gets the CPU first while a run trains."""
    from studio.workers import WORKER_NICE, FunctionWorker, start

    def nice():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def job(*, progress, cancelled):
        inner = []
        t = threading.Thread(target=lambda: inner.append(nice()))
        t.start()
        t.join()
        return nice(), inner[0]

    w = FunctionWorker(job)
    got = []
    w.finished.connect(got.append)
    with qtbot.waitSignals([w.finished, w.done], order="strict", timeout=LONG):
        start(w)
    expected = min(19, nice() + WORKER_NICE)
    assert got == [(expected, expected)]


def test_worker_errors_become_one_message(qtbot):
    from core.errors import StudioError
    from studio.workers import FunctionWorker, log_path, start

    def user_error():
        raise StudioError("data.jsonl: line 3: not valid JSON", hint="fix the line")

    def bug():
        raise KeyError("surprise")

    w = FunctionWorker(user_error)
    with qtbot.waitSignal(w.failed, timeout=LONG) as b:
        start(w)
    assert b.args[0] == "data.jsonl: line 3: not valid JSON. Fix the line"

    w = FunctionWorker(bug)
    with qtbot.waitSignal(w.failed, timeout=LONG) as b:
        start(w)
    assert b.args[0].startswith("Unexpected error: KeyError")
    assert "Traceback" not in b.args[0]
    assert "surprise" in log_path().read_text(encoding="utf-8")


def test_worker_slots_run_in_the_gui_thread(qtbot):
    from PySide6.QtCore import QThread

    from studio.workers import FunctionWorker, start

    threads = []
    w = FunctionWorker(lambda *, progress: progress(1) or 2)
    w.progress.connect(lambda _: threads.append(QThread.currentThread()))
    w.finished.connect(lambda _: threads.append(QThread.currentThread()))
    with qtbot.waitSignal(w.done, timeout=LONG):
        start(w)
    gui = qtbot.wait  # noqa: F841 - keep the event loop reference alive
    from PySide6.QtWidgets import QApplication

    assert threads and all(t is QApplication.instance().thread() for t in threads)


# -- Model page -------------------------------------------------------------------------------------

def test_model_page_summary_memory_and_list(window, qtbot, checkpoint):
    page = window.page("model")
    window.show_page("model")
    assert window.state.model_info is not None
    assert page.summary_labels["architecture"].text() == "LlamaForCausalLM"
    assert page.summary_labels["layers"].text() == "2"
    _wait_until(qtbot, lambda: page.memory is not None)
    total = page.memory["total"]
    assert page.memory_labels["total"].text() not in ("…", "–")
    # The estimate follows the settings: a larger batch needs more memory.
    window.state.config.train.batch_size = 16
    window.state.changed("train")
    _wait_until(qtbot, lambda: page.memory is not None and page.memory["total"] > total)
    # The list (bundled default, HF cache, user models) shows the chosen folder, selected.
    _wait_until(qtbot, lambda: page.table.rowCount() > 0)
    specs = [page.table.item(r, 0).data(0x0100) for r in range(page.table.rowCount())]
    assert str(checkpoint) in specs
    page.search.setText("no-model-is-called-this")
    assert all(page.table.isRowHidden(r) for r in range(page.table.rowCount()))


def test_first_start_says_what_is_happening_and_the_disk_label_follows(qtbot, tmp_path):
    """From the first frame the Model page and the status bar say what is going on (a busy bar while
    the model is read, a measured one while a GGUF converts, its text beside the bar where it has
    room), and "converted on first use" becomes "converted" once it is."""
    from test_models import write_tiny_gguf

    from studio.app import MainWindow

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    w = MainWindow(background=False)
    qtbot.addWidget(w)
    w.resize(1200, 780)
    w.state.config.model.source = str(gguf)
    w.show()
    w.show_page("model")
    page = w.page("model")
    stages = []
    w.state.model_progress.connect(lambda m, f: stages.append((m, f)))
    w.state.refresh_model_info()
    assert page.progress.isVisible() and page.progress.maximum() == 0  # busy, at once
    assert page.progress_label.text().startswith("Reading the model") and w.status_text.text()
    _wait_until(qtbot, lambda: w.state.model_info is not None)
    assert page.summary_labels["size_bytes"].text().endswith("converted on first use")
    _wait_until(qtbot, lambda: w.state.tokenizer is not None)
    assert any(m and 0 <= f < 1 for m, f in stages), stages  # the conversion had a measured bar
    assert page.progress.format() == "%p%"  # the bar never carries the long text (it was clipped)
    assert not page.progress.isVisible() and page.progress_label.text() == ""
    assert page.summary_labels["size_bytes"].text().endswith(", converted")
    w.close()


def test_model_page_load_and_cancel(window, qtbot):
    page = window.page("model")
    with qtbot.waitSignal(window.state.loaded_changed, timeout=LONG):
        page.load_model()
    loaded = window.state.loaded
    assert loaded is not None and not any(p.requires_grad for p in loaded.model.parameters())
    assert "loaded" in window.model_label.text()


def test_choosing_a_missing_model_shows_a_message(window, qtbot, tmp_path):
    page = window.page("model")
    with qtbot.waitSignal(window.state.model_info_failed, timeout=LONG) as b:
        page.choose(str(tmp_path / "no-such-model"))
    assert "no-such-model" in b.args[0]
    assert "no-such-model" in window.message_bar.text()


# -- Layers page ------------------------------------------------------------------------------------

def test_layers_presets_tree_and_pattern_edit_one_selection(window, qtbot):
    from core.targets import budget, resolve_targets
    from PySide6.QtCore import Qt

    page = window.page("layers")
    window.show_page("layers")
    info = window.state.model_info
    assert len(page.leaves) == len(info.targets)

    page.preset_buttons["attention-qv"].click()
    assert window.state.config.lora.targets == "attention-qv"
    qv = resolve_targets(info.targets, "attention-qv")
    assert page.selected() == qv
    assert page.budget.trainable == budget(info.meta, qv, window.state.config.lora.rank).trainable

    # Unchecking one matrix in the tree makes a custom list; the parents become partially checked.
    page.leaves[qv[0]].setCheckState(0, Qt.CheckState.Unchecked)
    assert window.state.config.lora.targets == qv[1:]
    block = page.leaves[qv[0]].parent().parent()
    assert block.checkState(0) == Qt.CheckState.PartiallyChecked

    # Rank changes the count live.
    before = page.budget.trainable
    page.rank.setValue(16)
    assert window.state.config.lora.rank == 16
    assert page.budget.trainable == 2 * before

    # A pattern selects through core.targets; one that matches nothing says so and changes nothing.
    page.pattern.setText("down_proj")
    page.pattern.returnPressed.emit()
    assert page.selected() == [t.name for t in info.targets if t.name.endswith("down_proj")]
    page.pattern.setText("no_such_matrix")
    page.pattern.returnPressed.emit()
    assert page.pattern_problem.isVisible() or "matches no module" in page.pattern_problem.text()
    assert page.selected() == [t.name for t in info.targets if t.name.endswith("down_proj")]

    page.preset_buttons["all-linear"].click()
    assert window.state.config.lora.targets == "all-linear"
    assert all(not page.leaves[n].checkState(0) == Qt.CheckState.Checked
               for n in (t.name for t in info.targets if t.is_head))


def test_layers_pattern_placeholder_is_not_cut(window, qtbot, tmp_path):
    window.resize(1200, 780)
    window.show_page("layers")
    page = window.page("layers")
    qtbot.waitUntil(lambda: page.pattern.width() > 100)
    qtbot.wait(20)
    text = page.pattern.placeholderText()
    room = page.pattern.contentsRect().width() - 2 * page.pattern.style().pixelMetric(
        page.pattern.style().PixelMetric.PM_DefaultFrameWidth) - 8
    assert page.pattern.fontMetrics().horizontalAdvance(text) <= room, (text, room)
    assert "re:" in page.pattern.toolTip() and "Enter" in page.pattern.toolTip()
    window.grab().save(str(tmp_path / "layers.png"))


# -- Data page --------------------------------------------------------------------------------------

def test_data_page_preview_example_and_histogram(window, qtbot, tmp_path):
    page = window.page("data")
    window.show_page("data")
    path = small_dataset(tmp_path)
    page.set_path(str(path))
    _wait_until(qtbot, lambda: page.prepared is not None and page.inspected is not None
                and page.inspected["source"].path == path)
    assert page.inspected["format"] == "instruction"
    assert page.table_model.rowCount() == 24
    assert page.detected.text().startswith("instruction")
    # The example shows its trained tokens, ending with the visible end-of-turn token.
    trained = page.example.trained_text()
    assert "0 + 1 = 1." in trained and "<|im_end|>" in trained
    assert page.prepared["train"] == 24
    assert page.histogram.bars is not None
    assert page.count_label.text().startswith("24")

    # A shorter max length truncates; the count says so.
    page.max_length.setValue(30)
    _wait_until(qtbot, lambda: page.prepared is not None and page.prepared["max_length"] == 30)
    assert page.prepared["truncated"] > 0
    assert "longer than 30 tokens" in page.truncated_label.text()


def test_bad_data_file_shows_a_message_and_nothing_crashes(window, qtbot, tmp_path):
    page = window.page("data")
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', encoding="utf-8")
    page.set_path(str(bad))
    _wait_until(qtbot, lambda: "broken.jsonl" in window.message_bar.text())
    assert page.inspected is None
    assert page.problems.count() == 1 and "broken.jsonl" in page.problems.item(0).text()
    # The window still works: a good file afterwards reads fine.
    good = small_dataset(tmp_path)
    page.set_path(str(good))
    _wait_until(qtbot, lambda: page.inspected is not None)


def test_field_mapping_override(window, qtbot, tmp_path):
    page = window.page("data")
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(6)])
    page.set_path(str(path))
    _wait_until(qtbot, lambda: "q.jsonl" in window.message_bar.text() or "qa.jsonl" in window.message_bar.text())
    page.format.setCurrentText("prompt-completion")
    _wait_until(qtbot, lambda: "prompt" in page._field_combos)
    window.message_bar.hide()
    page._field_combos["prompt"].setCurrentText("q")
    page._field_combos["completion"].setCurrentText("a")
    _wait_until(qtbot, lambda: page.inspected is not None and page.inspected["fields"].get("prompt") == "q")
    assert window.state.config.data.fields == {"prompt": "q", "completion": "a"}
    _wait_until(qtbot, lambda: "answer 0" in page.example.trained_text())


def test_data_page_state_follows_the_current_file(window, qtbot, tmp_path):
    """A failed file clears what the previous file showed; once it is fixed, the red bar goes."""
    page = window.page("data")
    window.show_page("data")
    page.set_path(str(small_dataset(tmp_path)))
    _wait_until(qtbot, lambda: page.example_info.text().startswith("First example:"))
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', encoding="utf-8")
    page.set_path(str(bad))
    _wait_until(qtbot, lambda: "broken.jsonl" in window.message_bar.text())
    assert page.example_info.text() == "" and page.table_model.rowCount() == 0
    assert page.count_label.text() == "–"
    write_jsonl(bad, [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(5)])  # fixed
    page.inspect()
    _wait_until(qtbot, lambda: page.inspected is not None and page.prepared is not None)
    assert not window.message_bar.isVisible()
    assert page.example_info.text().startswith("First example:") and page.count_label.text().startswith("5")
    # another page's message is not taken back by the Data page
    window.state.show_error("something else went wrong")
    page.inspect()
    _wait_until(qtbot, lambda: page.inspected is not None and page._inspect_worker is None)
    assert window.message_bar.text() == "something else went wrong"


def test_csv_with_unknown_columns_offers_the_mapping_with_its_rows(window, qtbot, tmp_path):
    """Detection fails: the rows stay visible, the page offers prompt / answer / system, the message
    names the window's controls (no command-line flag), and mapping the columns fixes it."""
    page = window.page("data")
    window.show_page("data")
    path = tmp_path / "orders.csv"
    path.write_text("customer_said,barista_wrote,note\n" + "".join(
        f"order {i},ok {i},n{i}\n" for i in range(7)), encoding="utf-8")
    page.set_path(str(path))
    _wait_until(qtbot, lambda: "orders.csv" in window.message_bar.text())
    message = window.message_bar.text()
    assert "--" not in message and "Fields" in message, message
    assert page.table_model.rowCount() == 7 and page.table_model.columns == ["customer_said", "barista_wrote", "note"]
    assert list(page._field_combos) == ["prompt", "completion", "system"]
    labels = [page.fields_form.itemAt(i, page.fields_form.ItemRole.LabelRole).widget().text()
              for i in range(page.fields_form.rowCount())]
    assert labels == ["Prompt", "Answer", "System (optional)"]
    assert "map the columns" in page.detected.text()
    window.grab().save(str(tmp_path / "data-mapping.png"))
    page._field_combos["prompt"].setCurrentText("customer_said")
    _wait_until(qtbot, lambda: page._inspect_worker is None and "completion" in page._field_combos)
    assert "--" not in window.message_bar.text()
    page._field_combos["completion"].setCurrentText("barista_wrote")
    _wait_until(qtbot, lambda: page.inspected is not None)
    assert page.inspected["format"] == "prompt-completion"
    assert window.state.config.data.fields == {"prompt": "customer_said", "completion": "barista_wrote"}
    assert not window.message_bar.isVisible()
    _wait_until(qtbot, lambda: "ok 0" in page.example.trained_text())


def test_window_messages_never_name_a_command_line_flag():
    """Every option core's messages name has a window name (or is a terminal command's flag), and
    the command line's own wording is left as it was."""
    import ast

    from core.errors import StudioError
    from studio.messages import OPTIONS, PASSTHROUGH, for_window, rephrase

    flags = set()
    for f in sorted((ROOT / "core").glob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
                flags |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", n.value))
    flags = {f for f in flags if not f.endswith("-")}  # an f-string's fragment (--data-{which})
    assert flags, "the scan found no option at all"
    assert not flags - set(OPTIONS) - PASSTHROUGH, f"options without a window name: {flags - set(OPTIONS) - PASSTHROUGH}"
    for flag in set(OPTIONS):
        assert "--" not in rephrase(f"{flag} 3: bad; use {flag} 4")
    e = StudioError("the prompt-completion format needs completion", hint="map a column with --fields completion=COLUMN",
                    window_hint="choose the column that holds the completion under Fields")
    assert str(e).endswith("--fields completion=COLUMN")  # the command line keeps its flags
    assert for_window(e) == "the prompt-completion format needs completion. Choose the column that holds the completion under Fields"
    assert for_window("--targets: select at least one module to adapt") == \
        "The layers to adapt (Layers page): select at least one module to adapt"


# -- settings ---------------------------------------------------------------------------------------

def test_settings_persist_across_windows(qtbot, checkpoint, tmp_path):
    from studio.app import MainWindow

    w = MainWindow(background=False)
    qtbot.addWidget(w)
    w.show()
    w.page("layers").rank.setValue(24)
    w.page("train").steps.setValue(321)
    w.page("data").max_length.setValue(256)
    w.show_page("data")
    w.close()

    w2 = MainWindow(background=False)
    qtbot.addWidget(w2)
    c = w2.state.config
    assert (c.lora.rank, c.train.steps, c.data.max_length) == (24, 321, 256)
    assert w2.page("layers").rank.value() == 24
    assert w2.stack.currentWidget() is w2.page("data")
    w2.close()
