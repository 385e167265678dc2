"""The Library page's right side: the selected adapter's details (with editable notes), its loss
curve and its ΔW analysis, as three tabs; and the "Moved … to the trash. Undo" bar.

Plain views: the page tells them what to show (an entry, what is on the model, whether it fits);
reading and writing the library stays on the page."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QFrame, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QTabWidget, QToolButton,
                               QVBoxLayout, QWidget)

from studio.messages import rephrase
from studio.widgets import format_bytes
from studio.pages.library_table import _created, _targets


class UndoBar(QFrame):
    """"Moved … to the trash. Undo" after a delete, until dismissed or replaced."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.label = QLabel()
        self.label.setWordWrap(True)  # many long names must not widen the window
        self.undo = QPushButton("Undo")
        close = QToolButton()
        close.setText("✕")
        close.setAutoRaise(True)
        close.clicked.connect(self.hide)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(8, 2, 4, 2)
        lay.addWidget(self.label, 1)
        lay.addWidget(self.undo)
        lay.addWidget(close)
        self.hide()


class EntryDetails(QTabWidget):
    """Details (title, whether it fits the loaded model, facts, notes), Loss curve, ΔW analysis."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        from studio.widgets.curves import CurvesPlot
        from studio.widgets.delta_plot import DeltaPlot

        self.title = QLabel()
        self.title.setWordWrap(True)
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.facts = QLabel()
        self.facts.setWordWrap(True)
        self.facts.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.facts.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.compat_label = QLabel()
        self.compat_label.setWordWrap(True)
        self.notes = QPlainTextEdit()
        self.notes.setPlaceholderText("Notes: what this adapter is for, how it did…")
        self.notes.setMinimumHeight(80)
        self.save_notes_button = QPushButton("Save notes")
        self.save_notes_button.setEnabled(False)
        details = QWidget()
        dl = QVBoxLayout(details)
        dl.addWidget(self.title)
        dl.addWidget(self.compat_label)
        dl.addWidget(self.facts)
        dl.addWidget(QLabel("<b>Notes</b>"))
        dl.addWidget(self.notes, 1)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(self.save_notes_button)
        dl.addLayout(row)
        self.curve = CurvesPlot()
        self.delta = DeltaPlot()
        self.addTab(details, "Details")
        self.addTab(self.curve, "Loss curve")
        self.addTab(self.delta, "ΔW analysis")

    def show_none(self, selected: int) -> None:
        """Nothing (or several adapters) selected."""
        self.notes.blockSignals(True)
        self.title.setText(f"<b>{selected} adapters selected</b>" if selected > 1 else "<b>No adapter selected</b>")
        self.facts.setText("Select one adapter to see its details, loss curve and ΔW analysis."
                           if selected <= 1 else "Combine them, or export them merged into one model.")
        self.compat_label.setText("")
        self.notes.setPlainText("")
        self.notes.setEnabled(False)
        self.curve.clear("")
        self.delta.set_message("Select one adapter to see what it changed.")
        self.notes.blockSignals(False)
        self.save_notes_button.setEnabled(False)

    def show_entry(self, entry, on_model: str | None) -> None:
        """``entry`` (a core.library Entry); ``on_model``: how it is on the loaded model, if it is."""
        self.notes.blockSignals(True)
        self.notes.setEnabled(True)
        self.notes.setPlainText(entry.notes or "")
        self.notes.blockSignals(False)
        self.save_notes_button.setEnabled(False)
        self.title.setText(f"<b style='font-size: 14pt'>{_html(entry.name)}</b>")
        rows = entry_facts(entry)
        if on_model:
            rows.append(("On the model", on_model))
        self.facts.setText("<table cellspacing='0' cellpadding='2'>" + "".join(
            f"<tr><td style='color: palette(placeholder-text); padding-right: 10px'>{_html(k)}</td>"
            f"<td>{_html(v)}</td></tr>" for k, v in rows) + "</table>")
        self.curve.set_series([(entry.name, entry.loss_curve, entry.eval_curve)],
                              message_if_empty="This adapter has no recorded loss curve (it was not trained "
                                               "by the studio, or its studio.json was lost).")
        self.delta.set_message("The analysis runs when this tab is shown.")

    def show_compat(self, loaded: bool, compat) -> None:
        """Whether the shown adapter fits the loaded model (``compat``: core.library_jobs.Compat)."""
        if not loaded:
            text = "No model is loaded; load one to apply this adapter."
        elif compat is None:
            text = "Checking whether it fits the loaded model…"
        elif compat.problems:
            text = ("<span style='color:#C0392B'><b>Does not fit the loaded model:</b> "
                    + _html(rephrase("; ".join(compat.problems))) + "</span>")
        elif compat.warnings:
            text = ("<span style='color:#C77700'><b>Fits, with a warning:</b> "
                    + _html(rephrase("; ".join(compat.warnings))) + "</span>")
        else:
            text = "Fits the loaded model."
        self.compat_label.setText(text)


def entry_facts(entry) -> list[tuple[str, str]]:
    """The rows of an entry's details: base, shape, targets, training, dataset, evaluation, folder."""
    base = entry.base_model or "unknown"
    rows = [("Base model", "default (the bundled SmolLM2-135M-Instruct)" if base == "default" else base),
            ("Rank / alpha", f"r = {entry.rank}, α = {entry.alpha:g}" + (" (rsLoRA)" if entry.rslora else "")
             if entry.rank is not None and entry.alpha is not None else "?"),
            ("Targets", f"{_targets(entry)} ({entry.modules} modules)"),
            ("Parameters", f"{entry.trainable_params:,}" if entry.trainable_params else "?"),
            ("Size on disk", format_bytes(entry.size_bytes)),
            ("Created", _created(entry.created))]
    training = _training_line(entry.training or {})
    if training:
        rows.append(("Training", training))
    ds = entry.dataset or {}
    if ds.get("path"):
        rows.append(("Dataset", str(ds["path"]) + (f" ({ds['rows']} rows)" if ds.get("rows") else "")))
    if entry.imported_from:
        rows.append(("Came from", entry.imported_from))
    from core.eval_results import stored_summary

    evaluated = stored_summary(entry.path)  # written by the Evaluate page
    if evaluated:
        rows.append(("Evaluation", evaluated))
    rows.append(("Folder", str(entry.path)))
    return rows


def _training_line(t: dict) -> str:
    bits = []
    if t.get("steps") is not None:
        bits.append(f"{t['steps']} steps")
    if isinstance(t.get("final_loss"), (int, float)):
        bits.append(f"final loss {t['final_loss']:.4f}")
    best = next((t[k] for k in ("best_eval_loss", "best_val_loss") if isinstance(t.get(k), (int, float))), None)
    if best is not None:
        bits.append(f"best validation loss {best:.4f}")
    seconds = next((t[k] for k in ("duration_seconds", "duration_s") if isinstance(t.get(k), (int, float))), None)
    if seconds is not None:
        from studio.widgets import format_duration

        bits.append(f"{format_duration(seconds)} of training")
    return ", ".join(bits)


def _html(text: Any) -> str:
    """Escaped for rich text, with a zero-width space after each path separator and underscore so a
    long path or name wraps in the details instead of widening the window."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("/", "/\u200b").replace("\\", "\\\u200b").replace("_", "_\u200b")
