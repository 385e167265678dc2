"""Reusable pieces of the window: the live loss plot, the histogram, the rendered example, the ΔW
plot; and how plots take their colours from the system palette.

pyqtgraph is imported by the widget modules, not here, so that importing a page does not pay for it
before it needs a plot.
"""

from __future__ import annotations

from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication


def palette_colors() -> dict[str, QColor]:
    """Colours for plots from the application's palette, so they follow light and dark themes.

    Keys: background, foreground, grid, accent (the selection colour), muted, and a qualitative
    ``series`` list for several curves.
    """
    pal = QApplication.palette()
    bg = pal.color(QPalette.ColorRole.Base)
    fg = pal.color(QPalette.ColorRole.Text)
    dark = bg.lightness() < 128
    accent = pal.color(QPalette.ColorRole.Highlight)
    muted = QColor(fg)
    muted.setAlpha(90)
    grid = QColor(fg)
    grid.setAlpha(40)
    # A palette that stays readable on both backgrounds (Okabe-Ito, lightened in the dark).
    series = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442"]
    if dark:
        series = ["#4EA5E6", "#F5B841", "#3CC29A", "#E39BC6", "#F07F3C", "#8FD0F5", "#F4EB7A"]
    return {"background": bg, "foreground": fg, "grid": grid, "accent": accent, "muted": muted,
            "series": [QColor(c) for c in series], "dark": dark}


def style_plot(plot_item) -> None:
    """Give a pyqtgraph PlotItem (or PlotWidget) the palette's colours and a light grid."""
    c = palette_colors()
    widget = plot_item
    if hasattr(plot_item, "getPlotItem"):
        widget.setBackground(c["background"])
        plot_item = plot_item.getPlotItem()
    for name in ("left", "bottom", "right"):
        ax = plot_item.getAxis(name)
        ax.setPen(c["muted"])
        ax.setTextPen(c["foreground"])
    plot_item.showGrid(x=True, y=True, alpha=0.08)
    # The grid comes from the left and bottom axes only: a second axis on the right (the learning
    # rate's) would draw its own horizontal lines, out of step with the left ones, and double the
    # cost of every repaint (measured: 18 -> 9 ms per loss plot repaint on the 2-core machine).
    plot_item.getAxis("right").setGrid(False)
    plot_item.getAxis("top").setGrid(False)
    for name in ("left", "bottom"):  # major and minor grid lines; the finest level only adds clutter and paint time
        plot_item.getAxis(name).setStyle(maxTickLevel=1)


def format_bytes(n: float | int | None) -> str:
    """1536 → '1.5 KiB'; None → '–'."""
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_count(n: int | None) -> str:
    """134515008 → '134.5 M'."""
    if n is None:
        return "–"
    for div, unit in ((1e9, " B"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def format_duration(seconds: float | None) -> str:
    """75 → '1:15'; 3725 → '1:02:05'."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "–"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
