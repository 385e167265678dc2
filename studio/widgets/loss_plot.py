"""The live loss plot: training loss raw (faint) and smoothed, validation loss as points, the
learning rate on a second axis.

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


class LossPlot(QWidget):
    """Training loss (raw and EMA-smoothed), eval loss points, learning rate on the right axis."""

    REDRAW_MS = 100

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

        c = palette_colors()
        self.plot = pg.PlotWidget()
        style_plot(self.plot)
        pi = self.plot.getPlotItem()
        pi.setLabel("bottom", "step")
        pi.setLabel("left", "loss")
        legend_bg = QColor(c["background"])
        legend_bg.setAlpha(200)
        pi.addLegend(offset=(-10, 10), labelTextColor=c["foreground"], brush=legend_bg)
        pi.setMenuEnabled(False)
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

        # The learning rate lives in its own ViewBox on the right axis, x linked to the main one.
        self.lr_view = pg.ViewBox()
        pi.showAxis("right")
        pi.scene().addItem(self.lr_view)
        pi.getAxis("right").linkToView(self.lr_view)
        pi.getAxis("right").setLabel("learning rate")
        self.lr_view.setXLink(pi)
        lr_color = QColor(c["series"][2])
        lr_color.setAlpha(170)
        self.lr_curve = pg.PlotDataItem(pen=pg.mkPen(lr_color, width=1.2, style=pg.QtCore.Qt.PenStyle.DashLine))
        self.lr_view.addItem(self.lr_curve)
        pi.legend.addItem(self.lr_curve, "learning rate")
        pi.vb.sigResized.connect(self._sync_views)
        self._sync_views()

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.plot)

        self.timer = QTimer(self)
        self.timer.setInterval(self.REDRAW_MS)
        self.timer.timeout.connect(self.redraw)
        self.timer.start()

    def _sync_views(self) -> None:
        self.lr_view.setGeometry(self.plot.getPlotItem().vb.sceneBoundingRect())
        self.lr_view.linkedViewChanged(self.plot.getPlotItem().vb, self.lr_view.XAxis)

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
        self._sync_views()

    def last_smoothed(self) -> float | None:
        return float(self.smooth.view()[-1]) if self.smooth.n else None
