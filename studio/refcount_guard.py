"""Keep None, True and False alive under PySide6 versions that drop references to them.

PySide6 6.12 on CPython 3.11 releases one reference to ``True`` that it never took on every
``SignalInstance.emit()`` (the return value), and one to ``None`` on every ``QTimer.singleShot`` with
a Python callable. CPython 3.12 made these singletons immortal, so the bug is invisible there; on
3.11 ``True`` starts with a few hundred references, and after that many emits the interpreter aborts
with "Fatal Python error: bool_dealloc: deallocating True or False" (measured here: a worker that
reports 600 progress values kills the window).

The upstream bug: PySide6 6.12.0 (shiboken6 6.12.0) on CPython < 3.12, the missing ``Py_INCREF`` on
the value ``SignalInstance.emit`` returns; we found no report of it on Qt's tracker
(https://bugreports.qt.io/projects/PYSIDE), so the one-line probe in
tests/test_gui_playground.py::test_thousands_of_streamed_tokens_do_not_exhaust_true is the report to
file. That test runs the probe with and without this guard and fails when the bare process stops
dying: the day PySide6 fixes it, the test says so and this module goes.

The guard does what 3.12 does: it adds 2**40 references to each of the three singletons once, so no
realistic number of leaked decrements can bring them to zero. Nothing is freed early and nothing
else changes; on 3.12+ (already immortal) and on other interpreters it does nothing. It touches
``ob_refcnt`` directly (the first field of every object in a release build) and checks, through
``sys.getrefcount``, that it changed the right field before trusting it.
"""

from __future__ import annotations

import sys

BOOST = 1 << 40
_applied = False


def apply() -> bool:
    """Make None, True and False practically immortal on CPython < 3.12; True when applied."""
    global _applied
    if _applied or sys.implementation.name != "cpython" or sys.version_info >= (3, 12):
        return _applied
    import ctypes

    for obj in (None, True, False):
        before = sys.getrefcount(obj)
        field = ctypes.c_ssize_t.from_address(id(obj))
        if field.value != before - 1 and abs(field.value - before) > 8:
            return False  # not ob_refcnt (a debug build's layout): leave it alone
        field.value += BOOST
        if sys.getrefcount(obj) < BOOST:  # pragma: no cover - the layout check above failed us
            field.value -= BOOST
            return False
    _applied = True
    return True


apply()
