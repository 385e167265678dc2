"""One training example as the model sees it: the rendered text with the trained tokens highlighted
(the loss is computed on them) and special tokens such as the end-of-turn marker made visible.

Input is ``core.data.render_marked``'s list of ``(text, trained)`` pieces; this widget only draws.
"""

from __future__ import annotations

import html
import re

from PySide6.QtGui import QColor, QFontDatabase
from PySide6.QtWidgets import QApplication, QLabel, QTextBrowser, QVBoxLayout, QWidget

_SPECIAL = re.compile(r"(<\|[^|<>]{1,40}\|>|</s>|<s>|<eos>|<bos>|<pad>|\[EOS\]|<\|endoftext\|>)")


def _dark() -> bool:
    return QApplication.palette().base().color().lightness() < 128


def render_html(pieces: list[tuple[str, bool]]) -> str:
    """HTML for the pieces: trained text on a tinted background, special tokens as small badges,
    newlines kept (and shown as ↵ where they are trained, so a trained newline is visible)."""
    dark = _dark()
    trained_bg = "#1f4d3a" if dark else "#d5f2e3"
    trained_fg = "#d8f7e6" if dark else "#0b3d26"
    special_bg = "#6b4a12" if dark else "#fde7b0"
    special_fg = "#ffe6b3" if dark else "#6b4100"
    out = []
    for text, trained in pieces:
        for part in _SPECIAL.split(text):
            if not part:
                continue
            if _SPECIAL.fullmatch(part):
                border = "border: 1px solid #D55E00;" if trained else ""
                out.append(f'<span style="background:{special_bg}; color:{special_fg}; {border}'
                           f' font-size: small; white-space: nowrap;">&nbsp;{html.escape(part)}&nbsp;</span>')
                continue
            esc = html.escape(part)
            if trained:
                esc = esc.replace("\n", '<span style="opacity:0.6">↵</span>\n')
                out.append(f'<span style="background:{trained_bg}; color:{trained_fg};">{esc}</span>')
            else:
                out.append(esc)
    body = "".join(out)
    return f'<pre style="white-space: pre-wrap; margin: 0;">{body}</pre>'


class ExampleView(QWidget):
    """A read-only rendering of one example with a legend."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.browser = QTextBrowser()
        self.browser.setOpenLinks(False)
        self.browser.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        dark = _dark()
        bg = QColor("#1f4d3a" if dark else "#d5f2e3").name()
        sp = QColor("#6b4a12" if dark else "#fde7b0").name()
        self.legend = QLabel(
            f'<span style="background:{bg}">&nbsp;trained tokens (loss)&nbsp;</span> &nbsp; '
            f'<span style="background:{sp}">&nbsp;special token&nbsp;</span> &nbsp; '
            "plain: context only")
        self.legend.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.browser, 1)
        lay.addWidget(self.legend)
        self.pieces: list[tuple[str, bool]] = []

    def set_pieces(self, pieces: list[tuple[str, bool]]) -> None:
        self.pieces = list(pieces)
        self.browser.setHtml(render_html(self.pieces))

    def set_message(self, text: str) -> None:
        self.pieces = []
        self.browser.setPlainText(text)

    def trained_text(self) -> str:
        return "".join(t for t, trained in self.pieces if trained)
