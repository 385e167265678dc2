"""Finished loss curves: one adapter's training and validation loss (Library), or several runs
overlaid with a legend (Compare runs).

Unlike the live :class:`studio.widgets.loss_plot.LossPlot`, these curves are complete when shown, so
they are set in one ``setData`` each. Each series keeps its colour from the palette's qualitative
list; training loss is drawn as a line (with a faint raw line under a smoothed one when it is
noisy), validation loss as points on the same axes.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from studio.widgets import palette_colors, style_plot


def smooth(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing): the first points
    are not dragged towards zero."""
    out = np.empty_like(values, dtype=np.float64)
    ema = 0.0
    for i, v in enumerate(values):
        ema = weight * ema + (1 - weight) * float(v)
        out[i] = ema / (1 - weight ** (i + 1))
    return out


def _xy(points: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """``[[step, value], ...]`` → two float arrays, non-finite values dropped."""
    if not points:
        return np.zeros(0), np.zeros(0)
    a = np.asarray([(float(p[0]), float(p[1])) for p in points], dtype=np.float64)
    keep = np.isfinite(a).all(axis=1)
    return a[keep, 0], a[keep, 1]


class CurvesPlot(QWidget):
    """Loss against step for one or more named series, with a legend when there are several."""

    def __init__(self, parent: QWidget | None = None, *, title: str = "", smoothing: float = 0.8):
        super().__init__(parent)
        self.smoothing = smoothing
        self.plot = pg.PlotWidget()
        style_plot(self.plot)
        self.plot.setLabel("bottom", "step")
        self.plot.setLabel("left", "loss")
        self.plot.setMenuEnabled(False)
        if title:
            self.plot.setTitle(title)
        self.legend = self.plot.addLegend(offset=(-10, 10), labelTextColor=palette_colors()["foreground"])
        self.empty = QLabel("", alignment=Qt.AlignmentFlag.AlignCenter)
        self.empty.setStyleSheet("color: palette(placeholder-text);")
        self.empty.setWordWrap(True)  # a long message wraps; unwrapped it widened the whole window
        self.empty.hide()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.empty)
        self.series: dict[str, dict] = {}

    def clear(self, message: str = "") -> None:
        self.plot.clear()
        self.legend.clear()
        self.series = {}
        self.empty.setText(message)
        self.empty.setVisible(bool(message))

    def set_series(self, series: Sequence[tuple[str, Sequence, Sequence]], *, message_if_empty: str = "no loss recorded") -> None:
        """Show ``(name, loss_points, eval_points)`` per series; points are ``[[step, value], ...]``."""
        self.clear()
        colors = palette_colors()["series"]
        shown = 0
        any_eval = False
        for i, (name, loss, evals) in enumerate(series):
            color = QColor(colors[i % len(colors)])
            x, y = _xy(loss)
            ex, ey = _xy(evals)
            entry = {"x": x, "y": y, "eval_x": ex, "eval_y": ey, "color": color.name()}
            if len(x):
                noisy = len(y) > 20 and self.smoothing > 0
                if noisy:
                    faint = QColor(color)
                    faint.setAlpha(60)
                    self.plot.plot(x, y, pen=pg.mkPen(faint, width=1))
                    # longer curves take more smoothing: the trend, not the batch-to-batch noise
                    weight = min(0.95, max(self.smoothing, 1 - 20 / len(y)))
                    y_line = smooth(y, weight)
                else:
                    y_line = y
                curve = self.plot.plot(x, y_line, pen=pg.mkPen(color, width=2),
                                       name=name if len(series) > 1 else "training loss")
                if len(x) > 5000:  # peak downsampling draws min/max pairs: only worth it when huge
                    curve.setDownsampling(auto=True, method="peak")
                curve.setClipToView(True)
                entry["curve"] = curve
                shown += 1
            if len(ex):
                # several runs: the dots share their run's colour, one legend line per run is enough
                label = None if len(series) > 1 else "validation loss"
                self.plot.plot(ex, ey, pen=None, symbol="o", symbolSize=7, symbolBrush=color,
                               symbolPen=pg.mkPen(palette_colors()["background"]), name=label)
                shown += 1
                any_eval = True
            self.series[name] = entry
        self.legend.setVisible(shown > 1 or len(series) > 1)
        if len(series) > 1 and any_eval:
            self.plot.setLabel("bottom", "step   (lines: training loss, smoothed; dots: validation loss)")
        else:
            self.plot.setLabel("bottom", "step")
        if not shown:
            self.empty.setText(message_if_empty)
            self.empty.show()
        self.plot.enableAutoRange()

    def final_losses(self) -> dict[str, float]:
        """The last training loss of each series (NaN when it has none): what a test or tooltip reads."""
        return {n: (float(s["y"][-1]) if len(s["y"]) else math.nan) for n, s in self.series.items()}
