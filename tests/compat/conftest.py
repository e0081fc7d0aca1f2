"""Running scenarios of the real sie-sdk 0.10.1 client from its own venv (.venv-compat, Python 3.12)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPAT_PYTHON = ROOT / ".venv-compat/bin/python"
SCRIPT = Path(__file__).with_name("real_sdk_client.py")

RunScenario = Callable[..., dict[str, Any]]


@pytest.fixture(scope="session")
def real_sdk(tmp_path_factory: pytest.TempPathFactory) -> RunScenario:
    if not COMPAT_PYTHON.exists():
        pytest.fail(".venv-compat is missing: run `make install-test` (it needs Python 3.12)")
    folder = tmp_path_factory.mktemp("compat")

    def run(url: str, scenario: str, timeout: float = 120, **args: Any) -> dict[str, Any]:
        out = folder / f"{scenario}.npz"
        done = subprocess.run([str(COMPAT_PYTHON), str(SCRIPT), url, scenario, str(out), json.dumps(args)],
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        with np.load(out, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    return run
