"""LoRA Studio's application: the command line (``cli``) and, later, the window (``app``)."""

from core import __version__

__all__ = ["__version__"]
