"""scripts/install.sh's decisions, run for real in bash with fake commands: nothing is downloaded."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.server import ROOT

INSTALL = ROOT / "scripts" / "install.sh"
TORCH_BUILD = ROOT / "scripts" / "torch-build.sh"
SMI_LISTS_A_GPU = 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5e3a8c1f-2b6d-4e9a-8f70-1c2d3e4f5a6b)"'
SMI_WITHOUT_DRIVER = ('echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver. Make sure '
                      'that the latest NVIDIA driver is installed and running."\nexit 9')


def fake_command(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_a_failed_pip_install_stops_the_install_with_pips_error(tmp_path: Path) -> None:
    pip = fake_command(tmp_path, "pip", 'echo "WARNING: Location \'x\' is ignored" >&2\n'
                                        'echo "ERROR: No matching distribution found for nosuch==9" >&2\nexit 1')
    pip_q = f'eval "$(sed -n "/^pip_q()/,/^}}/p" {INSTALL})"'
    script = f"set -euo pipefail\n{pip_q}\npip_q {pip} install nosuch\necho went-on"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "went-on" not in done.stdout
    assert "ERROR: No matching distribution found for nosuch==9" in done.stderr
    assert "WARNING: Location" not in done.stderr


@pytest.mark.parametrize(("smi", "nvml_answers", "override", "want"), [
    (SMI_LISTS_A_GPU, False, "", "cuda"),
    (SMI_WITHOUT_DRIVER, False, "", "cpu"),  # nvidia-smi installed, but no driver behind it
    (None, True, "", "cuda"),  # a driver-only container: no nvidia-smi, NVML initialises
    (None, False, "", "cpu"),
    (SMI_LISTS_A_GPU, True, "cpu", "cpu"),
    (None, False, "cuda", "cuda"),  # building an image for GPU nodes on a machine without one
], ids=["nvidia-smi", "smi-without-driver", "nvml-only", "nothing", "override-cpu", "override-cuda"])
def test_the_torch_build_follows_the_driver(tmp_path: Path, smi: str | None, nvml_answers: bool, override: str,
                                            want: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if smi is not None:
        fake_command(bin_dir, "nvidia-smi", smi)
    fake_command(bin_dir, "grep", f'exec {shutil.which("grep")} "$@"')
    # The NVML probe runs `$PY -c ...`: this stand-in answers as the library would (0: NVML_SUCCESS).
    python = fake_command(tmp_path, "python", "exit 0" if nvml_answers else "exit 1")
    env = {"PATH": str(bin_dir), "PY": str(python), "SIE_TORCH": override}
    done = subprocess.run([shutil.which("bash") or "/bin/bash", str(TORCH_BUILD)], env=env, capture_output=True,
                          text=True, timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{want}\n", "")


def test_an_unknown_override_is_refused() -> None:
    done = subprocess.run(["bash", str(TORCH_BUILD)], env={"PATH": "/usr/bin:/bin", "SIE_TORCH": "gpu"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr == "error: SIE_TORCH must be cpu or cuda, not 'gpu'\n"

