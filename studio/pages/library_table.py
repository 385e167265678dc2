"""The Library page's table: :class:`LibraryTableModel` (a ``QAbstractTableModel`` over
``core.library`` entries), :class:`LibraryFilter` (search, base-model filter, sorting by raw values,
entries without a figure last) and :func:`fit_columns`, which keeps every column in view at the
window's width (the long ones elide, their full text in the tooltip) instead of pushing the last
ones off to the right."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication, QTableView

from core.library_jobs import Compat  # noqa: F401  (the table's rows carry core's answer)
from studio.widgets import format_bytes, format_count

SORT_ROLE = Qt.ItemDataRole.UserRole + 1
ENTRY_ROLE = Qt.ItemDataRole.UserRole + 2

COLUMNS = [("name", "Name"), ("base_model", "Base"), ("rank", "r"), ("alpha", "α"),
           ("targets", "Targets"), ("params", "Params"), ("size", "Size"), ("created", "Created"),
           ("loss", "Loss"), ("score", "Score"), ("on_model", "On model")]
COLUMN = {key: i for i, (key, _) in enumerate(COLUMNS)}
NUMERIC = {"rank", "alpha", "params", "size", "loss", "score"}
SCORE_ORDER = ("exact_match", "json_fields", "json_valid", "chrf", "rougeL", "bleu", "loss")
"""Which stored Evaluate metric the Score column shows first, when the adapters have several."""
ALL_BASES = "All base models"
HEADER_TIPS = {"base_model": "The base model it was trained on", "rank": "Rank r of the update B·A", "alpha": "Alpha α: the update is scaled by α/r (α/√r with rsLoRA)",
               "loss": "The best validation loss, else the final training loss",
               "score": "The adapter's score from its last evaluation (Evaluate page, kept beside it in the "
                        "library); the metric is chosen beside the search box",
               "params": "Trainable parameters: Σ r·(d_in + d_out) over the adapted matrices",
               "on_model": "How the adapter is on the loaded model: active, merged into the weights, or "
                           "loaded but inactive"}


def _created(text: str, *, short: bool = False) -> str:
    """ISO timestamp (UTC) → local ``YYYY-MM-DD HH:MM`` (``short``: ``Nov 28 15:14`` this year)."""
    if not text:
        return ""
    try:
        t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    if t.tzinfo is not None:
        t = t.astimezone()
    if short and t.year == _dt.datetime.now().year:
        return t.strftime("%b %d %H:%M")
    return t.strftime("%Y-%m-%d %H:%M")


def _short_model(spec: str) -> str:
    """A base model as a column shows it: a folder or file by its name, a repo id as it is."""
    if not spec:
        return "?"
    if spec == "default":
        return "SmolLM2-135M-Instruct"
    if "/" in spec and not spec.startswith(("/", ".", "~")) and spec.count("/") == 1:
        return spec  # org/name
    return Path(spec).name or spec


def _targets(entry) -> str:
    return ", ".join(entry.targets) if entry.targets else ""


# -- the table ---------------------------------------------------------------------------------------

class LibraryTableModel(QAbstractTableModel):
    """Rows are core.library entries; ``compat`` (id → Compat) and ``on_model`` (id → state) come
    from the loaded model and only change how rows look."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.entries: list = []
        self.compat: dict[str, Compat] = {}
        self.on_model: dict[str, str] = {}
        self.scores: dict[str, dict[str, float]] = {}  # id -> the scores its evaluation.json stores
        self.metric: str | None = None  # the one the Score column shows

    def set_entries(self, entries: list) -> None:
        from core.eval_results import stored_evaluation

        self.beginResetModel()
        self.entries = list(entries)
        self.scores = {}
        for e in self.entries:
            scores = (stored_evaluation(e.path) or {}).get("scores") or {}
            self.scores[e.id] = {m: float(v) for m, v in scores.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.metric not in self.metrics():
            self.metric = next(iter(self.metrics()), None)
        self.endResetModel()

    def metrics(self) -> list[str]:
        """The metrics some entry has a stored score for, the usual first (SCORE_ORDER)."""
        have = {m for s in self.scores.values() for m in s if m != "perplexity"}
        return sorted(have, key=lambda m: (SCORE_ORDER.index(m) if m in SCORE_ORDER else len(SCORE_ORDER), m))

    def set_metric(self, metric: str | None) -> None:
        self.metric = metric
        self.headerDataChanged.emit(Qt.Orientation.Horizontal, COLUMN["score"], COLUMN["score"])
        self._all_changed()

    def score(self, entry) -> float | None:
        return self.scores.get(entry.id, {}).get(self.metric) if self.metric else None

    def set_compat(self, compat: dict[str, Compat]) -> None:
        self.compat = dict(compat)
        self._all_changed()

    def set_on_model(self, on_model: dict[str, str]) -> None:
        self.on_model = dict(on_model)
        self._all_changed()

    def _all_changed(self) -> None:
        if self.entries:
            self.dataChanged.emit(self.index(0, 0), self.index(len(self.entries) - 1, len(COLUMNS) - 1))

    def row_of(self, entry_id: str) -> int:
        return next((i for i, e in enumerate(self.entries) if e.id == entry_id), -1)

    # -- Qt -------------------------------------------------------------------------------------
    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.entries)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            if COLUMNS[section][0] == "score" and self.metric:
                return self.metric
            return COLUMNS[section][1]
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.ToolTipRole:
            return HEADER_TIPS.get(COLUMNS[section][0])
        return None

    def raw(self, entry, key: str) -> Any:
        """The value a column sorts by (None sorts last)."""
        return {
            "name": entry.name.casefold(), "base_model": entry.base_model or None, "rank": entry.rank,
            "alpha": entry.alpha, "targets": _targets(entry) or None, "params": entry.trainable_params or None,
            "size": entry.size_bytes or None, "created": entry.created or None, "loss": entry.loss,
            "score": self.score(entry), "on_model": self.on_model.get(entry.id),
        }[key]

    def display(self, entry, key: str) -> str:
        if key == "name":
            return entry.name
        if key == "base_model":
            return _short_model(entry.base_model)
        if key == "rank":
            return "" if entry.rank is None else str(entry.rank)
        if key == "alpha":
            return "" if entry.alpha is None else f"{entry.alpha:g}" + (" (rs)" if entry.rslora else "")
        if key == "targets":
            return _targets(entry)
        if key == "params":
            return format_count(entry.trainable_params) if entry.trainable_params else ""
        if key == "size":
            return format_bytes(entry.size_bytes) if entry.size_bytes else ""
        if key == "created":
            return _created(entry.created, short=True)
        if key == "loss":
            return "" if entry.loss is None else f"{entry.loss:.4f}"
        if key == "score":
            v = self.score(entry)
            return "" if v is None else (f"{v:.1f}" if self.metric in ("bleu", "chrf") else f"{v:.3f}")
        if key == "on_model":
            return self.on_model.get(entry.id, "")
        return ""

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        entry = self.entries[index.row()]
        key = COLUMNS[index.column()][0]
        compat = self.compat.get(entry.id)
        if role == Qt.ItemDataRole.DisplayRole:
            return self.display(entry, key)
        if role == SORT_ROLE:
            return self.raw(entry, key)
        if role == ENTRY_ROLE:
            return entry
        if role == Qt.ItemDataRole.ToolTipRole:
            if compat is not None and compat.problems:
                return "Cannot be applied to the loaded model:\n" + "\n".join(compat.problems)
            if compat is not None and compat.warnings:
                return "\n".join(compat.warnings)
            if key == "targets":
                return _targets(entry)
            if key == "base_model":
                return entry.base_model or None
            if key == "created":
                return _created(entry.created)
            return entry.notes or None
        if role == Qt.ItemDataRole.ForegroundRole:
            if compat is not None and compat.problems:
                return QApplication.palette().color(QPalette.ColorGroup.Disabled, QPalette.ColorRole.Text)
            if compat is not None and compat.warnings and key == "name":
                return QColor("#C77700")
        if role == Qt.ItemDataRole.FontRole and key == "on_model" and self.on_model.get(entry.id):
            f = QApplication.font()
            f.setBold(True)
            return f
        if role == Qt.ItemDataRole.TextAlignmentRole and key in NUMERIC:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None


