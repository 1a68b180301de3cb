#!/usr/bin/env bash
# The GPU benchmark (docs/gpu.md): neumuter's CUDA paths in bfloat16 and float32, timed, in one
# table beside the CPU numbers of the README and the paper's 2.4 min. Under 8 minutes on one GPU.
#
#   benchmarks/gpu.sh                          # on a GPU machine (random data, no network)
#   benchmarks/gpu.sh --device cpu --dry-run   # the same script end to end on the CPU, tiny sizes
#   benchmarks/gpu.sh --help                   # every option (gpu_bench.py)
#
# PYTHON picks the interpreter (default: python3); the neumuter of this checkout is used.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_DISABLE_PROGRESS_BARS=1     # the table is the output, not the loading bars
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$python" "$here/gpu_bench.py" "$@"
