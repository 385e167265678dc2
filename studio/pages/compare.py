"""Compare runs: pick two or more training runs, see their loss curves overlaid and their
configurations side by side with the differences highlighted.

Runs are what ``core.runs.list_runs`` finds in the studio's runs folder, plus any folder the user
adds (remembered in the settings). Each run's ``config.json`` is flattened to ``part.option`` rows
(``lora.rank``, ``train.lr``, ...) so that one table shows every option of every chosen run; rows
whose values differ are highlighted and can be shown alone. A few outcome rows (status, steps, final
and best validation loss) come first, read from the run's ``metrics.jsonl`` and ``status.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush, QColor, QFont
from PySide6.QtWidgets import (QCheckBox, QFileDialog, QHBoxLayout, QHeaderView, QLabel, QPushButton,
                               QSplitter, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from studio.pages import Page
from studio.widgets import palette_colors

OUTCOME = "result"


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """``{"lora": {"rank": 8}}`` → ``{"lora.rank": "8"}``; lists joined with commas."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, (list, tuple)):
        out[prefix] = ", ".join(str(x) for x in d)
    elif d is None:
        out[prefix] = "–"
    elif isinstance(d, float):
        out[prefix] = f"{d:g}"
    else:
        out[prefix] = str(d)
    return out


