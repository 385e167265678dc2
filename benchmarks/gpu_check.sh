#!/usr/bin/env bash
# The GPU check on a CUDA machine that has torch, transformers and peft but cannot reach PyPI (the
# device machine): installs the wheels carried in .whl/ (bitsandbytes, datasets and what datasets
# needs beyond that machine's packages) into /tmp/site, puts them on PYTHONPATH, prints the versions
# it will run with, then runs benchmarks/gpu_check.py. The JSON and the full log go to $OUT when it
# is set (the device tool brings that folder back), else to benchmarks/results/.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]
#
# Fetching the wheels, on a machine with pip and PyPI, from the repository's root (see the README's
# GPU section): python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
#   --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
#   -d .whl bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check.sh: installing the wheels in .whl/ failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PY" - <<'EOF'
import importlib
for name in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "pyarrow", "tokenizers"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:  # the check records what fails; this line says why up front
        print(f"{name}: not importable ({type(e).__name__}: {e})")
EOF
"$PY" benchmarks/gpu_check.py --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
