"""The live loss plot: training loss raw (faint) and smoothed, validation loss as points; below it,
small and secondary, the learning rate on its own 0-based axis. Both count whole steps.

Shaped like pyqtgraph's ``examples/scrollingPlots.py``: the curves are created once; each event
only appends to growing numpy buffers (:meth:`LossPlot.add_step`, cheap enough for hundreds of
events a second) and a ~10 Hz timer calls ``setData`` when something changed. Downsampling
('peak') and clip-to-view keep a 100 000-step curve as fast as a 100-step one.
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QTimer
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QVBoxLayout, QWidget

from studio.widgets import palette_colors, style_plot


class _Buffer:
    """A growing column of floats: amortised O(1) append, a view of the filled part."""

    def __init__(self, capacity: int = 1024):
        self._a = np.empty(capacity, dtype=np.float64)
        self.n = 0

    def append(self, v: float) -> None:
        if self.n == len(self._a):
            grown = np.empty(2 * len(self._a), dtype=np.float64)
            grown[: self.n] = self._a[: self.n]
            self._a = grown
        self._a[self.n] = v
        self.n += 1

    def view(self) -> np.ndarray:
        return self._a[: self.n]

    def clear(self) -> None:
        self.n = 0


class StepAxis(pg.AxisItem):
    """A step axis: ticks on whole steps only (a step 1.5 means nothing)."""

    def tickSpacing(self, minVal, maxVal, size):  # noqa: N802 - pyqtgraph's name
        levels = [(float(max(1, round(sp))), off) for sp, off in super().tickSpacing(minVal, maxVal, size)
                  if sp >= 1]
        return levels or [(1.0, 0.0)]

    def tickStrings(self, values, scale, spacing):  # noqa: N802
        return [str(int(round(v))) for v in values]


def format_rate(v: float) -> str:
    """A learning rate as people write it: 0, 2e-4, 1.5e-4."""
    return "0" if abs(v) < 1e-12 else np.format_float_scientific(v, precision=2, trim="-", exp_digits=1)


MIN_STEPS_SHOWN = 5
"""The step axis shows at least 0..5, so the first points sit in a sensible view, not at its edges."""


class LossPlot(QWidget):
    """Training loss (raw and EMA-smoothed) and eval loss points above; the learning rate below."""

    REDRAW_MS = 100
    LR_HEIGHT = 96

    def __init__(self, parent: QWidget | None = None, *, smoothing: float = 0.8):
        super().__init__(parent)
        self.smoothing = smoothing
        self.steps, self.losses, self.smooth, self.lrs = _Buffer(), _Buffer(), _Buffer(), _Buffer()
        self.eval_steps, self.eval_losses = _Buffer(64), _Buffer(64)
        self._ema = 0.0
        self._ema_n = 0
        self._dirty = False
        self.redraws = 0
        self.steps_received = 0
        self.peak_lr: float | None = None

        c = palette_colors()
        self.plot = pg.PlotWidget(axisItems={"bottom": StepAxis("bottom")})
        style_plot(self.plot)
        pi = self.plot.getPlotItem()
        pi.setLabel("left", "loss")
        pi.getAxis("bottom").setStyle(showValues=False)  # the steps are read off the plot below
        legend_bg = QColor(c["background"])
        legend_bg.setAlpha(200)
        pi.addLegend(offset=(-10, 10), labelTextColor=c["foreground"], brush=legend_bg)
        pi.setMenuEnabled(False)
        pi.vb.setLimits(xMin=0, minXRange=MIN_STEPS_SHOWN)
        main = c["series"][0]
        faint = QColor(main)
        faint.setAlpha(110)
        self.raw_curve = pi.plot(pen=pg.mkPen(faint, width=1), name="loss")
        self.smooth_curve = pi.plot(pen=pg.mkPen(main, width=2.2), name="loss (smoothed)")
        self.eval_curve = pi.plot(pen=None, symbol="o", symbolSize=8, symbolBrush=c["series"][1],
                                  symbolPen=pg.mkPen(c["background"], width=1), name="validation loss")
        for curve in (self.raw_curve, self.smooth_curve):
            curve.setDownsampling(auto=True, method="peak")
            curve.setClipToView(True)

        # The learning rate: a small plot of its own below, x linked, y from 0 to the peak.
        self.lr_plot = pg.PlotWidget(axisItems={"bottom": StepAxis("bottom")})
        style_plot(self.lr_plot)
        li = self.lr_plot.getPlotItem()
        li.setLabel("bottom", "step")
        li.setLabel("left", "lr")
        li.setMenuEnabled(False)
        li.getAxis("left").enableAutoSIPrefix(False)
        li.getAxis("left").setStyle(hideOverlappingLabels=False)
        li.addLegend(offset=(-10, 2), labelTextColor=c["foreground"], brush=legend_bg)
        li.vb.setMouseEnabled(y=False)
        li.setXLink(pi)
        self.lr_plot.setFixedHeight(self.LR_HEIGHT)
        lr_color = QColor(c["series"][2])
        lr_color.setAlpha(200)
        self.lr_curve = li.plot(pen=pg.mkPen(lr_color, width=1.2), name="learning rate")
        # the two plots' left axes as wide as each other, so their steps line up
        for ax in (pi.getAxis("left"), li.getAxis("left")):
            ax.setWidth(64)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(6)  # a gap: two plots, not one with a stray axis
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.lr_plot)
        self._set_lr_range()

        self.timer = QTimer(self)
        self.timer.setInterval(self.REDRAW_MS)
        self.timer.timeout.connect(self.redraw)
        self.timer.start()

    def set_peak_lr(self, lr: float | None) -> None:
        """The run's peak learning rate: the rate axis goes from 0 to it from the first step on."""
        self.peak_lr = lr if lr and lr > 0 else None
        self._set_lr_range()

    def _set_lr_range(self) -> None:
        lrs = self.lrs.view()
        seen = float(np.nanmax(lrs)) if len(lrs) and np.isfinite(lrs).any() else 0.0
        top = max(self.peak_lr or 0.0, seen) or 1e-3
        li = self.lr_plot.getPlotItem()
        li.vb.setYRange(-0.2 * top, top * 1.3, padding=0)  # 0 above the bottom edge, so its tick shows
        li.getAxis("left").setTicks([[(0.0, "0"), (top, format_rate(top))], []])  # 0 and the peak: enough

    def _frame_first_point(self) -> None:
        """One point: a line needs two, so it is drawn as a dot, in a view of ±20 % around it."""
        one = self.steps.n == 1
        for curve in (self.smooth_curve, self.lr_curve):
            curve.setSymbol("o" if one else None)
            curve.setSymbolSize(6)
        if one:
            v = float(self.losses.view()[0])
            self.plot.getPlotItem().vb.setYRange(0.8 * v, 1.2 * v if v > 0 else 1.0)
        elif self.steps.n > 1:
            self.plot.getPlotItem().vb.enableAutoRange(y=True)

    # -- data in ----------------------------------------------------------------------------------
    def add_step(self, step: int, loss: float | None, lr: float | None = None) -> None:
        """Append one optimizer step (no drawing here; the timer draws)."""
        self.steps_received += 1
        if loss is None or not math.isfinite(loss):
            return
        self.steps.append(step)
        self.losses.append(loss)
        # TensorBoard's debiased EMA: the first points are not pulled towards zero.
        self._ema = self.smoothing * self._ema + (1 - self.smoothing) * loss
        self._ema_n += 1
        self.smooth.append(self._ema / (1 - self.smoothing ** self._ema_n))
        self.lrs.append(lr if lr is not None else np.nan)
        self._dirty = True

    def add_eval(self, step: int, loss: float) -> None:
        if loss is None or not math.isfinite(loss):
            return
        self.eval_steps.append(step)
        self.eval_losses.append(loss)
        self._dirty = True

    def set_history(self, rows: list[dict]) -> None:
        """Replace the curves with a run's metrics rows (``metrics.jsonl``: step, loss, lr, eval_loss)."""
        self.clear()
        for r in rows:
            if r.get("loss") is not None:
                self.add_step(int(r.get("step", 0)), float(r["loss"]), r.get("lr"))
            if r.get("eval_loss") is not None:
                self.add_eval(int(r.get("step", 0)), float(r["eval_loss"]))
        self.steps_received = 0
        self.redraw()

    def clear(self) -> None:
        for b in (self.steps, self.losses, self.smooth, self.lrs, self.eval_steps, self.eval_losses):
            b.clear()
        self._ema, self._ema_n, self.steps_received = 0.0, 0, 0
        self._dirty = True
        self.redraw()

    # -- drawing ----------------------------------------------------------------------------------
    def redraw(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        self.redraws += 1
        x = self.steps.view()
        self.raw_curve.setData(x, self.losses.view())
        self.smooth_curve.setData(x, self.smooth.view())
        self.eval_curve.setData(self.eval_steps.view(), self.eval_losses.view())
        lrs = self.lrs.view()
        if len(lrs) and np.isfinite(lrs).any():
            self.lr_curve.setData(x, lrs)
        else:
            self.lr_curve.setData([], [])
        self._set_lr_range()
        self._frame_first_point()

    def last_smoothed(self) -> float | None:
        return float(self.smooth.view()[-1]) if self.smooth.n else None
