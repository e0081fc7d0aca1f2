"""Skips for a missing declared dependency (test process): allowed on a developer's machine, refused in CI.

pyproject.toml declares openvino, onnxruntime and kmock, and .ci/run installs the prometheus binary: a test that needs
one may skip where it is missing, but saying so with `DECLARED`, which `tests/conftest.py` counts. With
`SIE_TEST_FAIL_ON_DECLARED_SKIP=1` (as .ci/run sets) any such skip fails the run, so a broken install never passes CI
as a quiet skip.
"""

from __future__ import annotations

import shutil
from types import ModuleType

import pytest

DECLARED = "declared dependency missing"
FAIL_ENV = "SIE_TEST_FAIL_ON_DECLARED_SKIP"


def module(name: str) -> ModuleType:
    """`pytest.importorskip` for a package pyproject.toml declares."""
    return pytest.importorskip(name, reason=f"{DECLARED}: the {name} package (pyproject.toml)")


def binary(name: str, how: str) -> pytest.MarkDecorator:
    """A skip mark for tests that need the executable `name`, which `how` installs."""
    return pytest.mark.skipif(shutil.which(name) is None, reason=f"{DECLARED}: the {name} binary ({how})")
