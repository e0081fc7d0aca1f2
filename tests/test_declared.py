"""A test that skips for a missing declared dependency passes quietly on a developer's machine and fails the run in
CI (`SIE_TEST_FAIL_ON_DECLARED_SKIP=1`, as .ci/run sets)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import declared
from tests.server import ROOT

NEEDS_A_MISSING_PACKAGE = """\
from tests import declared

declared.module("sie_no_such_package")


def test_never_runs() -> None:
    raise AssertionError("unreachable")
"""


def run_pytest(folder: Path, fail_on_skip: bool) -> subprocess.CompletedProcess[str]:
    (folder / "test_needs_it.py").write_text(NEEDS_A_MISSING_PACKAGE)
    env = {k: v for k, v in os.environ.items() if k != declared.FAIL_ENV}
    if fail_on_skip:
        env[declared.FAIL_ENV] = "1"
    # The suite's conftest as a plugin: the file lies outside tests/, where it would not be found.
    return subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "-p", "tests.conftest",
                           "-q", "-p", "no:cacheprovider", str(folder)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_declared_skip_passes_locally_and_fails_in_ci(tmp_path: Path) -> None:
    local = run_pytest(tmp_path, fail_on_skip=False)
    assert local.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, local.stdout + local.stderr  # the module skipped
    assert "1 skipped" in local.stdout
    ci = run_pytest(tmp_path, fail_on_skip=True)
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "skipped for a missing declared dependency" in ci.stdout and "sie_no_such_package" in ci.stdout
