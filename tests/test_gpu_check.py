"""scripts/gpu-check.sh's logic without a GPU: its overall deadline with a fake clock, nvidia-smi's per-PID figures,
the stop when torch has no CUDA, and that it needs neither Python 3.12 nor npm."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses resolve its annotations there
    spec.loader.exec_module(module)
    return module


def test_nvidia_smi_per_pid_figures_are_read_in_bytes(gpu_check: ModuleType) -> None:
    text = "4242, 1310\n4243, 1290\n987654, [N/A]\n"
    assert gpu_check.smi_per_pid(text) == {4242: 1310 * 2**20, 4243: 1290 * 2**20}
    assert gpu_check.smi_per_pid("") == {}  # a container without hostPID: no process of ours


def test_the_whole_check_keeps_to_its_deadline_and_leaves_out_what_does_not_fit(
        gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Every step takes all the time it is given (a fake clock): the total stays within the deadline, and the
    optional Infinity step is skipped rather than started without its time."""
    clock = [0.0]
    monkeypatch.setattr(gpu_check.time, "monotonic", lambda: clock[0])
    ran: list[tuple[str, float]] = []

    def spend(name: str):  # type: ignore[no-untyped-def]
        def step(limit_s: float) -> None:
            ran.append((name, limit_s))
            clock[0] += limit_s
        return step

    steps = [gpu_check.Step(s.name, s.cap_s, spend(s.name), s.optional) for s in gpu_check.plan()]
    monkeypatch.setattr(gpu_check, "plan", lambda: steps)
    assert gpu_check.main(["--deadline", "480"]) == 0
    assert clock[0] <= 480
    assert [name for name, _ in ran] == [s.name for s in steps if not s.optional]
    out = capsys.readouterr().out
    assert "Infinity on the same GPU" in out and "skipped" in out
    with_time = gpu_check.main(["--deadline", "2000"])  # a long deadline: every step, Infinity included
    assert with_time == 0 and ran[-1][0].startswith("Infinity")


def test_without_cuda_it_stops_after_the_versions(gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    later: list[str] = []
    steps = gpu_check.plan()
    steps = [steps[0], gpu_check.Step("later", 10, later.append)]
    monkeypatch.setattr(gpu_check, "plan", lambda: steps)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda _name: None)  # no nvidia-smi either
    assert gpu_check.main([]) == 1  # this CPU-only torch
    assert not later and "torch here has no usable CUDA" in capsys.readouterr().out


def test_it_needs_only_the_venv_never_python_3_12_or_npm(tmp_path: Path) -> None:
    marker = tmp_path / "called"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python3.12", "npm", "pyenv"):
        (bin_dir / name).write_text(f"#!/bin/sh\necho {name} >> {marker}\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--plan"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "total: at most 480 s" in done.stdout, done.stderr
    assert not marker.exists()
    source = (ROOT / "scripts" / "gpu_check.py").read_text() + (ROOT / "scripts" / "gpu-check.sh").read_text()
    assert "python3.12" not in source and "npm " not in source and "install.sh test" not in source
