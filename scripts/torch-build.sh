#!/usr/bin/env bash
# Prints the torch build this host needs: "cuda" when an NVIDIA driver answers (nvidia-smi lists a GPU, or NVML
# initialises), "cpu" otherwise. SIE_TORCH=cpu|cuda overrides. $PY is the interpreter used to ask NVML.
set -euo pipefail
case "${SIE_TORCH:-}" in
  cpu | cuda) echo "$SIE_TORCH"; exit 0 ;;
  "") ;;
  *) echo "error: SIE_TORCH must be cpu or cuda, not '$SIE_TORCH'" >&2; exit 2 ;;
esac
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
  echo cuda
  exit 0
fi
# A driver without nvidia-smi (some container images): ask the NVML library itself.
if "${PY:-python3}" -c "import ctypes, sys; sys.exit(ctypes.CDLL('libnvidia-ml.so.1').nvmlInit_v2())" >/dev/null 2>&1
then
  echo cuda
else
  echo cpu
fi
