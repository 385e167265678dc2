"""Run Python's cyclic garbage collector only in the GUI thread.

CPython collects cycles in whichever thread happens to cross the allocation threshold. In the
studio that is often a worker thread (building a model allocates a lot), and if the cycle holds the
Python side of a Qt widget the widget is destroyed from that thread: Qt aborts, or the process dies
with a segmentation fault inside "Garbage-collecting" (seen in CI: a worker building a model on the
meta device collected a window closed by an earlier test).

The guard does what PyQt's and pyqtgraph's users settled on: it turns automatic collection off and
a timer in the GUI thread collects whenever the counts pass the usual thresholds (full collections
at most once a minute, see FULL_EVERY_S). Collection then
only ever happens between events of the GUI thread. Reference counting (which frees almost
everything) is untouched; only cycles wait for the next tick (a quarter of a second). Where a job
must give memory back now (a run's Pause, its end), its worker asks this thread for a full
collection and waits for it (studio.workers.TrainWorker, core.train.Trainer's ``collect_cycles``).
"""

from __future__ import annotations

import gc
import time

from PySide6.QtCore import QCoreApplication, QObject, QThread, QTimer

INTERVAL_MS = 250
FULL_EVERY_S = 60.0
"""At most one full (generation 2) collection a minute. A full collection walks every Python object
(torch, transformers and a model make a lot of them): 60-320 ms each in the heartbeat benchmark's
process on this machine, a visible stall of the window. CPython itself
postpones full collections until the long-lived objects grew by a quarter, a count Python does not
expose, so the guard bounds them by time instead (generations 0 and 1 still run every tick)."""


class _Collector(QObject):
    def __init__(self, parent: QObject):
        super().__init__(parent)
        self.threshold = gc.get_threshold()
        self.last_full = time.monotonic()
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.check)
        self.timer.start(INTERVAL_MS)

    def check(self) -> None:
        counts = gc.get_count()
        if counts[0] > self.threshold[0]:
            generation = 0
            if counts[1] > self.threshold[1]:
                generation = 1
                if counts[2] > self.threshold[2] and time.monotonic() - self.last_full >= FULL_EVERY_S:
                    generation = 2
            gc.collect(generation)
            if generation == 2:
                self.last_full = time.monotonic()


def install() -> bool:
    """Turn automatic collection off and collect from the GUI thread; idempotent. Needs the
    QApplication and must be called from its thread; False when it could not be installed."""
    app = QCoreApplication.instance()
    if app is None or QThread.currentThread() != app.thread():
        return False
    if getattr(app, "_studio_gc_guard", None) is None:
        app._studio_gc_guard = _Collector(app)
        gc.disable()
    return True


def collect_now() -> None:
    """A full collection in the calling (GUI) thread, e.g. after closing a window."""
    gc.collect()
