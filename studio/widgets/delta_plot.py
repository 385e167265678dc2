"""The ΔW plot: what an adapter changed in each matrix, from core.analysis.

For one matrix (chosen in a combo box) the singular values of ΔW = s·B·A are drawn as bars, largest
first, with the effective rank marked: how many directions carry the chosen share of the update's
energy (Σσ², section 7 of the LoRA paper asks the same question of its trained updates). The first
entry of the combo, "All matrices", draws the effective rank of every adapted matrix instead, so a
glance shows where the rank budget went; a table under the plot gives each matrix's figures
(effective rank, ‖ΔW‖_F, amplification when the base weights were available).

The widget only draws what it is given: :func:`normalise` turns core.analysis's result into
``{module: ModuleFacts}``; the analysis itself runs in a worker in the page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (QComboBox, QHBoxLayout, QHeaderView, QLabel, QSplitter, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from studio.widgets import palette_colors, style_plot

ALL = "All matrices (effective rank)"


@dataclass
class ModuleFacts:
    """What the plot shows of one adapted matrix."""

    name: str
    singular_values: list[float] = field(default_factory=list)
    effective_rank: int | None = None
    rank: int | None = None
    norm: float | None = None
    """‖ΔW‖_F."""
    amplification: float | None = None
    """How much ΔW amplifies directions W0 does not emphasise (needs the base weights)."""
    shape: tuple | None = None


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _pick(d: dict, *keys):
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


def normalise(result: Any) -> dict[str, ModuleFacts]:
    """``{module: ModuleFacts}`` from core.analysis.analyse's result.

    Accepts the per-module mapping either at the top level or under ``"modules"``, each module's
    figures as a dict (or an object with attributes) under the names core.analysis uses.
    """
    if result is None:
        return {}
    modules = result.get("modules", result) if isinstance(result, dict) else result
    if isinstance(modules, list):
        modules = {str(_pick(m, "module", "name")): m for m in modules if isinstance(m, dict)}
    out: dict[str, ModuleFacts] = {}
    if not isinstance(modules, dict):
        return out
    for name, m in modules.items():
        if not isinstance(m, dict):
            m = getattr(m, "__dict__", None) or {}
        sv = _pick(m, "singular_values", "sv", "s", "sigma")
        if sv is None:
            continue
        try:
            values = [float(x) for x in (sv.tolist() if hasattr(sv, "tolist") else sv)]
        except (TypeError, ValueError):
            continue
        er = _pick(m, "effective_rank", "eff_rank", "erank")
        shape = _pick(m, "shape")
        out[str(name)] = ModuleFacts(
            name=str(name), singular_values=values,
            effective_rank=int(er) if _num(er) is not None else None,
            rank=int(_pick(m, "rank", "r")) if _num(_pick(m, "rank", "r")) is not None else None,
            norm=_num(_pick(m, "norm", "frobenius", "fro_norm", "delta_norm")),
            amplification=_num(_pick(m, "amplification", "amplification_factor")),
            shape=tuple(shape) if isinstance(shape, (list, tuple)) else None)
    return out


def _block(name: str) -> str | None:
    """The block index in a module name (``model.layers.3.mlp.up_proj`` → ``3``), or None."""
    return next((p for p in reversed(name.split(".")[:-1]) if p.isdigit()), None)


_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj", "gate_proj", "up_proj", "down_proj",
          "c_fc", "fc1", "fc2"]


def _kind_order(kind: str) -> tuple[int, str]:
    """Attention matrices first, then MLP ones, then the rest (lm_head...) by name."""
    return (_KINDS.index(kind) if kind in _KINDS else len(_KINDS), kind)


def _common_prefix(names: list[str]) -> str:
    """The dotted prefix every name shares (``model.layers.``), cut at a dot."""
    if len(names) < 2:
        return ""
    first, last = min(names), max(names)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[: first[:i].rfind(".") + 1]


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``3.q_proj`` (block index and matrix): axis labels."""
    parts = name.split(".")
    idx = next((p for p in reversed(parts[:-1]) if p.isdigit()), None)
    return f"{idx}.{parts[-1]}" if idx is not None else parts[-1]