def read_run(path: str) -> dict:
    """What the page shows of one run: its flattened config, loss and eval curves, and outcome rows.
    A run folder being written is read as far as it goes (core.runs drops a partial last line)."""
    from core import runs

    folder = runs.RunFolder(path)
    try:
        config = json.loads(folder.config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        config = {}
    rows = runs.read_metrics(folder.metrics_path) if folder.metrics_path.exists() else []
    loss = [[r["step"], r["loss"]] for r in rows if isinstance(r.get("loss"), (int, float)) and "step" in r]
    evals = [[r["step"], r["eval_loss"]] for r in rows if isinstance(r.get("eval_loss"), (int, float)) and "step" in r]
    info = folder.info()
    outcome = {
        "status": info.get("status") or "?",
        "steps": str(loss[-1][0]) if loss else str(info.get("step") or 0),
        "final loss": f"{loss[-1][1]:.4f}" if loss else "–",
        "best validation loss": f"{min(v for _, v in evals):.4f}" if evals else "–",
    }
    return {"path": path, "name": info.get("name") or Path(path).name, "config": flatten(config),
            "loss": loss, "eval": evals, "outcome": outcome}


class ComparePage(Page):
    KEY = "compare"
    TITLE = "Compare runs"
    ICON = "SP_FileDialogContentsView"

    def __init__(self, state, parent: QWidget | None = None):
        super().__init__(state, parent)
        self.extra_roots: list[str] = []
        self.runs: list[dict] = []
        self.loaded: dict[str, dict] = {}

        self.run_table = QTableWidget(0, 4)
        self.run_table.setHorizontalHeaderLabels(["run", "status", "steps", "started"])
        self.run_table.verticalHeader().hide()
        self.run_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.run_table.setSelectionMode(QTableWidget.SelectionMode.NoSelection)
        self.run_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.run_table.setWordWrap(False)
        self.run_table.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.run_table.itemChanged.connect(self._checked)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        self.add_button = QPushButton("Add run folder…")
        self.add_button.setToolTip("Compare a run that lies outside the studio's runs folder")
        self.add_button.clicked.connect(self._add_dialog)
        self.hint = QLabel()
        self.hint.setWordWrap(True)
        self.hint.setStyleSheet("color: palette(placeholder-text);")
        buttons = QHBoxLayout()
        buttons.addWidget(self.refresh_button)
        buttons.addWidget(self.add_button)
        buttons.addStretch(1)
        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 0, 0)
        ll.addWidget(QLabel("<b>Runs</b> (tick two or more)"))
        ll.addWidget(self.run_table, 1)
        ll.addWidget(self.hint)
        ll.addLayout(buttons)

        from studio.widgets.curves import CurvesPlot

        self.curves = CurvesPlot(title="")
        self.only_diff = QCheckBox("Only options that differ")
        self.only_diff.toggled.connect(self._apply_row_filter)
        self.config_table = QTableWidget(0, 0)
        self.config_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.config_table.verticalHeader().hide()
        self.config_table.setAlternatingRowColors(False)
        self.config_table.setWordWrap(False)
        self.config_table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        right_bottom = QWidget()
        rb = QVBoxLayout(right_bottom)
        rb.setContentsMargins(0, 0, 0, 0)
        rb.addWidget(self.only_diff)
        rb.addWidget(self.config_table, 1)
        right = QSplitter(Qt.Orientation.Vertical)
        right.addWidget(self.curves)
        right.addWidget(right_bottom)
        right.setSizes([380, 320])

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(right)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 3)
        split.setSizes([400, 820])
        lay = QVBoxLayout(self)
        lay.addWidget(split)

        state.training_changed.connect(lambda on: not on and self.refresh())
        self.differing: set[str] = set()
        self.refresh()

    # -- the list of runs -------------------------------------------------------------------------
    def refresh(self) -> None:
        from core import runs

        checked = set(self.checked_paths())
        try:
            self.runs = runs.list_runs(roots=[r for r in self.extra_roots if Path(r).is_dir()])
        except Exception as e:  # noqa: BLE001 - an unreadable folder must not break the page
            from studio import workers

            self.state.show_error(workers.error_message(e))
            self.runs = []
        self.loaded = {}
        self.run_table.blockSignals(True)
        self.run_table.setRowCount(len(self.runs))
        for row, info in enumerate(self.runs):
            name = QTableWidgetItem(info.get("name") or Path(info["path"]).name)
            name.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsUserCheckable)
            name.setCheckState(Qt.CheckState.Checked if info["path"] in checked else Qt.CheckState.Unchecked)
            name.setData(Qt.ItemDataRole.UserRole, info["path"])
            name.setToolTip(f"{name.text()}\n{info['path']}")
            self.run_table.setItem(row, 0, name)
            total = info.get("total_steps")
            cells = [info.get("status") or "", f"{info.get('step') or 0}" + (f" / {total}" if total else ""),
                     _when(info.get("started"))]
            for col, text in enumerate(cells, start=1):
                item = QTableWidgetItem(text)
                item.setFlags(Qt.ItemFlag.ItemIsEnabled)
                self.run_table.setItem(row, col, item)
        self.run_table.resizeColumnsToContents()
        self.run_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.run_table.blockSignals(False)
        self.hint.setText("" if self.runs else "No runs yet: runs started on the Train page appear here, "
                                               "or add a run folder.")
        self.update_comparison()

    def add_root(self, path: str) -> None:
        """Also list the run(s) in ``path`` (a run folder or a folder of runs)."""
        if path and path not in self.extra_roots:
            self.extra_roots.append(path)
        self.refresh()

    def _add_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Add a run folder (or a folder of runs)")
        if path:
            self.add_root(path)

    def checked_paths(self) -> list[str]:
        out = []
        for row in range(self.run_table.rowCount()):
            item = self.run_table.item(row, 0)
            if item is not None and item.checkState() == Qt.CheckState.Checked:
                out.append(item.data(Qt.ItemDataRole.UserRole))
        return out

    def set_checked(self, paths: list[str]) -> None:
        wanted = {str(p) for p in paths}
        self.run_table.blockSignals(True)
        for row in range(self.run_table.rowCount()):
            item = self.run_table.item(row, 0)
            item.setCheckState(Qt.CheckState.Checked if item.data(Qt.ItemDataRole.UserRole) in wanted
                               else Qt.CheckState.Unchecked)
        self.run_table.blockSignals(False)
        self.update_comparison()

    def _checked(self, item: QTableWidgetItem) -> None:
        if item.column() == 0:
            self.update_comparison()

    # -- the comparison ---------------------------------------------------------------------------
    def update_comparison(self) -> None:
        paths = self.checked_paths()
        chosen = []
        for p in paths:
            if p not in self.loaded:
                self.loaded[p] = read_run(p)
            chosen.append(self.loaded[p])
        if not chosen:
            self.curves.clear("Tick runs on the left to overlay their loss curves.")
        else:
            self.curves.set_series([(r["name"], r["loss"], r["eval"]) for r in chosen],
                                   message_if_empty="These runs have no loss recorded yet.")
        self._fill_config(chosen)

    def _fill_config(self, chosen: list[dict]) -> None:
        t = self.config_table
        t.clear()
        t.setColumnCount(1 + len(chosen))
        t.setHorizontalHeaderLabels(["option"] + [r["name"] for r in chosen])
        keys = [(OUTCOME, k) for k in ("status", "steps", "final loss", "best validation loss")]
        seen = []
        for r in chosen:
            for k in r["config"]:
                if k not in seen:
                    seen.append(k)
        # options that differ first: they are what the comparison is about; the run's own name and
        # folder always differ, so they come after those
        def order(k: str) -> int:
            same = len({r["config"].get(k, "–") for r in chosen}) == 1
            return 2 if same else (1 if k in ("name", "out") else 0)

        differs_first = sorted(seen, key=order)
        keys += [("config", k) for k in differs_first]
        t.setRowCount(len(keys) if chosen else 0)
        self.differing = set()
        c = palette_colors()
        highlight = QColor(c["series"][1])
        highlight.setAlpha(70)
        bold = QFont(t.font())
        bold.setBold(True)
        for row, (kind, key) in enumerate(keys if chosen else []):
            values = [(r["outcome"] if kind == OUTCOME else r["config"]).get(key, "–") for r in chosen]
            differs = len(set(values)) > 1
            label = QTableWidgetItem(key if kind != OUTCOME else key)
            if kind == OUTCOME:
                label.setFont(bold)
            t.setItem(row, 0, label)
            for col, v in enumerate(values, start=1):
                t.setItem(row, col, QTableWidgetItem(v))
            if differs and kind != OUTCOME:
                self.differing.add(key)
            if differs:
                for col in range(len(values) + 1):
                    t.item(row, col).setBackground(QBrush(highlight))
                    if kind != OUTCOME:
                        t.item(row, col).setToolTip("differs between the chosen runs")
            t.item(row, 0).setData(Qt.ItemDataRole.UserRole, (kind, key, differs))
        header = t.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        for col in range(1, t.columnCount()):  # the runs share the width; long paths are elided
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.Stretch)
        self._apply_row_filter()

    def _apply_row_filter(self, *_):
        only = self.only_diff.isChecked()
        for row in range(self.config_table.rowCount()):
            kind, _, differs = self.config_table.item(row, 0).data(Qt.ItemDataRole.UserRole)
            self.config_table.setRowHidden(row, only and kind != OUTCOME and not differs)

    # -- window hooks -----------------------------------------------------------------------------
    def page_shown(self) -> None:
        self.refresh()

    def save_settings(self, settings) -> None:
        settings.setValue("extra_roots", json.dumps(self.extra_roots))
        settings.setValue("checked", json.dumps(self.checked_paths()))
        settings.setValue("only_diff", self.only_diff.isChecked())

    def restore_settings(self, settings) -> None:
        from studio.pages import setting

        try:
            self.extra_roots = [str(p) for p in json.loads(setting(settings, "extra_roots", "[]", str))]
            checked = [str(p) for p in json.loads(setting(settings, "checked", "[]", str))]
        except (ValueError, TypeError):
            self.extra_roots, checked = [], []
        self.only_diff.setChecked(setting(settings, "only_diff", False, bool))
        self.refresh()
        self.set_checked(checked)


def _when(t: Any) -> str:
    try:
        return _dt.datetime.fromtimestamp(float(t)).strftime("%b %d %H:%M")
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


PAGE = ComparePage
