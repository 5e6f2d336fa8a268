#!/usr/bin/env bash
# The GPU acceptance check in one command (docs/benchmarks.md, "GPU acceptance check").
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options ...]
#
# From the repository root of a checkout on the GPU machine: installs the wheels carried in wheels/ (built
# beside the checkout, see the docs) when DeepSpeed or open_clip cannot be imported, then runs
# benchmarks/gpu_check.py. The JSON goes to $OUT/gpu_check.json when $OUT is set (the device runner's
# folder that comes back), else to benchmarks/results/gpu_check.json. Exit status: gpu_check.py's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import deepspeed, open_clip" 2>/dev/null; then
    if compgen -G "wheels/*.whl" >/dev/null; then
        echo "gpu_check.sh: installing the carried wheels (wheels/*.whl, no dependencies resolved)" >&2
        "$PYTHON" -m pip install --quiet --no-deps --no-index wheels/*.whl
    else
        echo "gpu_check.sh: DeepSpeed or open_clip is missing and wheels/ holds no wheels; running what degrades" >&2
    fi
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
out="${OUT:+$OUT/gpu_check.json}"
exec "$PYTHON" benchmarks/gpu_check.py --out "${out:-benchmarks/results/gpu_check.json}" "$@"
