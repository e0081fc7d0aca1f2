"""scripts/install.sh's decisions, run for real in bash with fake commands: nothing is downloaded."""

from __future__ import annotations

import functools
import http.server
import os
import platform
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
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



TORCH_CUDA = ROOT / "scripts" / "torch-cuda.py"
PYTHON_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"


FakeIndex = Callable[[Path, dict[str, list[str]]], str]


@pytest.fixture
def fake_index() -> Iterator[FakeIndex]:
    """`fake_index(root, {cuda tag: [torch versions]})`: the URL of a PyTorch-style index served over HTTP on
    localhost, one page per CUDA build linking its wheels as PyTorch's does (+ written %2B); a build not listed is a
    404, as there."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(root: Path, wheels: dict[str, list[str]]) -> str:
        write_index(root, wheels)
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *_: None  # type: ignore[attr-defined]
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/whl"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def write_index(root: Path, wheels: dict[str, list[str]]) -> None:
    root = root / "whl"
    root.mkdir(parents=True, exist_ok=True)
    for tag, versions in wheels.items():
        page = root / tag / "torch"
        page.mkdir(parents=True)
        links = "".join(f'<a href="/whl/{tag}/torch-{v}%2B{tag}-{PYTHON_TAG}-{PYTHON_TAG}-manylinux_2_28_'
                        f'{platform.machine()}.whl#sha256=00">torch-{v}+{tag}-{PYTHON_TAG}-{PYTHON_TAG}-manylinux_2_28_'
                        f'{platform.machine()}.whl</a><br/>' for v in versions)
        (page / "index.html").write_text(f"<html><body>{links}</body></html>")


def choose_cuda(index: str, preferred: str = "cu128") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TORCH_CUDA), "2.13.0", preferred], capture_output=True, text=True,
                          env={**os.environ, "SIE_TORCH_INDEX": index}, timeout=60)


def test_the_cuda_wheel_named_is_the_one_installed_when_the_index_has_it(tmp_path: Path,
                                                                         fake_index: FakeIndex) -> None:
    done = choose_cuda(fake_index(tmp_path, {"cu128": ["2.12.0", "2.13.0"], "cu126": ["2.13.0"]}))
    assert (done.returncode, done.stdout, done.stderr) == (0, "cu128\n", "")


def test_without_that_wheel_the_nearest_older_cuda_build_is_installed_with_a_message(
        tmp_path: Path, fake_index: FakeIndex) -> None:
    done = choose_cuda(fake_index(tmp_path, {"cu128": ["2.12.0"], "cu126": ["2.13.0"], "cu130": ["2.13.0"]}))
    assert done.returncode == 0 and done.stdout == "cu126\n"  # older first: every driver for cu128 runs cu126
    assert "no torch 2.13.0+cu128 wheel" in done.stderr and "nearest CUDA build, 2.13.0+cu126" in done.stderr
    newer_only = choose_cuda(fake_index(tmp_path / "newer", {"cu130": ["2.13.0"]}))
    assert newer_only.returncode == 0 and newer_only.stdout == "cu130\n"


def test_no_cuda_build_of_the_release_fails_saying_what_to_do(tmp_path: Path, fake_index: FakeIndex) -> None:
    done = choose_cuda(fake_index(tmp_path, {"cu128": ["2.12.0"], "cu126": ["2.12.0"]}))
    assert done.returncode == 1 and "no CUDA build of torch 2.13.0" in done.stderr and "SIE_TORCH=cpu" in done.stderr


def test_an_unreadable_index_leaves_the_choice_to_pip(tmp_path: Path) -> None:
    done = choose_cuda("http://127.0.0.1:9/whl")  # the discard port: nothing answers
    assert done.returncode == 0 and done.stdout == "cu128\n" and "cannot read" in done.stderr


def install_host(tmp_path: Path, gpu: bool, fake_index: FakeIndex) -> tuple[Path, dict[str, str]]:
    """A copy of the repository's install inputs with a fake venv (pip logs its arguments; python answers torch's
    version for the final check and runs torch-cuda.py for real) and a host with or without an NVIDIA driver."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("install.sh", "torch-build.sh", "torch-cuda.py"):
        shutil.copy(ROOT / "scripts" / name, repo / "scripts" / name)
    shutil.copy(ROOT / "Makefile", repo / "Makefile")
    (repo / "pyproject.toml").touch()
    venv = repo / ".venv" / "bin"
    fake_command(venv, "pip", f'echo "$*" >> {tmp_path / "pip.log"}')
    flavour = "2.13.0+cu126" if gpu else "2.13.0+cpu"
    fake_command(venv, "python", f'case "$1" in -c) echo {flavour};; *) exec {sys.executable} "$@";; esac')
    bin_dir = fake_command(tmp_path / "bin", "nvidia-smi", SMI_LISTS_A_GPU if gpu else SMI_WITHOUT_DRIVER).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PY": str(fake_command(tmp_path, "py", "exit 1")),
           "SIE_TORCH_INDEX": fake_index(tmp_path / "index", {"cu128": ["2.12.0"], "cu126": ["2.13.0"]})}
    env.pop("SIE_TORCH", None)
    return repo, env


def test_the_install_stamp_records_the_torch_build_and_make_reinstalls_when_the_host_needs_the_other(
        tmp_path: Path, fake_index: FakeIndex) -> None:
    repo, env = install_host(tmp_path, gpu=True, fake_index=fake_index)
    (repo / ".venv" / ".installed-torch-cpu").write_text("torch 2.13.0+cpu\n")  # made on a CPU host, then moved
    plan = subprocess.run(["make", "-n", "install"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert "SIE_TORCH=cuda bash scripts/install.sh server" in plan.stdout, plan.stdout + plan.stderr
    done = subprocess.run(["bash", "scripts/install.sh", "server"], cwd=repo, env={**env, "SIE_TORCH": "cuda"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"torch==2.13.0+cu126 --index-url {env['SIE_TORCH_INDEX']}/cu126" in (tmp_path / "pip.log").read_text()
    stamps = sorted(p.name for p in (repo / ".venv").glob(".installed*"))
    assert stamps == [".installed-torch-cuda"]
    assert (repo / ".venv" / ".installed-torch-cuda").read_text() == "torch 2.13.0+cu126\n"
    again = subprocess.run(["make", "-n", "install"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert "install.sh" not in again.stdout  # the stamp matches the host: nothing to do


def test_a_cpu_host_keeps_a_cpu_stamp(tmp_path: Path, fake_index: FakeIndex) -> None:
    repo, env = install_host(tmp_path, gpu=False, fake_index=fake_index)
    (repo / ".venv" / ".installed-torch-cpu").write_text("torch 2.13.0+cpu\n")
    plan = subprocess.run(["make", "-n", "install"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0 and "install.sh" not in plan.stdout, plan.stdout + plan.stderr
