"""The application: the ``QApplication``, the main window with its sidebar of pages, the message bar,
the status bar, settings and keyboard shortcuts.

Nothing here imports torch or transformers: the window shows first, then the chosen model's facts
are read in workers (:meth:`studio.state.StudioState.refresh_model_info`).
"""

from __future__ import annotations

import os
import sys
import time

from PySide6.QtCore import QByteArray, QSettings, QSize, Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QApplication, QFrame, QHBoxLayout, QLabel, QListWidget, QListWidgetItem,
                               QMainWindow, QStackedWidget, QStyle, QToolButton, QVBoxLayout, QWidget)

from studio import gc_guard, workers
from studio.pages import Page, page_classes
from studio.state import StudioState

APP_NAME = "LoRA Studio"
CLOSE_GRACE_S = 30.0
"""How long, after the window closed, the process waits for cancelled jobs to end by themselves."""


def settings() -> QSettings:
    """The studio's settings: an INI file in the studio home, so LORA_STUDIO_HOME moves it too."""
    from core.home import studio_home

    return QSettings(str(studio_home() / "settings.ini"), QSettings.Format.IniFormat)


class MessageBar(QFrame):
    """One clear message across the top of the window (errors from any page or worker); not modal,
    so a failing job never blocks the window. Closed with its ✕ or replaced by the next message."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("MessageBar")
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        close = QToolButton()
        close.setText("✕")
        close.setAutoRaise(True)
        close.setToolTip("Dismiss")
        close.clicked.connect(self.hide)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(10, 6, 6, 6)
        icon = QLabel()
        icon.setPixmap(self.style().standardIcon(QStyle.StandardPixmap.SP_MessageBoxWarning).pixmap(20, 20))
        lay.addWidget(icon)
        lay.addWidget(self.label, 1)
        lay.addWidget(close)
        self.setStyleSheet("#MessageBar { background: rgba(220, 60, 50, 40); border: 1px solid "
                           "rgba(220, 60, 50, 140); border-radius: 4px; }")
        self.hide()

    def show_message(self, text: str) -> None:
        self.label.setText(text)
        self.show()

    def retract(self, text: str) -> None:
        """Hide the bar if it still shows ``text`` (its cause is gone); another message stays."""
        if self.label.text() == text:
            self.hide()

    def text(self) -> str:
        return self.label.text() if self.isVisible() else ""


class MainWindow(QMainWindow):
    """Sidebar of pages (Ctrl+1..9), a stack showing the chosen one, a message bar and a status bar.

    ``background=False`` leaves the model's facts unread (``--smoke`` and tests that set the model
    themselves).
    """

    def __init__(self, state: StudioState | None = None, *, background: bool = True):
        super().__init__()
        gc_guard.install()  # also when the QApplication was not made by make_app (tests, embedding)
        self.setWindowTitle(APP_NAME)
        self.state = state or StudioState(parent=self)
        self._background = background
        self._closing = False

        self.sidebar = QListWidget()
        self.sidebar.setObjectName("Sidebar")
        self.sidebar.setIconSize(QSize(20, 20))
        self.sidebar.setFixedWidth(168)
        self.sidebar.setSpacing(2)
        self.sidebar.setFrameShape(QFrame.Shape.NoFrame)
        self.stack = QStackedWidget()
        self.message_bar = MessageBar()

        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(8, 8, 8, 0)
        rl.addWidget(self.message_bar)
        rl.addWidget(self.stack, 1)
        central = QWidget()
        cl = QHBoxLayout(central)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.setSpacing(0)
        cl.addWidget(self.sidebar)
        line = QFrame()
        line.setFrameShape(QFrame.Shape.VLine)
        line.setFrameShadow(QFrame.Shadow.Sunken)
        cl.addWidget(line)
        cl.addWidget(right, 1)
        self.setCentralWidget(central)

        self.status_text = QLabel()
        self.statusBar().addWidget(self.status_text, 1)
        self.model_label = QLabel()
        self.statusBar().addPermanentWidget(self.model_label)

        self.pages: list[Page] = []
        errors: list[str] = []
        for i, cls in enumerate(page_classes(errors)):
            page = cls(self.state, self.stack)
            self.pages.append(page)
            self.stack.addWidget(page)
            icon = self.style().standardIcon(getattr(QStyle.StandardPixmap, cls.ICON,
                                                     QStyle.StandardPixmap.SP_FileIcon))
            item = QListWidgetItem(icon, cls.TITLE)
            item.setSizeHint(QSize(150, 36))
            if i < 9:
                item.setToolTip(f"{cls.TITLE} (Ctrl+{i + 1})")
            self.sidebar.addItem(item)
        self.sidebar.currentRowChanged.connect(self._show_page)

        self._make_actions()
        self.state.error.connect(self.message_bar.show_message)
        self.state.error_retracted.connect(self.message_bar.retract)
        self.state.message.connect(self.show_status)
        self.state.config_changed.connect(self._update_model_label)
        self.state.loaded_changed.connect(self._update_model_label)
        self.state.training_changed.connect(self._update_model_label)
        self._update_model_label()

        train = self.page("train")
        if train is not None:  # "an unfinished run can be resumed", seen from every page
            rl.insertWidget(1, train.banner)
            train.banner.resume_requested.connect(lambda _p: self.show_page("train"))
            train.settled.connect(self._close_if_asked)
        self._close_when_done = False
        self.close_question = None

        self._restore()
        for e in errors:
            self.message_bar.show_message(e)

    # -- pages ------------------------------------------------------------------------------------
    def page(self, key: str) -> Page | None:
        """The page with this KEY, or None when its module is absent."""
        return next((p for p in self.pages if p.KEY == key), None)

    def show_page(self, key: str) -> None:
        for i, p in enumerate(self.pages):
            if p.KEY == key:
                if self.sidebar.currentRow() == i:
                    p.page_shown()
                else:
                    self.sidebar.setCurrentRow(i)

    def _show_page(self, row: int) -> None:
        if 0 <= row < len(self.pages):
            self.stack.setCurrentIndex(row)
            self.pages[row].page_shown()

    def show_status(self, text: str) -> None:
        self.status_text.setText(text)

    def _update_model_label(self, *_):
        m = self.state.config.model.source
        name = "bundled SmolLM2-135M-Instruct" if m == "default" else m
        loaded = " (loaded)" if self.state.loaded is not None else ""
        training = "training · " if self.state.training else ""
        self.model_label.setText(f"{training}model: {name}{loaded}")

    def _make_actions(self) -> None:
        for i in range(min(9, len(self.pages))):
            a = QAction(self)
            a.setShortcut(QKeySequence(f"Ctrl+{i + 1}"))
            a.triggered.connect(lambda _=False, row=i: self.sidebar.setCurrentRow(row))
            self.addAction(a)
        start = QAction("Start training", self)
        start.setShortcuts([QKeySequence("Ctrl+Return"), QKeySequence("Ctrl+Enter")])
        start.triggered.connect(lambda: self._train_call("start"))
        stop = QAction("Stop training", self)
        stop.setShortcut(QKeySequence("Ctrl+."))
        stop.triggered.connect(lambda: self._train_call("stop"))
        self.addActions([start, stop])

    def _train_call(self, method: str) -> None:
        page = self.page("train")
        if page is not None:
            if method == "start":
                self.show_page("train")
            getattr(page, method)()

    # -- start-up and settings --------------------------------------------------------------------
    def _restore(self) -> None:
        s = settings()
        geo = s.value("window/geometry")
        if isinstance(geo, QByteArray) and not geo.isEmpty():
            self.restoreGeometry(geo)
        else:
            self.resize(1200, 780)
        for p in self.pages:
            s.beginGroup(f"page-{p.KEY}")
            try:
                p.restore_settings(s)
            except Exception as e:  # noqa: BLE001 - bad settings must not keep the window closed
                self.message_bar.show_message(f"settings of the {p.TITLE} page were ignored: {e}")
            s.endGroup()
        row = s.value("window/page", 0)
        try:
            row = int(row)
        except (TypeError, ValueError):
            row = 0
        # Signals blocked: the page's page_shown (which may start workers) waits for the window to show.
        self.sidebar.blockSignals(True)
        self.sidebar.setCurrentRow(row if 0 <= row < len(self.pages) else 0)
        self.stack.setCurrentIndex(self.sidebar.currentRow())
        self.sidebar.blockSignals(False)

    def save_settings(self) -> None:
        s = settings()
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/page", self.sidebar.currentRow())
        for p in self.pages:
            s.beginGroup(f"page-{p.KEY}")
            try:
                p.save_settings(s)
            except Exception:  # noqa: BLE001 - closing must always succeed
                pass
            s.endGroup()
        s.sync()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self._background:
            self._background = False
            # After the first paint: the window is up before torch starts loading in a worker.
            QTimer.singleShot(50, self._start_background)

    def _start_background(self) -> None:
        if self._closing:
            return
        self.state.refresh_model_info()
        train = self.page("train")
        if train is not None:
            train.refresh_runs()  # offers to resume a run the last session left unfinished
        row = self.sidebar.currentRow()
        if 0 <= row < len(self.pages):
            self.pages[row].page_shown()

    def closeEvent(self, event) -> None:
        """Closing during a run asks first (stop and save / keep training / cancel). Any other job (a
        generation, an export, a conversion) is asked to stop at its next safe point and the window
        closes at once: nothing here waits for a worker on this thread. The process then ends by
        itself when the last job has ended (see :meth:`_quit_when_jobs_end`)."""
        train = self.page("train")
        if train is not None and train.busy:
            event.ignore()
            if not self._close_when_done:
                self._ask_close(train)
            return
        self._closing = True
        self.save_settings()
        for p in self.pages:
            try:
                p.shutdown()
            except Exception:  # noqa: BLE001
                pass
        if workers.cancel_all():
            self._quit_when_jobs_end()
        super().closeEvent(event)

    def _quit_when_jobs_end(self) -> None:
        """Keep the event loop (not the window) alive until the cancelled jobs have saved what they
        must and ended, then quit; a job that is still running after CLOSE_GRACE_S is left to
        run()'s exit (its output is staged and moved into place only when complete)."""
        app = QApplication.instance()
        if app is None:
            return
        app.setQuitOnLastWindowClosed(False)
        deadline = time.monotonic() + CLOSE_GRACE_S
        timer = QTimer(app)  # the application's: the window may be deleted before the jobs end

        def check() -> None:
            if not workers.running() or time.monotonic() > deadline:
                timer.stop()
                timer.deleteLater()
                app.setQuitOnLastWindowClosed(True)
                if not any(w.isVisible() for w in app.topLevelWidgets()):
                    app.quit()

        timer.timeout.connect(check)
        timer.start(50)

    def _ask_close(self, train) -> None:
        from PySide6.QtWidgets import QMessageBox

        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Question)
        box.setWindowTitle("A run is training")
        step, total = train.progress.value(), train.progress.maximum()
        where = f" (step {step} of {total})" if total > 1 else ""
        box.setText(f"A run is training{where}. Close the window?")
        box.setInformativeText("Stop and save: a checkpoint is written, the window closes, and the run "
                               "can be resumed later. Keep training: the window closes when the run "
                               "has finished and its adapter is in the library.")
        self.stop_and_close_button = box.addButton("Stop and save", QMessageBox.ButtonRole.AcceptRole)
        self.keep_training_button = box.addButton("Keep training", QMessageBox.ButtonRole.ActionRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        box.finished.connect(lambda _r, b=box: self._close_answered(b, train))
        self.close_question = box
        box.open()  # window-modal, not a nested event loop: the run's signals keep arriving

    def _close_answered(self, box, train) -> None:
        self.close_question = None
        clicked = box.clickedButton()
        box.deleteLater()
        if clicked is self.stop_and_close_button:
            self._close_when_done = True
            train.stop()
            self.show_status("Saving a checkpoint; the window closes when it is written")
        elif clicked is self.keep_training_button:
            self._close_when_done = True
            self.show_status("The window closes when the run has finished (Stop ends it sooner)")
        if self._close_when_done and not train.busy:
            self._close_if_asked()

    def _close_if_asked(self) -> None:
        if self._close_when_done:
            self._close_when_done = False
            QTimer.singleShot(0, self.close)


def make_app(argv: list[str] | None = None) -> QApplication:
    """The QApplication (created once): Fusion style over the platform's own palette, so the window
    follows the system's light or dark theme while looking the same everywhere."""
    app = QApplication.instance()
    if app is None:
        app = QApplication(argv if argv is not None else sys.argv[:1])
    app.setApplicationName(APP_NAME)
    app.setOrganizationName(APP_NAME)
    app.setStyle("Fusion")
    gc_guard.install()
    if not getattr(app, "_studio_quit_hook", False):
        # Threads still running when the application quits would abort the process.
        app.aboutToQuit.connect(lambda: workers.stop_all(timeout_ms=1_000))
        app._studio_quit_hook = True
    try:
        from core.home import RESOURCES
        from PySide6.QtGui import QIcon

        icon = next((p for p in (RESOURCES / "icons").glob("*.png")), None) if (RESOURCES / "icons").is_dir() else None
        if icon is not None:
            app.setWindowIcon(QIcon(str(icon)))
    except Exception:  # noqa: BLE001 - an icon is not worth failing for
        pass
    return app


def run(*, smoke: bool = False, t0: float | None = None) -> int:
    """Open the window (the event loop runs until it closes). ``smoke``: show it, print how long
    that took, and return 0."""
    t0 = time.perf_counter() if t0 is None else t0
    app = make_app()
    window = MainWindow(background=not smoke)
    window.state.config.model.source = "default"
    window.show()
    if smoke:
        deadline = time.monotonic() + 30
        while not (window.isVisible() and window.windowHandle() is not None
                   and window.windowHandle().isExposed()) and time.monotonic() < deadline:
            app.processEvents()
        app.processEvents()
        shown = window.isVisible()
        print(f"window shown in {time.perf_counter() - t0:.2f} s", flush=True)
        window._background = False
        window.close()
        return 0 if shown else 1
    return leave(app.exec())


def leave(rc: int) -> int:
    """After the event loop: ``rc``, or, when a job outlived the window's grace period (a first-use
    model conversion cannot be interrupted), leave the process without it. Its output is staged
    and only moved into place when complete, so nothing half-written remains; Qt would abort the
    process over a running thread at exit."""
    if workers.running():
        workers.log.warning("leaving with %d job(s) still running", len(workers.running()))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc
