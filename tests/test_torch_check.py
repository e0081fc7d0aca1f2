"""The image's torch checks, without Docker: docker/torch_check.py against fake torch modules, and the Dockerfile's
torch install step run in sh with a fake pip and a wheel folder, as the build stage runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "docker" / "torch_check.py"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_INDEX = "https://download.pytorch.org/whl/cu128"


def fake_torch(folder: Path, version: str, cuda: str | None) -> Path:
    (folder / "torch").mkdir(parents=True)
    (folder / "torch" / "__init__.py").write_text(
        f"from types import SimpleNamespace\n__version__ = {version!r}\nversion = SimpleNamespace(cuda={cuda!r})\n")
    return folder


def run_check(tmp_path: Path, version: str, cuda: str | None, flavour: str, index: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(fake_torch(tmp_path / "site", version, cuda))}
    return subprocess.run([sys.executable, str(CHECK), "check", "2.13.0", flavour, index], capture_output=True,
                          text=True, env=env, timeout=60)


@pytest.mark.parametrize(("version", "cuda", "flavour", "index", "error"), [
    ("2.13.0+cpu", None, "auto", CPU_INDEX, None),
    ("2.13.0+cu128", "12.8", "auto", CUDA_INDEX, None),
    ("2.13.0+cpu", None, "auto", CUDA_INDEX, "a CUDA image was asked for, but torch 2.13.0+cpu (CPU build)"),
    ("2.13.0+cpu", None, "cuda", CPU_INDEX, "is a CPU wheel in docker/wheels?"),
    ("2.13.0+cu128", "12.8", "cpu", CPU_INDEX, "a CPU image was asked for"),
    ("2.12.1+cu128", "12.8", "auto", CUDA_INDEX, "the image pins torch 2.13.0"),
], ids=["cpu", "cuda", "cpu-wheel-in-cuda-image", "cpu-wheel-forced-cuda", "cuda-in-cpu-image", "wrong-release"])
def test_the_check_fails_a_build_whose_torch_is_not_the_one_asked_for(
        tmp_path: Path, version: str, cuda: str | None, flavour: str, index: str, error: str | None) -> None:
    done = run_check(tmp_path, version, cuda, flavour, index)
    if error is None:
        assert done.returncode == 0 and version in done.stdout, done.stderr
    else:
        assert done.returncode == 1 and error in done.stderr, done.stderr


def install_step() -> str:
    """The Dockerfile's RUN that installs torch, as the shell text the build runs."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", "")
    step = next(line for line in text.splitlines() if line.startswith("RUN") and "torch_check.py flavour" in line)
    return re.sub(r"^RUN\s+--mount=\S+\s+", "", step)


@pytest.mark.parametrize(("wheels", "index", "installed"), [
    (["torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl"], CPU_INDEX, "/torch-2.13.0+cpu-cp311"),
    (["torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl"], CUDA_INDEX, "--index-url " + CUDA_INDEX),  # CPU wheel skipped
    (["torch-2.13.0+cu128-cp311-cp311-linux_x86_64.whl"], CUDA_INDEX, "/torch-2.13.0+cu128-cp311"),
    ([], CPU_INDEX, "--index-url " + CPU_INDEX),
], ids=["cpu-wheel", "cuda-build-skips-cpu-wheel", "cuda-wheel", "no-wheel"])
def test_a_cuda_build_never_installs_a_cpu_wheel_from_the_folder(tmp_path: Path, wheels: list[str], index: str,
                                                                 installed: str) -> None:
    folder = tmp_path / "wheels"
    folder.mkdir()
    for name in wheels:
        (folder / name).touch()
    log = tmp_path / "pip.log"
    pip = tmp_path / "pip"
    pip.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    pip.chmod(0o755)
    script = (install_step().replace("/opt/sie/bin/pip", str(pip)).replace("/tmp/wheels", str(folder))
              .replace("/tmp/torch_check.py", str(CHECK)))
    env = {**os.environ, "TORCH_VERSION": "2.13.0", "TORCH_FLAVOUR": "auto", "TORCH_INDEX_URL": index}
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 1 and installed in calls[0], calls
