"""Which CUDA build of torch to install (scripts/install.sh, before torch is installed, under the venv's Python).

`python scripts/torch-cuda.py VERSION PREFERRED` prints the CUDA tag whose wheel of torch VERSION exists on PyTorch's
index for this Python and machine: PREFERRED (e.g. cu128) when it does, else the nearest build that does, older
first (a driver runs every older CUDA build; a newer one may need a newer driver), with a message on stderr. The index
is PyTorch's (SIE_TORCH_INDEX overrides it: a mirror, or a test's fake index). When the index cannot be read
(offline, a proxy), it prints PREFERRED with a warning and pip says the rest. Exits 1 if no CUDA build has the wheel.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import urllib.error
import urllib.request

INDEX = "https://download.pytorch.org/whl"
# CUDA builds PyTorch publishes, newest first.
KNOWN = ("cu130", "cu129", "cu128", "cu126", "cu124", "cu121", "cu118")


def candidates(preferred: str) -> list[str]:
    """The preferred tag, then older builds newest first, then newer builds oldest first."""
    number = int(preferred.removeprefix("cu"))
    others = [tag for tag in KNOWN if tag != preferred]
    older = [tag for tag in others if int(tag[2:]) < number]
    newer = [tag for tag in reversed(others) if int(tag[2:]) > number]
    return [preferred, *older, *newer]


def listing(index: str, tag: str) -> str | None:
    """The index's page of torch wheels for one CUDA build; None when it has none (404) or cannot be read."""
    try:
        with urllib.request.urlopen(f"{index.rstrip('/')}/{tag}/torch/", timeout=20) as page:
            return page.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def has_wheel(page: str, version: str, tag: str, python: str, machine: str) -> bool:
    name = rf"torch-{re.escape(version)}(?:\+|%2[Bb]){tag}-{python}-{python}-[^\"'<>]*{machine}\.whl"
    return re.search(name, page) is not None


def choose(version: str, preferred: str, index: str, python: str, machine: str) -> str:
    pages = {tag: listing(index, tag) for tag in candidates(preferred)}
    if all(page is None for page in pages.values()):
        print(f"warning: cannot read {index}; trying torch {version}+{preferred} as is", file=sys.stderr)
        return preferred
    for tag, page in pages.items():
        if page is not None and has_wheel(page, version, tag, python, machine):
            if tag != preferred:
                print(f"note: PyTorch's index has no torch {version}+{preferred} wheel for {python} on {machine}; "
                      f"installing the nearest CUDA build, {version}+{tag} (SIE_TORCH_CUDA picks another)",
                      file=sys.stderr)
            return tag
    raise SystemExit(f"error: PyTorch's index ({index}) has no CUDA build of torch {version} for {python} on "
                     f"{machine} (tried {', '.join(pages)}); install with SIE_TORCH=cpu, or set SIE_TORCH_CUDA")


if __name__ == "__main__":
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    print(choose(sys.argv[1], sys.argv[2], os.environ.get("SIE_TORCH_INDEX") or INDEX, python, platform.machine()))
