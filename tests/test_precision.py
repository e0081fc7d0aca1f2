"""The suite's precision modes and bars (tests/precision.py): each bar can fail, and a mode is what it says."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests import precision
from tests.server import ROOT


def test_a_bf16_sized_error_passes_bf16_bars_and_fails_float32_bars() -> None:
    rng = np.random.default_rng(0)
    want = rng.standard_normal((4, 384)).astype(np.float32) / 20
    got = want * (1 + rng.uniform(-2**-8, 2**-8, want.shape))  # bf16's relative rounding, 8 bits of mantissa
    precision.assert_vectors_close(got, want, precision.tolerance("bfloat16"))
    with pytest.raises(AssertionError, match="float32 bars"):
        precision.assert_vectors_close(got, want, precision.tolerance("float32"))
    with pytest.raises(AssertionError, match="score difference"):
        precision.assert_scores_close([0.0860], [0.0847], precision.tolerance("float32"))
    precision.assert_scores_close([0.0860], [0.0847], precision.tolerance("bfloat16"))


def test_each_mode_names_the_dtype_its_servers_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIE_TEST_PRECISION", "float32")
    assert precision.server_dtype() == "float32" and precision.tolerance().precision == "float32"
    monkeypatch.setenv("SIE_TEST_PRECISION", "bfloat16")
    assert precision.server_dtype() == "auto" and precision.tolerance().precision == "bfloat16"
    monkeypatch.setenv("SIE_TEST_PRECISION", "fp8")
    with pytest.raises(ValueError, match="SIE_TEST_PRECISION must be one of float32, bfloat16, not 'fp8'"):
        precision.mode()


def test_the_caller_s_mode_variables_do_not_reach_the_tests() -> None:
    """Importing the suite clears what would change its mode; the suite's own controls stay."""
    env = {**os.environ, "TRANSFORMERS_OFFLINE": "1", "SIE_ENGINE": "torch", "HF_ENDPOINT": "http://127.0.0.1:9",
           "SIE_TEST_PRECISION": "float32"}
    code = ("import os, tests; print(sorted(k for k in ('TRANSFORMERS_OFFLINE', 'SIE_ENGINE', 'HF_ENDPOINT') "
            "if k in os.environ), os.environ['HF_HUB_OFFLINE'], os.environ['SIE_TEST_PRECISION'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "1", "float32"]
