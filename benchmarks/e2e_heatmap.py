"""Draw the E2E study's heatmap for the README from the study's JSON (``benchmarks/e2e_study.py``).

One PNG with two panels: held-out BLEU by rank × target set (Table 6 of the paper) and BLEU of each
target set at the fixed parameter budget (Table 5), with the base model and full fine-tuning as the
reference lines. Green is better; every cell prints its value, so the picture never says more than
the numbers. Drawn with Qt's painter (no plotting library needed), offscreen:

    QT_QPA_PLATFORM=offscreen .venv/bin/python benchmarks/e2e_heatmap.py \
        benchmarks/results/e2e_study-cpu.json resources/e2e-study-heatmap.png
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CELL_W, CELL_H, LEFT, TOP, GAP = 112, 40, 150, 84, 50


def _panel(cells: list[dict]) -> tuple[list, list, dict]:
    ranks = sorted({c["rank"] for c in cells if c["status"] == "finished"})
    targets = list(dict.fromkeys(c["targets"] for c in cells if c["status"] == "finished"))
    values = {(c["rank"], c["targets"]): c["metrics"].get("bleu") for c in cells if c["status"] == "finished"}
    return ranks, targets, values


def _colour(v: float, lo: float, hi: float):
    from PySide6.QtGui import QColor

    t = 0.5 if hi <= lo else (v - lo) / (hi - lo)
    return QColor(int(250 - 90 * t), int(190 + 60 * t), int(190 - 20 * t))


def draw(summary: dict, out: Path) -> None:
    from PySide6.QtCore import QRectF, Qt
    from PySide6.QtGui import QColor, QFont, QGuiApplication, QImage, QPainter

    app = QGuiApplication.instance() or QGuiApplication([])  # noqa: F841 (fonts need an application)
    r6, t6, v6 = _panel(summary["table6"]["cells"])
    cells5 = [c for c in summary.get("table5", {}).get("cells", []) if c["status"] == "finished"]
    every = [v for v in v6.values() if v is not None] + [c["metrics"]["bleu"] for c in cells5]
    lo, hi = min(every), max(every)
    cols = max(len(t6), len(cells5))
    width = LEFT + CELL_W * cols + 30
    height = TOP + CELL_H * (len(r6) + 1) + GAP + CELL_H * 2 + 16
    img = QImage(width, height, QImage.Format.Format_ARGB32)
    img.fill(QColor("white"))
    p = QPainter(img)
    p.setRenderHint(QPainter.RenderHint.Antialiasing)
    title, small, bold = QFont(), QFont(), QFont()
    title.setPointSize(12), title.setBold(True), small.setPointSize(9), bold.setPointSize(10), bold.setBold(True)

    def cell(x, y, text, fill=None):
        r = QRectF(x, y, CELL_W - 4, CELL_H - 4)
        if fill is not None:
            p.fillRect(r, fill)
        p.drawText(r, Qt.AlignmentFlag.AlignCenter, text)

    p.setFont(title)
    p.drawText(10, 24, f"Held-out BLEU on E2E NLG ({summary['held_out_mrs']} unseen MRs), SmolLM2-135M, "
                       f"{summary['settings']['steps']} steps each")
    p.setFont(small)
    full = summary.get("full", {}).get("bleu")
    p.drawText(10, 46, f"base model {summary['base']['bleu']:.1f}"
                       + ("" if full is None else f"  ·  full fine-tuning {full:.1f}")
                       + "  ·  greener is higher")
    p.setFont(bold)
    p.drawText(10, TOP - 8, "Table 6: rank × target set")
    for j, t in enumerate(t6):
        cell(LEFT + j * CELL_W, TOP, t)
    for i, r in enumerate(r6):
        y = TOP + CELL_H * (i + 1)
        p.setFont(bold)
        cell(LEFT - CELL_W, y, f"r = {r}")
        p.setFont(small)
        for j, t in enumerate(t6):
            v = v6.get((r, t))
            cell(LEFT + j * CELL_W, y, "–" if v is None else f"{v:.1f}",
                 None if v is None else _colour(v, lo, hi))
    y0 = TOP + CELL_H * (len(r6) + 1) + GAP
    p.setFont(bold)
    p.drawText(10, y0 - 8, f"Table 5: the same {summary['budget']:,} trainable parameters over more matrices")
    for j, c in enumerate(cells5):
        cell(LEFT + j * CELL_W, y0, c["targets"])
        p.setFont(small)
        cell(LEFT + j * CELL_W, y0 + CELL_H, f"{c['metrics']['bleu']:.1f}  (r={c['rank']})",
             _colour(c["metrics"]["bleu"], lo, hi))
        p.setFont(bold)
    cell(LEFT - CELL_W, y0 + CELL_H, "BLEU")
    p.end()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not img.save(str(out)):
        raise SystemExit(f"could not write {out}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: e2e_heatmap.py STUDY.json OUT.png")
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    draw(json.loads(Path(argv[0]).read_text(encoding="utf-8")), Path(argv[1]))
    print(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
