"""LoRA Studio's application: the command line (``cli``) and, later, the window (``app``)."""

from core import __version__
from studio import refcount_guard  # noqa: F401  (PySide6 6.12 drops references to True/None; see there)

__all__ = ["__version__"]
