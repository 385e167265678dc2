"""The window's pages, in the order a person works: Model, Layers, Data, Train, Library, Playground.

A page is a :class:`Page` subclass constructed as ``PageClass(state, parent)`` where ``state`` is the
session (:class:`studio.state.StudioState`). It reads and edits ``state.config`` (calling
``state.changed(part)`` after an edit), listens to the state's signals, and runs anything slow in a
worker (:mod:`studio.workers`). Class attributes name it in the sidebar:

    KEY    short id, also its QSettings group ("model", "library", ...)
    TITLE  sidebar text
    ICON   a QStyle.StandardPixmap name (e.g. "SP_DriveHDIcon")

Hooks the window calls (all optional to override):

    save_settings(settings)     write the page's own state (settings is already in the page's group)
    restore_settings(settings)  read it back, at start-up, before the window shows
    page_shown()                the page became the visible one
    shutdown()                  the window is closing: stop this page's workers (they are also
                                stopped by workers.stop_all afterwards)

:func:`page_classes` imports the modules listed in :data:`MODULES` that exist (pages built by
another hand appear as soon as their module does) and returns their page classes in order. Each
module exposes its page class as ``PAGE``.
"""

from __future__ import annotations

import importlib

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QWidget

# In sidebar order. "compare" (compare runs) sits right after the library.
MODULES = ("model", "layers", "data", "train", "library", "compare", "playground", "evaluate")


class Page(QWidget):
    KEY = "page"
    TITLE = "Page"
    ICON = "SP_FileIcon"

    def __init__(self, state, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state

    def save_settings(self, settings: QSettings) -> None:
        pass

    def restore_settings(self, settings: QSettings) -> None:
        pass

    def page_shown(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def page_classes(errors: list[str] | None = None) -> list[type[Page]]:
    """The page classes whose modules exist, in sidebar order.

    A page module that exists but fails to import is left out and described in ``errors`` (when
    given; otherwise the exception propagates): one broken page must not keep the window closed.
    """
    found = []
    for name in MODULES:
        try:
            module = importlib.import_module(f"studio.pages.{name}")
            found.append(module.PAGE)
        except ModuleNotFoundError as e:
            if e.name == f"studio.pages.{name}":
                continue
            if errors is None:
                raise
            errors.append(f"the {name} page could not be loaded: {e}")
        except Exception as e:  # noqa: BLE001
            if errors is None:
                raise
            errors.append(f"the {name} page could not be loaded: {type(e).__name__}: {e}")
    return found


def setting(settings: QSettings, key: str, default, kind=None):
    """``settings.value`` with a type: QSettings' INI backend returns strings for everything."""
    v = settings.value(key, default)
    if v is None:
        return default
    kind = kind or type(default)
    try:
        if kind is bool:
            return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
        return kind(v)
    except (TypeError, ValueError):
        return default
