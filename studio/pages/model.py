"""The Model page: which base model to adapt, on which device, in which precision and whether its
linear layers are held in 4 or 8 bits (QLoRA, core.quant), what it is, and what one training step
will need in memory with the current settings.

The list is studio.pages.model_list (with the Hub download box under it), the Load row
studio.pages.model_load; the summary and the memory estimate are studio.pages.model_summary's views of ``core.models.summary`` and
``core.models.estimate_memory``; the estimate is recomputed in a worker (it builds the model on the
meta device) a moment after any setting it depends on changes.

``trust_remote_code`` belongs to one model: choosing another model turns it off (studio.state), and
the check box follows.
"""

from __future__ import annotations

import importlib.util

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QVBoxLayout,
                               QWidget)

from core.config import DEVICES, PRECISIONS, QUANTIZE, QUANTIZE_LABELS, QUANTIZE_PIP
from studio import workers
from studio.pages import Page, setting
from studio.pages.model_list import ModelList
from studio.pages.model_load import LoadPanel
from studio.pages.model_summary import MemoryBox, SummaryBox


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


def _dequantised_to(spec: str) -> str | None:
    """The dtype a converted GGUF's checkpoint holds (None while it is not converted)."""
    from core import models

    dtype = getattr(models.load_config(spec), "dtype", None)
    return str(dtype).replace("torch.", "") if dtype is not None else None


def _bitsandbytes_found() -> bool:
    """core.quant.available() without importing torch (the window shows before torch is loaded)."""
    return importlib.util.find_spec("bitsandbytes") is not None


class ModelPage(Page):
    KEY = "model"
    TITLE = "Model"
    ICON = "SP_DriveHDIcon"

    def __init__(self, state, parent=None):
        super().__init__(state, parent)
        self._estimate_worker = None
        self._estimate_pending = False
        self.memory: dict | None = None
        self.dequantised_to: str | None = None

        # -- left: the models (the list, then the Hub download box) ---------------------------------
        self.model_list = ModelList(state)
        self.model_list.picked.connect(self.choose)
        self.table, self.search = self.model_list.table, self.model_list.search
        from studio.widgets.hub_panel import HubPanel  # download by name, with the fit check first

        self.hub_panel = HubPanel(state, lambda: (self._estimate_args(), self.device.currentText()))
        self.hub_panel.downloaded.connect(lambda spec: (self.choose(spec), self.refresh_list()))
        self.model_list.layout().addWidget(self.hub_panel)

        # -- right: where it runs, summary, memory, load --------------------------------------------
        self.summary_box = SummaryBox()
        self.summary_labels = self.summary_box.labels
        self.memory_box = MemoryBox()
        self.memory_labels, self.memory_note = self.memory_box.labels, self.memory_box.note
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addWidget(self._run_box())
        rl.addWidget(self.summary_box)
        rl.addWidget(self.memory_box)
        self.load_panel = LoadPanel(state)
        self.load_model, self.progress = self.load_panel.load, self.load_panel.progress
        self.progress_label, self.load_button = self.load_panel.label, self.load_panel.load_button
        rl.addWidget(self.load_panel)
        rl.addStretch(1)

        lay = QHBoxLayout(self)
        lay.addWidget(self.model_list, 3)
        lay.addWidget(right, 2)

        self._estimate_timer = QTimer(self)
        self._estimate_timer.setSingleShot(True)
        self._estimate_timer.setInterval(200)
        self._estimate_timer.timeout.connect(self._start_estimate)

        state.model_info_changed.connect(self._on_info)
        state.model_info_failed.connect(self._on_info_failed)
        state.tokenizer_changed.connect(self._on_tokenizer)
        state.config_changed.connect(self._on_config)
        state.data_summary_changed.connect(lambda *_: self.state.model_info and self._estimate_timer.start())
        self._sync_from_config()
        self._listed = False

    def _run_box(self) -> QGroupBox:
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
        self.trust.setToolTip("Off unless you trust the model's authors: its Python files would run. "
                              "For this model only: choosing another model turns it off.")
        self.device.currentTextChanged.connect(self._on_device)
        self.precision.currentTextChanged.connect(self._on_device)
        self.quantize.currentIndexChanged.connect(self._on_device)
        self.checkpointing.toggled.connect(self._on_device)
        self.trust.toggled.connect(self._on_trust)
        box = QGroupBox("Where it runs")
        form = QFormLayout(box)
        form.addRow("Device", self.device)
        precision_row = QHBoxLayout()
        precision_row.addWidget(self.precision, 1)
        precision_row.addWidget(QLabel("Quantize"))
        precision_row.addWidget(self.quantize, 1)
        form.addRow("Precision", precision_row)
        form.addRow(self.checkpointing)
        form.addRow(self.trust)
        return box

    # -- the list ---------------------------------------------------------------------------------
    @property
    def models(self) -> list[dict]:
        return self.model_list.models

    def page_shown(self) -> None:
        if not self._listed:
            self.refresh_list()

    def refresh_list(self) -> None:
        self._listed = True
        self.model_list.refresh()

    def set_models(self, models: list[dict]) -> None:
        self.model_list.set_models(models)

    def choose(self, spec: str) -> None:
        """Make ``spec`` the base model (what a click in the list does)."""
        if self.state.training:
            self.state.show_error("A training run is in progress; the base model can change after it ends")
            self.model_list.select_current()
            return
        self.state.set_model(spec)

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
            self.summary_box.clear()
            self.memory_box.clear()
            return
        self.dequantised_to = None
        self.summary_box.show_summary(info.summary)
        self._estimate_timer.start()

    def _on_tokenizer(self, tok) -> None:
        info = self.state.model_info
        if tok is None or info is None:
            return
        self.summary_box.show_summary(info.summary, self.dequantised_to)  # "on first use" is now "converted"
        if info.summary.get("kind") == "default":  # converted now: what it was de-quantised to
            w = workers.FunctionWorker(_dequantised_to, info.spec)
            w.finished.connect(lambda dtype, spec=info.spec: self._show_dequantised(spec, dtype))
            workers.start(w, owner=self)

    def _show_dequantised(self, spec: str, dtype) -> None:
        info = self.state.model_info
        if info is not None and info.spec == spec:
            self.dequantised_to = dtype
            self.summary_box.show_summary(info.summary, dtype)

    def _on_info_failed(self, message: str) -> None:
        self.summary_box.clear("–")
        self.summary_labels["name"].setText("cannot be read (see the message above)")

    def _on_config(self, part: str) -> None:
        if part in ("model", "all"):
            self._sync_from_config()
            self.model_list.select_current()
        if self.state.model_info is not None and part in ("model", "lora", "data", "train", "all"):
            self._estimate_timer.start()

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
        from core.estimate import sequence_length

        self.memory = mem
        seq_len, basis = sequence_length(self.state.config.data, self.state.data_summary)
        self.memory_box.show_memory(mem, self.state.config, seq_len, basis)

    def _memory_failed(self, message: str) -> None:
        self.memory = None
        self.memory_box.failed(message)

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
        for w in (self.load_panel.worker, self._estimate_worker, self.model_list.worker):
            if w is not None:
                w.cancel()


PAGE = ModelPage
