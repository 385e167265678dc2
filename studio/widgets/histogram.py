"""The token-length histogram of the Data page: bars from ``core.data.token_stats``' histogram
(edges and counts), a line at the maximum length, the bars beyond it (truncated) in a warning
colour."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QVBoxLayout, QWidget

from studio.widgets import palette_colors, style_plot


class LengthHistogram(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.plot = pg.PlotWidget()
        style_plot(self.plot)
        pi = self.plot.getPlotItem()
        pi.setLabel("bottom", "tokens per example")
        pi.setLabel("left", "examples")
        pi.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=False)
        self.bars: pg.BarGraphItem | None = None
        self.over: pg.BarGraphItem | None = None
        c = palette_colors()
        self.limit_line = pg.InfiniteLine(angle=90, movable=False,
                                          pen=pg.mkPen(QColor("#D55E00"), width=1.5,
                                                       style=pg.QtCore.Qt.PenStyle.DashLine),
                                          label="max length", labelOpts={"color": c["foreground"],
                                                                         "position": 0.92})
        pi.addItem(self.limit_line)
        self.limit_line.hide()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.plot)

    def set_histogram(self, edges, counts, max_length: int | None = None) -> None:
        """``edges``: n+1 bin edges; ``counts``: n counts. Bins starting beyond ``max_length`` are
        drawn in the warning colour."""
        pi = self.plot.getPlotItem()
        for item in (self.bars, self.over):
            if item is not None:
                pi.removeItem(item)
        self.bars = self.over = None
        edges = np.asarray(edges, dtype=float)
        counts = np.asarray(counts, dtype=float)
        if len(counts) == 0 or len(edges) != len(counts) + 1:
            self.limit_line.hide()
            return
        c = palette_colors()
        left, width = edges[:-1], np.diff(edges)
        beyond = left >= max_length if max_length else np.zeros(len(left), bool)
        accent = QColor(c["series"][0])
        warn = QColor("#D55E00")
        for mask, color, attr in ((~beyond, accent, "bars"), (beyond, warn, "over")):
            if mask.any():
                item = pg.BarGraphItem(x0=left[mask], width=width[mask] * 0.92, height=counts[mask],
                                       brush=color, pen=pg.mkPen(None))
                pi.addItem(item)
                setattr(self, attr, item)
        if max_length:
            self.limit_line.setValue(max_length)
            self.limit_line.show()
        else:
            self.limit_line.hide()
        pi.enableAutoRange()

    def clear(self) -> None:
        self.set_histogram([], [])
