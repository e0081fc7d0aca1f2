"""Image build check (build stage): the installed torch is the pinned release and the build asked for, CPU or CUDA.

`python3 torch_check.py flavour FLAVOUR INDEX_URL` prints the build wanted: FLAVOUR cpu or cuda, or for auto cuda when
the index URL names a CUDA build (.../whl/cu128), else cpu. `python3 torch_check.py check VERSION FLAVOUR INDEX_URL`
checks the installed torch against it. A CPU wheel left in docker/wheels would otherwise make a "CUDA" image that holds
the CPU torch and fails every GPU load at run time. Exits 1 with one line saying what is wrong.
"""

from __future__ import annotations

import re
import sys


def wanted_flavour(flavour: str, index_url: str) -> str:
    if flavour in ("cpu", "cuda"):
        return flavour
    if flavour != "auto":
        raise SystemExit(f"error: TORCH_FLAVOUR must be cpu, cuda or auto, not {flavour!r}")
    return "cuda" if re.search(r"/cu\d+/?$", index_url) else "cpu"


def check(version: str, flavour: str, index_url: str) -> str:
    """The torch found, as one line; SystemExit naming the mismatch otherwise."""
    import torch

    want = wanted_flavour(flavour, index_url)
    cuda = torch.version.cuda
    found = f"torch {torch.__version__} (CUDA {cuda})" if cuda else f"torch {torch.__version__} (CPU build)"
    if not torch.__version__.startswith(version):
        raise SystemExit(f"error: {found} installed, but the image pins torch {version}")
    if want == "cuda" and not cuda:
        raise SystemExit(f"error: a CUDA image was asked for, but {found} is installed; is a CPU wheel in "
                         "docker/wheels? Remove it, or build with TORCH_WHEELS pointing at the CUDA wheel")
    if want == "cpu" and cuda:
        raise SystemExit(f"error: a CPU image was asked for, but {found} is installed (several GB of CUDA "
                         "libraries); set TORCH_INDEX_URL to https://download.pytorch.org/whl/cpu")
    return found


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    print(wanted_flavour(*args) if command == "flavour" else check(*args))
