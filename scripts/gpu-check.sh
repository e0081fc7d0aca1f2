#!/usr/bin/env bash
# The first run on a fresh single-GPU box, right after `make install`: versions, the gpu-marked tests, the bench on
# CUDA (default dtype and fp16, against the bare model), two workers' VRAM against nvidia-smi, one out-of-memory split
# by the router, then Infinity if time is left. At most 8 minutes (--deadline SECONDS changes it); --plan lists the
# steps. It needs only .venv (no Python 3.12, no npm): the steps are scripts/gpu_check.py, run by the venv's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "error: no .venv here; run make install first" >&2
  exit 1
fi
exec .venv/bin/python scripts/gpu_check.py "$@"
