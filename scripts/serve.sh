#!/usr/bin/env bash
# Install if needed, then serve. Without -m/--model-id the default model is served, as `make serve` promises.
set -euo pipefail
make --no-print-directory install
case " $* " in
  *" -m "*|*" --model "*|*" --model-id "*|*" --model="*|*" --model-id="*) ;;
  *) set -- -m sentence-transformers/all-MiniLM-L6-v2 "$@" ;;
esac
exec .venv/bin/python -m sie_router serve "$@"
