"""The Playground's answer pane: what answers (the base model, an adapter on the model, or one of
the library's), the answer as it streams, and a line of statistics; and the library's entries it offers."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QFontDatabase, QTextCursor
from PySide6.QtWidgets import QComboBox, QFrame, QHBoxLayout, QLabel, QPlainTextEdit, QVBoxLayout, QWidget

BASE = "Base model (no adapter)"


def library_entries() -> list:
    """The library's entries, newest first (empty when the library cannot be read)."""
    try:
        from core.library import Library

        return Library().entries()
    except Exception:  # noqa: BLE001 - the playground still works with what is on the model
        return []


class AnswerPane(QFrame):
    """One side: what answers (a combo), the streamed answer, and a line of statistics."""

    def __init__(self, title: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.title = QLabel(f"<b>{title}</b>")
        self.choice = QComboBox()
        self.choice.setMinimumWidth(200)
        self.choice.setToolTip("What answers: the base model alone, or the base model with one of its adapters")
        self.user_pick: str | None = None  # what the user chose (an adapter name, or BASE)
        self.choice.activated.connect(self._picked)
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.text.setPlaceholderText("The answer appears here as it is generated.")
        font = QFontDatabase.systemFont(QFontDatabase.SystemFont.GeneralFont)
        font.setPointSizeF(font.pointSizeF() + 1)
        self.text.setFont(font)
        self.stats = QLabel(" ")
        self.stats.setStyleSheet("color: palette(placeholder-text);")
        top = QHBoxLayout()
        top.addWidget(self.title)
        top.addWidget(self.choice, 1)  # the whole width: library names can be long
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.text, 1)
        lay.addWidget(self.stats)

    def set_choices(self, on_model: list[str], library: list, preferred: str | None) -> None:
        """``on_model``: adapter names on the model; ``library``: entries (shown by name; those not on
        the model yet are loaded when used). What the user picked stays picked; else ``preferred``."""
        names = {e.id: e.name for e in library}
        self.choice.blockSignals(True)
        self.choice.clear()
        self.choice.addItem(BASE, None)
        for name in on_model:
            self.choice.addItem(f"adapter: {names.get(name, name)}", {"name": name, "folder": None})
        others = [e for e in library if e.id not in on_model]
        if others:
            self.choice.insertSeparator(self.choice.count())
            for e in others:
                self.choice.addItem(f"library: {e.name}", {"name": e.id, "folder": str(e.path)})
                self.choice.setItemData(self.choice.count() - 1, "Put on the model from the library when generating",
                                        Qt.ItemDataRole.ToolTipRole)
        want = self.user_pick if self.user_pick is not None else preferred
        if not self._find(want):
            self._find(preferred)
        self.choice.blockSignals(False)

    def _find(self, name: str | None) -> bool:
        """Make ``name`` (an adapter, or BASE / None for the base model) current; False if absent."""
        if name is None or name == BASE:
            self.choice.setCurrentIndex(0)
            return True
        for i in range(self.choice.count()):
            data = self.choice.itemData(i)
            if isinstance(data, dict) and data["name"] == name:
                self.choice.setCurrentIndex(i)
                return True
        return False

    def _picked(self, index: int) -> None:
        data = self.choice.itemData(index)
        self.user_pick = data["name"] if isinstance(data, dict) else BASE

    def selected(self) -> dict | None:
        data = self.choice.currentData()
        return data if isinstance(data, dict) else None

    def select_adapter(self, name: str | None) -> bool:
        """Choose, as the user would, the adapter ``name`` on the model or in the library (None: the
        base model); False when there is no such choice."""
        found = self._find(name)
        if found:
            self._picked(self.choice.currentIndex())
        return found

    def clear(self) -> None:
        self.text.clear()
        self.stats.setText("waiting…")

    def append(self, piece: str) -> None:
        cursor = self.text.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.insertText(piece)
        self.text.setTextCursor(cursor)
        self.text.ensureCursorVisible()

    def answer(self) -> str:
        return self.text.toPlainText()
