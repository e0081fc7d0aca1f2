#!/usr/bin/env bash
# `make test`: the whole suite with every engine in float32, then the numeric tests again in bf16 where this CPU has it
# natively (tests/precision.py says what each mode runs and the bars each precision must meet).
set -euo pipefail
py=.venv/bin/python
SIE_TEST_PRECISION=float32 "$py" -m pytest "$@"
if "$py" -c 'import sys; from tests import precision; sys.exit(0 if precision.has_native_bf16() else 1)'; then
  status=0
  SIE_TEST_PRECISION=bfloat16 "$py" -m pytest -m "numeric and not gpu and not slow" "$@" || status=$?
  # 5: the paths asked for hold no numeric test
  if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then exit "$status"; fi
else
  echo "bf16 mode not run: this CPU has no native bf16 (AVX512-BF16 or AMX), so the engines compute float32 only"
fi
