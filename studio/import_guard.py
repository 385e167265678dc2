"""Keep PySide6's import hook from holding the source of every module imported after it.

Since PYSIDE-2029 (https://bugreports.qt.io/browse/PYSIDE-2029), PySide6's ``__feature__`` support
asks of every module imported after Qt whether it uses PySide6, by searching its source for the word
(``shibokensupport.feature._mod_uses_pyside``). It reads the source with ``inspect.getsource``, which
goes through :mod:`linecache`, and linecache keeps every file it read for the life of the process.
The window imports torch, transformers and datasets after Qt (it shows first, then warms them up), so
it kept the text of about 1,900 modules: 58 MiB of Python strings, about 100 MiB of resident memory
measured while a run trained (benchmarks/window_memory.py), memory the command line never spends.

The guard asks the same question by reading the file's bytes and letting them go; a module without a
readable ``.py`` file still goes to PySide6's own function, and what PySide6 already put in the cache
is dropped. Nothing else changes: the answer is the same, and the ``snake_case``/``true_property``
features (which the studio does not use) still see every module that names PySide6.
tests/test_gui.py checks that a module imported after the guard leaves no source behind, and that the
guard found the function on the PySide6 this project pins: the day PySide6 renames it, that test
fails and this module is revisited.
"""

from __future__ import annotations

import linecache
import sys

_MARK = "_lora_studio_guard"


def install() -> bool:
    """Replace PySide6's source check with one that caches nothing, once; True when it is in place
    (False when PySide6 is not imported or no longer has the function)."""
    feature = sys.modules.get("shibokensupport.feature")
    upstream = getattr(feature, "_mod_uses_pyside", None)
    if upstream is None:
        return False
    if getattr(upstream, _MARK, False):
        return True

    def _mod_uses_pyside(module) -> bool:
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path.endswith(".py"):
            try:
                with open(path, "rb") as f:
                    return b"PySide6" in f.read()
            except OSError:
                pass
        return upstream(module)

    setattr(_mod_uses_pyside, _MARK, True)
    feature._mod_uses_pyside = _mod_uses_pyside
    for name, entry in list(linecache.cache.items()):  # what the hook read before now (files on disk;
        if len(entry) == 4 and entry[1] is not None:      # generated code, with no mtime, stays)
            linecache.cache.pop(name, None)
    return True
