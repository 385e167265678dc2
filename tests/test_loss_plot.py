"""The live loss plot (issue 18, item 7): the learning rate is secondary (its own small plot below,
0-based, up to the run's peak), steps are whole numbers, and the first point sits in a sensible view."""

from __future__ import annotations

import pytest

import pytestqt  # noqa: F401  (a missing module fails, never skips)


@pytest.fixture
def plot(qtbot):
    from studio.widgets.loss_plot import LossPlot

    p = LossPlot()
    qtbot.addWidget(p)
    p.resize(800, 450)
    p.show()
    qtbot.waitExposed(p)
    return p


def test_first_point_is_in_view_and_the_rate_axis_starts_at_zero(plot, qtbot):
    plot.set_peak_lr(2e-4)
    plot.add_step(1, 2.93, 2e-5)
    plot.redraw()
    (x0, x1), (y0, y1) = plot.plot.getPlotItem().vb.viewRange()
    assert 0 <= x0 < 1 < x1 and x1 - x0 >= 5  # a few steps wide, never negative steps
    assert y0 < 2.93 < y1 and (y1 - y0) < 2  # around the point, not an empty unit range
    assert plot.smooth_curve.opts["symbol"] == "o"  # one point is drawn as a dot (a line needs two)
    (lx0, lx1), (ly0, ly1) = plot.lr_plot.getPlotItem().vb.viewRange()
    assert (lx0, lx1) == pytest.approx((x0, x1))  # the same steps as the loss above
    assert -1e-4 < ly0 <= 0 and 2e-4 < ly1 < 4e-4  # 0-based, up to the peak: not -400 .. 500
    ticks = plot.lr_plot.getPlotItem().getAxis("left")._tickLevels
    assert [t[1] for t in ticks[0]] == ["0", "2e-4"]
    plot.add_step(2, 2.5, 4e-5)
    plot.redraw()
    assert plot.smooth_curve.opts["symbol"] is None
    plot.grab().save("/tmp/loss-plot-first-steps.png")


def test_the_learning_rate_is_a_small_plot_below_the_loss(plot):
    assert plot.lr_plot.height() <= plot.LR_HEIGHT < plot.plot.height() / 2
    assert plot.lr_plot.geometry().top() >= plot.plot.geometry().bottom()
    assert plot.lr_curve not in plot.plot.getPlotItem().listDataItems()


def test_step_ticks_are_whole_numbers(plot):
    plot.add_step(1, 2.0, 1e-4)
    plot.add_step(2, 1.9, 1e-4)
    plot.redraw()
    for pw in (plot.plot, plot.lr_plot):
        axis = pw.getPlotItem().getAxis("bottom")
        for lo, hi in ((0, 2), (0, 5), (0.3, 3.7), (0, 1234)):
            levels = axis.tickValues(lo, hi, 600)
            values = [v for _, vs in levels for v in vs]
            assert values and all(float(v).is_integer() for v in values), (lo, hi, levels)
    assert plot.plot.getPlotItem().getAxis("bottom").tickStrings([1.0, 2.0], 1, 1) == ["1", "2"]
