"""The Model page: which base model to adapt, on which device, in which precision and whether its
linear layers are held in 4 or 8 bits (QLoRA, core.quant), what it is, and what one training step
will need in memory with the current settings.

The list comes from ``core.models.list_models`` (bundled default, local Hugging Face cache, folders
and GGUF files the user added), read in a worker because it imports torch. The summary and the
memory estimate are ``core.models.summary`` and ``core.models.estimate_memory``; the estimate is
recomputed in a worker (it builds the model on the meta device) a moment after any setting it
depends on changes.
"""

from __future__ import annotations

import importlib.util

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox,
                               QHBoxLayout, QHeaderView, QLabel, QLineEdit, QProgressBar, QPushButton,
                               QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from core.config import DEVICES, PRECISIONS, QUANTIZE, QUANTIZE_LABELS, QUANTIZE_PIP
from studio import workers
from studio.pages import Page, setting
from studio.widgets import format_bytes, format_count

KIND_TEXT = {"default": "bundled", "hub": "HF cache", "folder": "folder", "gguf": "GGUF"}


def _list_models():
    from core import models

    return models.list_models()


def _add_model(path: str):
    from core import models

    models.add_user_model(path)
    return models.list_models()


def _estimate(config, kwargs, device: str):
    from core import models

    # "auto" precision means what training would pick on this device (bf16 on a recent CUDA card,
    # fp32 on the CPU): ask core the same question the trainer asks.
    if kwargs["precision"] == "auto":
        kwargs = dict(kwargs, precision=models.pick_dtype(models.pick_device(device), "auto"))
    mem = models.estimate_memory(config, **kwargs)
    mem = dict(mem)
    mem["precision"] = models.precision_name(kwargs["precision"]) if not isinstance(kwargs["precision"], str) \
        else kwargs["precision"]
    return mem


