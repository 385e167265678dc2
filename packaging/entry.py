"""The frozen application's entry point (PyInstaller runs this file as ``__main__``)."""

import sys

from studio.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
