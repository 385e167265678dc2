"""LoRA Studio's engine: plain Python on torch, importable without Qt.

One noun per module: ``config`` (what a run is made of), ``models`` (where base models come from),
``data`` (datasets to tokens), ``targets`` (which modules to adapt), ``lora`` (the layer, merge,
injection), ``train`` (the loop), ``runs`` (run folders), ``adapter`` (adapters on disk), ``library``,
``combine``, ``export``, ``analysis``.
"""

__version__ = "0.1.0"
