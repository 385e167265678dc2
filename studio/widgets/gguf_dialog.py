"""Library → "Export GGUF…": the GGUF for llama.cpp / Ollama, as ``lora-studio export-gguf`` writes it.

The dialog asks what to write (the merged model, or the adapter alone as a GGUF LoRA), the type with
the size it will take, the folder with its free space, and what goes into the Modelfile (system
prompt and sampling, taken from the Playground); K-quants are offered when llama-cpp-python is
installed and say how to get them when it is not; "ollama create" is offered when ``ollama`` is on the
PATH. The export runs as the Library's job (progress bar and Cancel); core.gguf_export does the work.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox, QFileDialog,
                               QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget)

from studio.widgets import format_bytes

TYPES = (("q8_0", 34 / 32, "Q8_0: 8-bit, near-lossless, about half of F16 (the default)"),
         ("f16", 2.0, "F16: 16-bit floats, exact to the merged weights' 11 significant bits"),
         ("bf16", 2.0, "BF16: 16-bit with fp32's range"),
         ("q5_1", 24 / 32, "Q5_1: 5-bit with a minimum per block of 32"),
         ("q5_0", 22 / 32, "Q5_0: 5-bit"),
         ("q4_1", 20 / 32, "Q4_1: 4-bit with a minimum per block"),
         ("q4_0", 18 / 32, "Q4_0: 4-bit, the smallest of these"))
K_TYPES = (("q4_k_m", 144 / 256, "Q4_K_M: the size most people pick"), ("q5_k_m", 176 / 256, "Q5_K_M"),
           ("q6_k", 210 / 256, "Q6_K"))
K_HINT = "K-quants (Q4_K_M, Q5_K_M, Q6_K) need llama.cpp's quantizer: pip install 'lora-studio[gguf-k]'"
LORA_BYTES = 2.0  # the GGUF LoRA is F16


def k_quants_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def ollama_available() -> bool:
    return shutil.which("ollama") is not None


def _free(folder: str) -> int | None:
    p = Path(folder).expanduser()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


class GgufExportDialog(QDialog):
    """What to export, in which type, where, and the Modelfile's settings."""

    def __init__(self, suggestion: str, *, parameters: int | None, adapter_parameters: int | None = None,
                 playground: dict | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Export GGUF for llama.cpp / Ollama")
        self.parameters, self.adapter_parameters = parameters, adapter_parameters
        self.what = QComboBox()
        self.what.addItem("Merged model (one .gguf that runs on its own)", False)
        self.what.addItem("Adapter alone (GGUF LoRA for llama.cpp --lora / Ollama ADAPTER)", True)
        self.type = QComboBox()
        k = k_quants_available()
        for key, size, tip in TYPES + K_TYPES:
            self.type.addItem(key.upper(), key)
            self.type.setItemData(self.type.count() - 1, tip if k or (key, size, tip) in TYPES else K_HINT, 3)
            if not k and (key, size, tip) in K_TYPES:
                self.type.model().item(self.type.count() - 1).setEnabled(False)
        self.k_note = QLabel("" if k else K_HINT)
        self.k_note.setWordWrap(True)
        self.k_note.setStyleSheet("color: palette(placeholder-text);")
        self.folder = QLineEdit(suggestion)
        self.folder.setMinimumWidth(380)
        browse = QPushButton("Choose…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        self.size = QLabel()
        play = playground or {}
        self.system = QLineEdit(play.get("system") or "")
        self.system.setPlaceholderText("the model's own default")
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setValue(float(play.get("temperature", 0.7)))
        self.top_p = QDoubleSpinBox()
        self.top_p.setRange(0.05, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(float(play.get("top_p", 0.9)))
        self.ollama = QCheckBox("Run “ollama create” with the name")
        self.ollama_name = QLineEdit("my-model")
        has_ollama = ollama_available()
        for w in (self.ollama, self.ollama_name):
            w.setEnabled(has_ollama)
            w.setToolTip("" if has_ollama else "ollama is not on the PATH; install it from https://ollama.com")
        orow = QHBoxLayout()
        orow.addWidget(self.ollama)
        orow.addWidget(self.ollama_name, 1)
        form = QFormLayout()
        form.addRow("Export", self.what)
        form.addRow("Type", self.type)
        form.addRow("", self.k_note)
        form.addRow("Folder", row)
        form.addRow("Size", self.size)
        form.addRow("System prompt", self.system)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Ollama", orow)
        note = QLabel("Before it is moved into place the file is read back and compared with the merged model "
                      "(logits, greedy answers) and its tokenizer with the model's; a Modelfile is written beside it.")
        note.setWordWrap(True)
        note.setStyleSheet("color: palette(placeholder-text);")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Export")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(note)
        lay.addWidget(buttons)
        for sig in (self.what.currentIndexChanged, self.type.currentIndexChanged, self.folder.textChanged):
            sig.connect(self._update)
        self._update()

    def expected_bytes(self) -> int | None:
        if self.what.currentData():
            return None if self.adapter_parameters is None else int(self.adapter_parameters * LORA_BYTES)
        per = dict((k, s) for k, s, _ in TYPES + K_TYPES)[self.type.currentData()]
        return None if self.parameters is None else int(self.parameters * per)

    def _update(self) -> None:
        self.type.setEnabled(not self.what.currentData())
        free = _free(self.folder.text())
        need = self.expected_bytes()
        text = f"about {format_bytes(need)}; {format_bytes(free)} free in that folder"
        if need is not None and free is not None and free < need:
            text = f"<b>not enough space</b>: {text}"
        self.size.setText(text)

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Export the GGUF into this folder", self.folder.text())
        if path:
            self.folder.setText(path)

    def values(self) -> dict:
        sampling = {"temperature": round(self.temperature.value(), 3), "top_p": round(self.top_p.value(), 3)}
        return {"out": str(Path(self.folder.text().strip()).expanduser()), "type": self.type.currentData(),
                "adapter_only": bool(self.what.currentData()), "system": self.system.text().strip() or None,
                "sampling": sampling,
                "ollama_name": self.ollama_name.text().strip() if self.ollama.isChecked() else None}


def ask(dialog: GgufExportDialog) -> dict | None:
    """Show the dialog; its values, or None when cancelled (tests replace this)."""
    return dialog.values() if dialog.exec() == QDialog.DialogCode.Accepted else None


def playground_settings(page) -> dict:
    """The Playground's system prompt and sampling, as it shows them now."""
    win = page.window()
    play = win.page("playground") if hasattr(win, "page") else None
    if play is None:
        return {}
    greedy = play.greedy.isChecked() or play.temperature.value() == 0
    return {"system": play.system.text(), "temperature": 0.0 if greedy else play.temperature.value(),
            "top_p": play.top_p.value()}


def run_export(spec, folders, weights, mode, rank, values: dict, *, progress, cancelled) -> dict:
    """The job (a worker thread): core.gguf_export.export_gguf, then ``ollama create`` if asked."""
    from core import gguf_export, ollama

    def report(message: str, fraction: float) -> None:
        progress((message, fraction))

    result = gguf_export.export_gguf(spec, folders, weights, type_name=values["type"], out=values["out"],
                                     combine=mode, rank=rank, adapter_only=values["adapter_only"],
                                     system=values["system"], sampling=values["sampling"], progress=report,
                                     cancelled=cancelled)
    if values.get("ollama_name"):
        result["ollama_create"] = ollama.create(values["ollama_name"], Path(result["modelfile"]))
    return result


def export_from_library(page) -> None:
    """Library → Export GGUF…: the selected adapter(s) (a combination asks for weights first)."""
    entries = page.selected_entries()
    if not entries or page.job is not None:
        return
    combo = {"weights": [1.0], "mode": "exact", "rank": None}
    if len(entries) > 1:
        combo = page.ask_combine(entries, "Export GGUF", False)
        if not combo:
            return
    view = page.state.session.view  # what is loaded, read without touching the model
    spec = view.spec if view is not None else page.state.config.model.source
    info = page.state.model_info
    params = (info.summary if info is not None else {}).get("parameters")
    adapter_params = sum(int(e.trainable_params or 0) for e in entries) or None
    suggestion = str(Path.home() / f"{Path(str(spec)).name}-{'-'.join(e.id for e in entries)[:60]}-gguf")
    dialog = GgufExportDialog(suggestion, parameters=params, adapter_parameters=adapter_params,
                              playground=playground_settings(page), parent=page)
    values = ask(dialog)
    if not values:
        return

    def done(report: dict) -> None:
        page.last_report = report
        extra = " and ollama create ran" if report.get("ollama_create") else ""
        page.state.say(f"{Path(report['out']).name} ({format_bytes(report['size_bytes'])}) and its Modelfile "
                       f"written to {Path(report['out']).parent}, checked against the merged model{extra}")

    # it merges into its own copy of the base: a shared ticket, so nothing changes the model meanwhile
    ticket = page.state.claim("export", "a GGUF export", need_model=False)
    if ticket is None:
        return
    page._run_job("Exporting GGUF", run_export, spec, [str(e.path) for e in entries], combo["weights"],
                  combo["mode"], combo["rank"], values, on_done=done, ticket=ticket)