class LibraryFilter(QSortFilterProxyModel):
    """Search on name and notes (case-insensitive), an optional base model, sorting by raw values."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.text = ""
        self.base_model = ""
        self.setSortRole(SORT_ROLE)

    def set_text(self, text: str) -> None:
        self._refilter(lambda: setattr(self, "text", text.strip().casefold()))

    def set_base_model(self, base: str) -> None:
        self._refilter(lambda: setattr(self, "base_model", base))

    def _refilter(self, change) -> None:
        """Qt 6.10 replaced invalidateFilter with a begin/end pair around the change."""
        if hasattr(self, "beginFilterChange"):
            self.beginFilterChange()
            change()
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:  # pragma: no cover - older Qt
            change()
            self.invalidateFilter()

    def filterAcceptsRow(self, row: int, parent: QModelIndex) -> bool:
        entry = self.sourceModel().entries[row]
        if self.base_model and entry.base_model != self.base_model:
            return False
        if self.text:
            hay = f"{entry.name}\n{entry.notes}\n{_targets(entry)}".casefold()
            return all(word in hay for word in self.text.split())
        return True

    def lessThan(self, left: QModelIndex, right: QModelIndex) -> bool:
        a, b = left.data(SORT_ROLE), right.data(SORT_ROLE)
        descending = self.sortOrder() == Qt.SortOrder.DescendingOrder
        if a is None or b is None:  # missing figures last, whichever the direction
            return (a is not None and b is None) != descending if (a is None) != (b is None) else False
        try:
            return a < b
        except TypeError:
            return str(a) < str(b)


ELASTIC = {"name": 90, "base_model": 70, "targets": 70}
"""Columns that give up width when the table is narrow (key → the least they keep, in pixels); the
others keep what their contents need. Any width to spare goes to the name."""

PREFERRED = {"name": 170, "base_model": 90, "targets": 90}
"""What the elastic columns shrink to first, so the name is the last to be cut short."""


def fit_columns(table: QTableView, caps: dict[str, int] | None = None) -> None:
    """Size the columns to their contents, then fit them into the viewport: the elastic ones
    (:data:`ELASTIC`) shrink, the largest first, down to their minimum, and spare width widens the
    name. Only when even the minimums do not fit does a horizontal scroll bar appear."""
    caps = caps or {"name": 220, "base_model": 170, "targets": 150}
    table.resizeColumnsToContents()
    width = {key: table.columnWidth(COLUMN[key]) for key, _ in COLUMNS}
    for key, cap in caps.items():
        width[key] = min(width[key], cap)
    room = table.viewport().width()
    excess = sum(width.values()) - room
    for floor in (PREFERRED, dict(ELASTIC, name=PREFERRED["name"]), ELASTIC):  # the name gives up last
        while excess > 0:
            shrinkable = [k for k in floor if width[k] > floor[k]]
            if not shrinkable:
                break
            k = max(shrinkable, key=lambda k: width[k] - floor[k])
            step = min(excess, width[k] - floor[k], max(1, excess // len(shrinkable)))
            width[k] -= step
            excess -= step
    if excess < 0:
        width["name"] += -excess
    for key, w in width.items():
        table.setColumnWidth(COLUMN[key], w)


class LibraryTableView(QTableView):
    """The table, its columns fitted again (:func:`fit_columns`) whenever its width changes."""

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        super().resizeEvent(event)
        if event.oldSize().width() != event.size().width() and self.model() is not None:
            fit_columns(self)
