"""scripts/install.sh's decisions, run for real in bash with fake commands: nothing is downloaded."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.server import ROOT

INSTALL = ROOT / "scripts" / "install.sh"


def fake_command(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_a_failed_pip_install_stops_the_install_with_pips_error(tmp_path: Path) -> None:
    pip = fake_command(tmp_path, "pip", 'echo "WARNING: Location \'x\' is ignored" >&2\n'
                                        'echo "ERROR: No matching distribution found for nosuch==9" >&2\nexit 1')
    script = f'set -euo pipefail\neval "$(sed -n "/^pip_q()/,/^}}/p" {INSTALL})"\npip_q {pip} install nosuch\necho went-on'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "went-on" not in done.stdout
    assert "ERROR: No matching distribution found for nosuch==9" in done.stderr
    assert "WARNING: Location" not in done.stderr
