"""The probe check's results, recorded once per cache entry (worker process): a runtime's lowest cosine against torch
on the graph's probe batches, for one runtime version, requested and computed precision and CPU kind.

A result depends on nothing else, so a later load with the same four trusts it instead of running the probe again
(the long probe costs a forward at the model's maximum length). Records live in the graph's folder under `checks/`,
one file each, written atomically; a folder exported again starts with none.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
from pathlib import Path

log = logging.getLogger("sie.worker.graph")


@functools.cache
def cpu_kind() -> str:
    """The CPU's model name and instruction-set flags (Linux's /proc/cpuinfo, first processor), hashed: a runtime
    picks its kernels, and so its rounding, by them."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
    except OSError:
        pass
    flags = " ".join(sorted((fields.get("flags") or fields.get("Features") or "").split()))
    described = f"{platform.machine()} {fields.get('model name') or platform.processor()} {flags}"
    return hashlib.blake2b(described.encode(), digest_size=8).hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def identity(runtime: str, requested: str, computes: str) -> str:
    """What a probe result holds for: the runtime and its version, the precision asked for and the one computed,
    and the CPU kind."""
    return f"{runtime}={_version(runtime)} precision={requested}->{computes} cpu={cpu_kind()}"


def _path(folder: Path, what: str) -> Path:
    return folder / "checks" / f"{hashlib.blake2b(what.encode(), digest_size=12).hexdigest()}.json"


def recorded(folder: Path, what: str) -> float | None:
    """The lowest cosine recorded for `what` in the graph folder, or None when it was never checked there."""
    try:
        record = json.loads(_path(folder, what).read_text())
        return float(record["cosine"]) if record.get("identity") == what else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def record(folder: Path, what: str, cosine: float) -> None:
    """Remember `cosine` for `what`; a cache that cannot be written is only a probe again at the next load."""
    path = _path(folder, what)
    try:
        path.parent.mkdir(exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.write_text(json.dumps({"identity": what, "cosine": cosine}))
        staging.replace(path)  # atomic: a concurrent reader sees the whole record or none
    except OSError as exc:
        log.warning("cannot record the probe check in %s (%s)", path.parent, exc)
