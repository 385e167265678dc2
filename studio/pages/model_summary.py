"""The Model page's right side, as read: the chosen model's summary (``core.models.summary``) and the
training memory estimate (``core.models.estimate_memory``), each a form of labels. Plain views: the
page computes in workers and hands them dicts.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFormLayout, QGroupBox, QLabel

from studio.pages.model_list import KIND_TEXT
from studio.widgets import format_bytes, format_count

SUMMARY_ROWS = (("name", "Name"), ("architecture", "Architecture"), ("parameters", "Parameters"),
                ("layers", "Layers"), ("hidden_size", "Hidden size"), ("dtype", "Stored as"),
                ("context_length", "Context length"), ("chat_template", "Chat template"),
                ("size_bytes", "On disk"), ("path", "Path"))
MEMORY_ROWS = (("weights", "Frozen weights"), ("adapter", "Adapter"), ("gradients", "Gradients"),
               ("optimizer", "Optimizer (AdamW)"), ("activations", "Activations"), ("total", "Total"))

ORIGINAL = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The checkpoint the bundled default's GGUF was quantised from."""


def bundled_note(s: dict, dequantised_to: str | None) -> str:
    """What the bundled default is, in words: a 4-bit GGUF de-quantised, so an adapter trained on it
    is close to, not the same as, one trained on the original checkpoint ('' for other models)."""
    if s.get("kind") != "default":
        return ""
    stored = str(s.get("dtype") or "GGUF").replace("GGUF ", "")
    to = f"de-quantised to {dequantised_to}" if dequantised_to else "de-quantised once, on first use"
    return (f"{s.get('name', 'SmolLM2-135M-Instruct')} from a 4-bit GGUF ({stored}), {to}. An adapter trained "
            f"on it is close to, but not identical to, one trained on the original {ORIGINAL} checkpoint.")


class SummaryBox(QGroupBox):
    """What the chosen model is: name and source, architecture, size, storage, template, path."""

    def __init__(self, parent=None):
        super().__init__("Summary", parent)
        self.form = QFormLayout(self)
        self.labels: dict[str, QLabel] = {}
        for key, text in SUMMARY_ROWS:
            lab = QLabel("…")
            lab.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            lab.setWordWrap(key == "path")
            self.labels[key] = lab
            self.form.addRow(text, lab)
        self.note = QLabel()
        self.note.setWordWrap(True)
        self.note.setStyleSheet("color: palette(placeholder-text);")
        self.note.hide()
        self.form.addRow(self.note)

    def clear(self, text: str = "…") -> None:
        for lab in self.labels.values():
            lab.setText(text)
        self.note.hide()

    def show_summary(self, s: dict, dequantised_to: str | None = None) -> None:
        for key, lab in self.labels.items():
            lab.setText(self._text(key, s))
        note = bundled_note(s, dequantised_to)
        self.note.setText(note)
        self.note.setVisible(bool(note))

    @staticmethod
    def _text(key: str, s: dict) -> str:
        v = s.get(key)
        if key == "parameters":
            return f"{format_count(v)} ({v:,})" if v else "–"
        if key == "size_bytes":
            text = format_bytes(v)
            if s.get("kind") in ("default", "gguf"):
                text += ", converted" if s.get("converted") else ", converted on first use"
            return text
        if key == "chat_template":
            return "yes (chat-formatted prompts)" if v else "none (choose one on the Data page)"
        if key == "name":
            return f"{v} ({KIND_TEXT.get(s.get('kind'), s.get('kind'))})"
        return "–" if v is None else str(v)


class MemoryBox(QGroupBox):
    """The estimate of one training step's peak memory, by part, and what it assumed."""

    def __init__(self, parent=None):
        super().__init__("Training memory (estimate for the current settings)", parent)
        form = QFormLayout(self)
        self.labels: dict[str, QLabel] = {}
        for key, text in MEMORY_ROWS:
            lab = QLabel("…")
            if key == "total":
                f = lab.font()
                f.setBold(True)
                lab.setFont(f)
            self.labels[key] = lab
            form.addRow(text, lab)
        self.note = QLabel()
        self.note.setWordWrap(True)
        self.note.setStyleSheet("color: palette(placeholder-text);")
        form.addRow(self.note)

    def clear(self, text: str = "…") -> None:
        for lab in self.labels.values():
            lab.setText(text)

    def show_memory(self, mem: dict, config, seq_len: int, basis: str) -> None:
        """``mem``: core.models.estimate_memory's parts; ``config``: the RunConfig it was made for."""
        for key, lab in self.labels.items():
            lab.setText(format_bytes(mem.get(key)))
        held = mem.get("quantize", "none")
        self.note.setText(
            f"batch {config.train.batch_size} × {seq_len} tokens ({basis}), r = {config.lora.rank}, "
            f"{mem.get('precision', '')}{'' if held == 'none' else ', linear layers ' + held}"
            f"{', checkpointing' if config.model.gradient_checkpointing else ''}. "
            "Peak of one step beyond the program itself.")

    def failed(self, message: str) -> None:
        self.clear("–")
        self.note.setText(message)