class DeltaPlot(QWidget):
    """Singular values of one matrix's ΔW, or every matrix's effective rank, plus a table of figures."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.facts: dict[str, ModuleFacts] = {}
        self.chooser = QComboBox()
        self.chooser.setMinimumContentsLength(28)
        self.chooser.setToolTip("The matrix whose singular values are drawn")
        self.chooser.currentIndexChanged.connect(self._draw)
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.plot = pg.PlotWidget()
        style_plot(self.plot)
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=False)
        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(["matrix", "effective rank", "rank", "‖ΔW‖", "amplification"])
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.itemSelectionChanged.connect(self._table_pick)
        self.message = QLabel("", alignment=Qt.AlignmentFlag.AlignCenter)
        self.message.setWordWrap(True)
        self.message.setStyleSheet("color: palette(placeholder-text);")

        top = QHBoxLayout()
        top.addWidget(QLabel("Matrix"))
        top.addWidget(self.chooser, 1)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.plot)
        split.addWidget(self.table)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(top)
        lay.addWidget(self.summary)
        lay.addWidget(self.message)
        lay.addWidget(split, 1)
        self.set_message("Select an adapter to see what it changed.")

    # -- input ------------------------------------------------------------------------------------
    def set_message(self, text: str) -> None:
        """Show a line instead of figures (while computing, or when there is nothing to show)."""
        self.facts = {}
        self.chooser.blockSignals(True)
        self.chooser.clear()
        self.chooser.blockSignals(False)
        self.chooser.setEnabled(False)
        self.plot.clear()
        self.table.setRowCount(0)
        self.summary.setText("")
        self.message.setText(text)
        self.message.setVisible(bool(text))

    def set_analysis(self, result: Any, *, energy: float = 0.9) -> None:
        """Show core.analysis's result (see :func:`normalise`)."""
        self.facts = normalise(result)
        if isinstance(result, dict) and _num(result.get("energy")) is not None:
            energy = float(result["energy"])
        if not self.facts:
            self.set_message("No matrices to analyse in this adapter.")
            return
        self.message.hide()
        self.energy = energy
        self.chooser.blockSignals(True)
        self.chooser.clear()
        self.chooser.addItem(ALL, None)
        for name in self.facts:
            self.chooser.addItem(name, name)
        self.chooser.setEnabled(True)
        self.chooser.blockSignals(False)
        self._fill_table()
        ranks = [f.effective_rank for f in self.facts.values() if f.effective_rank is not None]
        full = [f.rank for f in self.facts.values() if f.rank]
        amps = [f.amplification for f in self.facts.values() if f.amplification is not None]
        parts = [f"{len(self.facts)} matrices"]
        if ranks:
            parts.append(f"effective rank {min(ranks)}–{max(ranks)} (mean {np.mean(ranks):.1f}"
                         + (f" of r = {max(full)}" if full else "") + f", {int(round(100 * energy))}% of the energy)")
        if amps:
            parts.append(f"amplification {np.median(amps):.1f}× (median)")
        elif result is not None:
            parts.append("amplification needs the base model loaded")
        self.summary.setText(" · ".join(parts))
        self.chooser.setCurrentIndex(0)
        self._draw()

    def choose(self, module: str | None) -> None:
        """Draw ``module``'s singular values (None: the effective ranks of all matrices)."""
        i = self.chooser.findData(module) if module else 0
        if i >= 0:
            self.chooser.setCurrentIndex(i)

    # -- drawing ----------------------------------------------------------------------------------
    def _fill_table(self) -> None:
        self.table.blockSignals(True)
        self.table.setRowCount(len(self.facts))
        prefix = _common_prefix(list(self.facts))
        for row, f in enumerate(self.facts.values()):
            cells = [f.name[len(prefix):], "–" if f.effective_rank is None else str(f.effective_rank),
                     "–" if f.rank is None else str(f.rank),
                     "–" if f.norm is None else f"{f.norm:.4g}",
                     "–" if f.amplification is None else f"{f.amplification:.2f}×"]
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if col == 0:
                    item.setData(Qt.ItemDataRole.UserRole, f.name)
                    item.setToolTip(f.name)
                if col:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(row, col, item)
        self.table.resizeColumnsToContents()
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.blockSignals(False)

    def _table_pick(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self.choose(self.table.item(rows[0].row(), 0).data(Qt.ItemDataRole.UserRole))

    def _draw_by_block(self, names: list[str], c: dict) -> None:
        """Many matrices (a deep model, all-linear): one line per kind of matrix across the blocks,
        where 200 bars side by side would be unreadable."""
        series: dict[str, list[tuple[int, int]]] = {}
        for n in names:
            b, f = _block(n), self.facts[n]
            if b is not None and f.effective_rank is not None:
                series.setdefault(n.rsplit(".", 1)[-1], []).append((int(b), f.effective_rank))
        kinds = sorted(series, key=_kind_order)
        palette = list(c["series"]) + [QColor("#7F7F7F"), QColor("#8C564B"), QColor("#BCBD22")]
        legend = self.plot.addLegend(offset=(10, 2), labelTextColor=c["foreground"], colCount=min(len(kinds), 3))
        top = 1
        for i, k in enumerate(kinds):
            pts = sorted(series[k])
            color = QColor(palette[i % len(palette)])
            self.plot.plot([p[0] for p in pts], [p[1] for p in pts], pen=pg.mkPen(color, width=2), symbol="o",
                           symbolSize=5, symbolBrush=color, symbolPen=pg.mkPen(None), name=k)
            top = max([top] + [p[1] for p in pts])
        full = [f.rank for f in self.facts.values() if f.rank]
        if full:
            self.plot.addItem(pg.InfiniteLine(pos=max(full), angle=0,
                                              pen=pg.mkPen(c["muted"], style=Qt.PenStyle.DashLine),
                                              label=f"r = {max(full)}",
                                              labelOpts={"color": c["foreground"], "position": 0.95}))
            top = max(top, max(full))
        self.plot.getAxis("bottom").setTicks(None)
        self.plot.setLabel("bottom", "block")
        self.plot.setLabel("left", "effective rank")
        self.plot.enableAutoRange()
        self.plot.setYRange(0, top * (1.15 + 0.12 * -(-len(kinds) // 3)), padding=0)
        del legend

    def _draw(self, *_) -> None:
        self.plot.clear()
        legend = self.plot.getPlotItem().legend
        if legend is not None:
            legend.scene().removeItem(legend) if legend.scene() else None
            self.plot.getPlotItem().legend = None
        if not self.facts:
            return
        c = palette_colors()
        accent = QColor(c["series"][0])
        module = self.chooser.currentData()
        if module is None:
            names = list(self.facts)
            ranks = [self.facts[n].effective_rank or 0 for n in names]
            if len(names) > 40 and sum(_block(n) is not None for n in names) > len(names) // 2:
                self._draw_by_block(names, c)
                return
            x = np.arange(len(names))
            # one colour per kind of matrix (q_proj, up_proj, ...), so a glance shows where rank went
            kinds = sorted(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names), key=_kind_order)
            palette = list(c["series"]) + [QColor("#7F7F7F"), QColor("#8C564B"), QColor("#BCBD22")]
            colors = {k: QColor(palette[i % len(palette)]) for i, k in enumerate(kinds)}
            brushes = [colors[n.rsplit(".", 1)[-1]] for n in names]
            self.plot.addItem(pg.BarGraphItem(x=x, height=ranks, width=0.8, brushes=brushes, pen=pg.mkPen(None)))
            if len(kinds) > 1:  # one row above the bars (the y range leaves room for it)
                legend = self.plot.addLegend(offset=(10, 2), labelTextColor=c["foreground"],
                                             colCount=min(len(kinds), 3))
                for k in kinds:
                    legend.addItem(pg.ScatterPlotItem(symbol="s", size=10, brush=colors[k], pen=pg.mkPen(None)), k)
            full = [self.facts[n].rank for n in names if self.facts[n].rank]
            top = max(ranks + full + [1])
            rows_of_legend = 0 if len(kinds) <= 1 else -(-len(kinds) // 3)
            if full:
                line = pg.InfiniteLine(pos=max(full), angle=0, pen=pg.mkPen(c["muted"], style=Qt.PenStyle.DashLine),
                                       label=f"r = {max(full)}", labelOpts={"color": c["foreground"], "position": 0.95})
                self.plot.addItem(line)
            blocks = [_block(n) for n in names]
            if len(names) <= 8 or not any(b is not None for b in blocks):
                step = max(1, len(names) // 8)
                ticks = [(i, _short(names[i])) for i in range(0, len(names), step)]
                self.plot.setLabel("bottom", "matrix")
            else:  # many matrices: mark where each block starts, at most ~12 labels
                starts = [i for i, b in enumerate(blocks) if b is not None and (i == 0 or blocks[i - 1] != b)]
                step = max(1, -(-len(starts) // 12))
                ticks = [(i - 0.5, blocks[i]) for i in starts[::step]]
                self.plot.setLabel("bottom", "block")
            self.plot.getAxis("bottom").setTicks([ticks])
            self.plot.setLabel("left", "effective rank")
            self.plot.enableAutoRange()
            self.plot.setYRange(0, top * (1.15 + 0.12 * rows_of_legend), padding=0)
            return
        f = self.facts[module]
        sv = np.asarray(f.singular_values, dtype=np.float64)
        x = np.arange(1, len(sv) + 1)
        er = f.effective_rank or 0
        brushes = [accent if i <= er else QColor(c["muted"]) for i in x]
        self.plot.addItem(pg.BarGraphItem(x=x, height=sv, width=0.7, brushes=brushes, pen=pg.mkPen(None)))
        if er:
            self.plot.addItem(pg.InfiniteLine(pos=er + 0.5, angle=90,
                                              pen=pg.mkPen(c["foreground"], style=Qt.PenStyle.DashLine),
                                              label=f"effective rank {er}",
                                              labelOpts={"color": c["foreground"], "position": 0.9}))
        step = max(1, len(sv) // 16)  # integer ticks: an index between two values means nothing
        self.plot.getAxis("bottom").setTicks([[(int(i), str(int(i))) for i in x[::step]]])
        self.plot.setLabel("bottom", "singular value index")
        self.plot.setLabel("left", "σ")
        self.plot.enableAutoRange()