def _bitsandbytes_found() -> bool:
    """core.quant.available() without importing torch (the window shows before torch is loaded)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def _load(spec, device, precision, trust, quantize, *, progress, cancelled):
    from core import models
    from core.errors import Cancelled

    def report(message, fraction):
        if cancelled():
            raise Cancelled()
        progress((message, fraction))

    return models.load_model(spec, device=device, precision=precision, trust_remote_code=trust,
                             quantize=quantize, progress=report)


class ModelPage(Page):
    KEY = "model"
    TITLE = "Model"
    ICON = "SP_DriveHDIcon"

    def __init__(self, state, parent=None):
        super().__init__(state, parent)
        self.models: list[dict] = []
        self._list_worker = None
        self._estimate_worker = None
        self._estimate_pending = False
        self._load_worker = None
        self.memory: dict | None = None

        # -- left: the models ---------------------------------------------------------------------
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search models…")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(self._filter)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Name", "Source", "Size"])
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().hide()
        self.table.setShowGrid(False)
        self.table.setAlternatingRowColors(True)
        hh = self.table.horizontalHeader()
        hh.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        hh.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        hh.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        self.table.itemSelectionChanged.connect(self._on_pick)
        add_folder = QPushButton("Add folder…")
        add_folder.setToolTip("A Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer)")
        add_folder.clicked.connect(self._add_folder)
        add_gguf = QPushButton("Add GGUF file…")
        add_gguf.clicked.connect(self._add_gguf)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh_list)
        buttons = QHBoxLayout()
        for b in (add_folder, add_gguf):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(refresh)
        left_box = QGroupBox("Base model")
        ll = QVBoxLayout(left_box)
        ll.addWidget(self.search)
        ll.addWidget(self.table, 1)
        ll.addLayout(buttons)
        from studio.widgets.hub_panel import HubPanel  # download by name, with the fit check first

        self.hub_panel = HubPanel(state, lambda: (self._estimate_args(), self.device.currentText()))
        self.hub_panel.downloaded.connect(lambda spec: (self.choose(spec), self.refresh_list()))
        ll.addWidget(self.hub_panel)

        # -- right: device, summary, memory, load ---------------------------------------------------
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.device.setToolTip("auto: CUDA if there is a card, else Apple's MPS, else the CPU")
        self.precision = QComboBox()
        self.precision.addItems(PRECISIONS)
        self.precision.setToolTip("auto: bf16 on a CUDA card that supports it, else fp16 with loss "
                                  "scaling; fp32 on the CPU")
        self.quantize = QComboBox()
        for method in QUANTIZE:
            self.quantize.addItem(QUANTIZE_LABELS[method], method)
        if _bitsandbytes_found():
            self.quantize.setToolTip("Hold the base model's linear layers (not the output head) in 4-bit "
                                     "NF4 (QLoRA) or 8 bits with bitsandbytes: about a quarter or half of "
                                     "the bf16 weights' memory; the adapter stays full precision")
        else:
            self.quantize.setEnabled(False)
            self.quantize.setToolTip(f"bitsandbytes is not installed: run {QUANTIZE_PIP} in the studio's "
                                     "environment, then restart the studio")
        self.checkpointing = QCheckBox("Gradient checkpointing (less memory, ~⅓ slower)")
        self.trust = QCheckBox("Allow this model's own code to run (trust_remote_code)")
        self.trust.setToolTip("Off unless you trust the model's authors: its Python files would run")
        self.device.currentTextChanged.connect(self._on_device)
        self.precision.currentTextChanged.connect(self._on_device)
        self.quantize.currentIndexChanged.connect(self._on_device)
        self.checkpointing.toggled.connect(self._on_device)
        self.trust.toggled.connect(self._on_trust)
        run_box = QGroupBox("Where it runs")
        rf = QFormLayout(run_box)
        rf.addRow("Device", self.device)
        precision_row = QHBoxLayout()
        precision_row.addWidget(self.precision, 1)
        precision_row.addWidget(QLabel("Quantize"))
        precision_row.addWidget(self.quantize, 1)
        rf.addRow("Precision", precision_row)
        rf.addRow(self.checkpointing)
        rf.addRow(self.trust)

        self.summary_box = QGroupBox("Summary")
        self.summary_form = QFormLayout(self.summary_box)
        self.summary_labels: dict[str, QLabel] = {}
        for key, text in (("name", "Name"), ("architecture", "Architecture"), ("parameters", "Parameters"),
                          ("layers", "Layers"), ("hidden_size", "Hidden size"), ("dtype", "Stored as"),
                          ("context_length", "Context length"), ("chat_template", "Chat template"),
                          ("size_bytes", "On disk"), ("path", "Path")):
            lab = QLabel("…")
            lab.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            lab.setWordWrap(key == "path")
            self.summary_labels[key] = lab
            self.summary_form.addRow(text, lab)

        self.memory_box = QGroupBox("Training memory (estimate for the current settings)")
        mf = QFormLayout(self.memory_box)
        self.memory_labels: dict[str, QLabel] = {}
        for key, text in (("weights", "Frozen weights"), ("adapter", "Adapter"), ("gradients", "Gradients"),
                          ("optimizer", "Optimizer (AdamW)"), ("activations", "Activations"),
                          ("total", "Total")):
            lab = QLabel("…")
            if key == "total":
                f = lab.font()
                f.setBold(True)
                lab.setFont(f)
            self.memory_labels[key] = lab
            mf.addRow(text, lab)
        self.memory_note = QLabel()
        self.memory_note.setWordWrap(True)
        self.memory_note.setStyleSheet("color: palette(placeholder-text);")
        mf.addRow(self.memory_note)

        self.load_button = QPushButton("Load model")
        self.load_button.setToolTip("Load the weights now (the Playground and Library use the loaded "
                                    "model; training loads its own copy)")
        self.load_button.clicked.connect(self.load_model)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel_load)
        self.cancel_button.hide()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.hide()
        self.progress_label = QLabel()
        self.progress_label.setWordWrap(True)
        load_row = QHBoxLayout()
        load_row.addWidget(self.load_button)
        load_row.addWidget(self.cancel_button)
        load_row.addWidget(self.progress, 1)
        load_row.addStretch(0)  # with the bar hidden, the button keeps its own width

        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addWidget(run_box)
        rl.addWidget(self.summary_box)
        rl.addWidget(self.memory_box)
        rl.addLayout(load_row)
        rl.addWidget(self.progress_label)
        rl.addStretch(1)

        lay = QHBoxLayout(self)
        lay.addWidget(left_box, 3)
        lay.addWidget(right, 2)

        self._estimate_timer = QTimer(self)
        self._estimate_timer.setSingleShot(True)
        self._estimate_timer.setInterval(200)
        self._estimate_timer.timeout.connect(self._start_estimate)

        state.model_info_changed.connect(self._on_info)
        state.model_info_failed.connect(self._on_info_failed)
        state.model_progress.connect(self._on_model_progress)
        state.tokenizer_changed.connect(self._on_tokenizer)
        state.config_changed.connect(self._on_config)
        state.data_summary_changed.connect(lambda *_: self.state.model_info and self._estimate_timer.start())
        state.loaded_changed.connect(self._on_loaded)
        self._sync_from_config()
        self._listed = False

    # -- the list ---------------------------------------------------------------------------------
    def page_shown(self) -> None:
        if not self._listed:
            self.refresh_list()

    def refresh_list(self) -> None:
        self._listed = True
        w = workers.FunctionWorker(_list_models)
        w.finished.connect(self.set_models)
        w.failed.connect(self.state.show_error)
        self._list_worker = workers.start(w, owner=self)

    def set_models(self, models: list[dict]) -> None:
        self.models = list(models)
        spec = self.state.config.model.source
        if not any(m["spec"] == spec for m in self.models):
            # The chosen model is not in the list (e.g. a folder given by path): show it anyway.
            self.models.append({"name": spec, "kind": "folder", "path": spec, "size_bytes": None,
                                "spec": spec, "source": "user"})
        self.table.blockSignals(True)
        self.table.setRowCount(len(self.models))
        for row, m in enumerate(self.models):
            name = QTableWidgetItem(m["name"])
            tip = m["path"]
            if m.get("problem"):
                tip += f"\n{m['problem']}"
                name.setForeground(Qt.GlobalColor.red)
            elif m.get("kind") in ("default", "gguf") and not m.get("converted", True):
                tip += "\nconverted to safetensors once, on first use"
            name.setToolTip(tip)
            name.setData(Qt.ItemDataRole.UserRole, m["spec"])
            self.table.setItem(row, 0, name)
            self.table.setItem(row, 1, QTableWidgetItem(KIND_TEXT.get(m["kind"], m["kind"])))
            size = QTableWidgetItem(format_bytes(m.get("size_bytes")))
            size.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.table.setItem(row, 2, size)
            if m["spec"] == spec:
                self.table.selectRow(row)
        self.table.blockSignals(False)
        self._filter(self.search.text())

    def _filter(self, text: str) -> None:
        t = text.strip().lower()
        for row, m in enumerate(self.models):
            hay = f"{m['name']} {m['path']} {m['kind']}".lower()
            self.table.setRowHidden(row, bool(t) and t not in hay)

    def _on_pick(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return
        spec = self.table.item(rows[0].row(), 0).data(Qt.ItemDataRole.UserRole)
        self.choose(spec)

    def choose(self, spec: str) -> None:
        """Make ``spec`` the base model (what a click in the list does)."""
        if self.state.training:
            self.state.show_error("A training run is in progress; the base model can change after it ends")
            return
        self.state.set_model(spec)

    def _add_path(self, path: str) -> None:
        w = workers.FunctionWorker(_add_model, path)
        w.finished.connect(lambda models, p=path: (self.set_models(models), self._choose_added(p)))
        w.failed.connect(self.state.show_error)
        workers.start(w, owner=self)

    def _choose_added(self, path: str) -> None:
        from pathlib import Path

        target = str(Path(path).expanduser().resolve())
        for m in self.models:
            if str(Path(m["path"]).expanduser().resolve()) == target:
                self.choose(m["spec"])
                self.set_models(self.models)
                return

    def _add_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "A Hugging Face checkpoint folder")
        if path:
            self._add_path(path)

    def _add_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "A GGUF model file", "", "GGUF models (*.gguf)")
        if path:
            self._add_path(path)

    # -- device and precision ---------------------------------------------------------------------
    def _sync_from_config(self) -> None:
        m = self.state.config.model
        for combo, value in ((self.device, m.device), (self.precision, m.precision)):
            combo.blockSignals(True)
            combo.setCurrentText(value)
            combo.blockSignals(False)
        self.quantize.blockSignals(True)
        self.quantize.setCurrentIndex(max(0, self.quantize.findData(m.quantize)))
        self.quantize.blockSignals(False)
        for box, value in ((self.checkpointing, m.gradient_checkpointing), (self.trust, m.trust_remote_code)):
            box.blockSignals(True)
            box.setChecked(value)
            box.blockSignals(False)

    def _on_device(self, *_):
        m = self.state.config.model
        m.device = self.device.currentText()
        m.precision = self.precision.currentText()
        m.quantize = self.quantize.currentData() or "none"
        m.gradient_checkpointing = self.checkpointing.isChecked()
        self.state.changed("model")

    def _on_trust(self, on: bool) -> None:
        self.state.config.model.trust_remote_code = on
        self.state.changed("model")
        self.state.refresh_model_info()

    # -- summary and memory -----------------------------------------------------------------------
    def _on_info(self, info) -> None:
        if info is None:
            for lab in self.summary_labels.values():
                lab.setText("…")
            for lab in self.memory_labels.values():
                lab.setText("…")
            return
        self._show_summary(info.summary)
        self._estimate_timer.start()

    def _show_summary(self, s: dict) -> None:
        for key, lab in self.summary_labels.items():
            v = s.get(key)
            if key == "parameters":
                text = f"{format_count(v)} ({v:,})" if v else "–"
            elif key == "size_bytes":
                text = format_bytes(v)
                if s.get("kind") in ("default", "gguf"):
                    text += ", converted" if s.get("converted") else ", converted on first use"
            elif key == "chat_template":
                text = "yes (chat-formatted prompts)" if v else "no (plain text prompts)"
            elif key == "name":
                text = f"{v} ({KIND_TEXT.get(s.get('kind'), s.get('kind'))})"
            else:
                text = "–" if v is None else str(v)
            lab.setText(text)

    def _on_tokenizer(self, tok) -> None:
        if tok is not None and self.state.model_info is not None:
            self._show_summary(self.state.model_info.summary)  # "converted on first use" is now "converted"

    def _on_info_failed(self, message: str) -> None:
        for lab in self.summary_labels.values():
            lab.setText("–")
        self.summary_labels["name"].setText("cannot be read (see the message above)")

    def _on_config(self, part: str) -> None:
        if part in ("model", "all"):
            self._sync_from_config()
            self._select_current()
        if self.state.model_info is not None and part in ("model", "lora", "data", "train", "all"):
            self._estimate_timer.start()

    def _select_current(self) -> None:
        spec = self.state.config.model.source
        for row in range(self.table.rowCount()):
            if self.table.item(row, 0).data(Qt.ItemDataRole.UserRole) == spec:
                if self.table.currentRow() != row:
                    self.table.blockSignals(True)
                    self.table.selectRow(row)
                    self.table.blockSignals(False)
                return

    def _estimate_args(self) -> dict:
        from core.estimate import sequence_length

        c = self.state.config
        seq_len, _ = sequence_length(c.data, self.state.data_summary)  # the lengths it will train on
        return dict(batch_size=c.train.batch_size, seq_len=seq_len, rank=c.lora.rank,
                    targets=c.lora.targets, precision=c.model.precision, quantize=c.model.quantize,
                    gradient_checkpointing=c.model.gradient_checkpointing)

    def _start_estimate(self) -> None:
        info = self.state.model_info
        if info is None:
            return
        if self._estimate_worker is not None:
            self._estimate_pending = True  # one at a time; the latest settings win
            return
        w = workers.FunctionWorker(_estimate, info.config, self._estimate_args(), self.state.config.model.device)
        self._estimate_worker = w
        w.finished.connect(self._show_memory)
        w.failed.connect(self._memory_failed)
        w.done.connect(self._estimate_done)
        workers.start(w, owner=self)

    def _estimate_done(self) -> None:
        self._estimate_worker = None
        if self._estimate_pending:
            self._estimate_pending = False
            self._start_estimate()

    def _show_memory(self, mem: dict) -> None:
        self.memory = mem
        for key, lab in self.memory_labels.items():
            lab.setText(format_bytes(mem.get(key)))
        from core.estimate import sequence_length

        c = self.state.config
        held = mem.get("quantize", "none")
        seq_len, basis = sequence_length(c.data, self.state.data_summary)
        self.memory_note.setText(
            f"batch {c.train.batch_size} × {seq_len} tokens ({basis}), r = {c.lora.rank}, "
            f"{mem.get('precision', '')}{'' if held == 'none' else ', linear layers ' + held}"
            f"{', checkpointing' if c.model.gradient_checkpointing else ''}. "
            "Peak of one step beyond the program itself.")

    def _memory_failed(self, message: str) -> None:
        self.memory = None
        for lab in self.memory_labels.values():
            lab.setText("–")
        self.memory_note.setText(message)

    # -- loading ----------------------------------------------------------------------------------
    def load_model(self) -> None:
        if self._load_worker is not None:
            return
        m = self.state.config.model
        w = workers.FunctionWorker(_load, m.source, m.device, m.precision, m.trust_remote_code, m.quantize)
        self._load_worker = w
        self.load_button.setEnabled(False)
        self.cancel_button.show()
        self.progress.setRange(0, 1000)  # the model jobs' busy bar may have left it without a measure
        self.progress.show()
        self.progress.setValue(0)
        self.progress_label.setText("Loading the model…")
        w.progress.connect(self._on_load_progress)
        w.finished.connect(self._on_load_finished)
        w.failed.connect(self._on_load_failed)
        w.cancelled.connect(lambda: self.progress_label.setText("Loading cancelled"))
        w.done.connect(self._load_done)
        workers.start(w, owner=self)

    def cancel_load(self) -> None:
        if self._load_worker is not None:
            self._load_worker.cancel()
            self.progress_label.setText("Cancelling…")

    def _on_load_progress(self, p) -> None:
        message, fraction = p
        self.progress.setValue(int(1000 * fraction))
        self.progress_label.setText(f"{message[:1].upper()}{message[1:]}…")  # the bar keeps to its %

    def _on_load_finished(self, loaded) -> None:
        self.state.set_loaded(loaded)
        held = "" if loaded.quantize == "none" else f", linear layers in {loaded.quantize}"
        self.progress_label.setText(f"Loaded on {loaded.device} in {str(loaded.dtype).replace('torch.', '')}{held}")

    def _on_load_failed(self, message: str) -> None:
        self.progress_label.setText("Loading failed")
        self.state.show_error(message)

    def _load_done(self) -> None:
        self._load_worker = None
        self.load_button.setEnabled(True)
        self.cancel_button.hide()
        self.progress.hide()

    def _on_loaded(self, loaded) -> None:
        self.load_button.setText("Reload model" if loaded is not None else "Load model")
        if loaded is None:
            self.progress_label.setText("")

    def _on_model_progress(self, message: str, fraction: float) -> None:
        """What the state's model jobs are doing, from the first frame: loading torch, reading the
        model (a busy bar: fraction < 0), converting a GGUF (the default) once (a measured bar)."""
        if self._load_worker is not None:
            return
        if fraction >= 1.0 or not message:
            self.progress.hide()
            self.progress.setRange(0, 1000)
            self.progress_label.setText("")
            return
        self.progress.show()
        if fraction < 0:
            self.progress.setRange(0, 0)  # busy: no measure of how far
            self.progress_label.setText(f"{message}…")
            return
        self.progress.setRange(0, 1000)
        self.progress.setValue(int(1000 * fraction))
        self.progress_label.setText(f"Converting the model to safetensors, once (later starts take seconds): "
                                    f"{message}")

    # -- settings ---------------------------------------------------------------------------------
    def save_settings(self, s) -> None:
        m = self.state.config.model
        s.setValue("source", m.source)
        s.setValue("device", m.device)
        s.setValue("precision", m.precision)
        s.setValue("quantize", m.quantize)
        s.setValue("gradient_checkpointing", m.gradient_checkpointing)

    def restore_settings(self, s) -> None:
        m = self.state.config.model
        m.source = setting(s, "source", m.source, str) or "default"
        dev = setting(s, "device", m.device, str)
        m.device = dev if dev in DEVICES else "auto"
        prec = setting(s, "precision", m.precision, str)
        m.precision = prec if prec in PRECISIONS else "auto"
        quantize = setting(s, "quantize", m.quantize, str)
        m.quantize = quantize if quantize in QUANTIZE and (quantize == "none" or _bitsandbytes_found()) else "none"
        m.gradient_checkpointing = setting(s, "gradient_checkpointing", False, bool)
        self._sync_from_config()

    def shutdown(self) -> None:
        for w in (self._load_worker, self._estimate_worker, self._list_worker):
            if w is not None:
                w.cancel()


PAGE = ModelPage
