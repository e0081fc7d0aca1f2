"""Downloading a model from the Hugging Face Hub (router process, called from a thread).

`download` probes the repo once with a short, unretried request, so a missing repo, a refused token or an unreachable
hub is known within seconds; then `snapshot_download` fetches the files while a monitor thread logs files and bytes
at most every `PROGRESS_EVERY_S`. One download per repo at a time: concurrent callers wait for the first and then
find the files in the cache. `HF_ENDPOINT`, `HF_TOKEN` and `HF_HOME` apply as huggingface_hub reads them.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
from huggingface_hub import constants, snapshot_download
from huggingface_hub.utils import build_hf_headers

log = logging.getLogger("sie.hub")

PROBE_TIMEOUT_S = 5.0  # one connect-and-answer of the model-info API; the whole no-network failure stays under 10 s
ETAG_TIMEOUT_S = 5.0  # per-file metadata request inside snapshot_download
PROGRESS_EVERY_S = 3.0
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


class HubError(Exception):
    """A download that failed; `transient` when trying again later may succeed (hub overloaded or down)."""

    def __init__(self, message: str, *, transient: bool, unreachable: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.unreachable = unreachable  # no answer at all: a network blip as much as an air gap


def endpoint() -> str:
    return constants.ENDPOINT


def _repo_lock(repo: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(repo, threading.Lock())


def probe(repo: str, revision: str | None) -> None:
    """Raise `HubError` unless the hub answers the model-info API for `repo` at `revision`."""
    url = f"{endpoint()}/api/models/{repo}/revision/{quote(revision or 'main', safe='')}"
    try:
        response = httpx.get(url, headers=build_hf_headers(), timeout=PROBE_TIMEOUT_S, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise HubError(f"hub {endpoint()} unreachable ({type(exc).__name__}: {exc})", transient=False,
                       unreachable=True) from None
    if response.status_code in (401, 403, 404):
        raise HubError(f"hub {endpoint()} has no repo {repo!r} at revision {revision or 'main'!r} that this token "
                       f"may read (HTTP {response.status_code})", transient=False)
    if response.status_code >= 400:
        raise HubError(f"hub {endpoint()} answered HTTP {response.status_code} for {repo!r}",
                       transient=response.status_code in TRANSIENT_STATUS)


def _folder_bytes(folder: Path) -> tuple[int, int]:
    """(finished files, bytes written so far, partial files included) under a repo's cache folder."""
    files = done = 0
    for path in folder.rglob("*"):
        if path.is_file():
            done += path.stat().st_size
            files += not path.name.endswith(".incomplete")
    return files, done


def _log_progress(repo: str, folder: Path, stop: threading.Event) -> None:
    started = time.monotonic()
    while not stop.wait(PROGRESS_EVERY_S):
        files, done = _folder_bytes(folder / "blobs") if folder.is_dir() else (0, 0)
        log.info("downloading %s: %d file(s), %.1f MB after %.0fs", repo, files, done / 1e6,
                 time.monotonic() - started)


def download(repo: str, revision: str | None) -> Path:
    """The snapshot folder of `repo`, downloaded into the Hugging Face cache; `HubError` on failure."""
    with _repo_lock(repo):
        try:  # a caller that waited for another's download finds the files already here
            return Path(snapshot_download(repo, revision=revision, local_files_only=True))
        except (OSError, ValueError):
            pass
        probe(repo, revision)
        cache = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        stop = threading.Event()
        monitor = threading.Thread(target=_log_progress, args=(repo, cache, stop), name="sie-hub-progress",
                                   daemon=True)
        started = time.monotonic()
        log.info("downloading %s from %s", repo, endpoint())
        monitor.start()
        try:
            folder = Path(snapshot_download(repo, revision=revision, etag_timeout=ETAG_TIMEOUT_S,
                                            endpoint=endpoint()))
        except (OSError, ValueError, httpx.HTTPError) as exc:
            raise HubError(f"download of {repo!r} from {endpoint()} failed: {type(exc).__name__}: {exc}",
                           transient=True) from None
        finally:
            stop.set()
            monitor.join()
        files, size = _folder_bytes(cache / "blobs")
        log.info("downloaded %s: %d file(s), %.1f MB in %.1fs", repo, files, size / 1e6, time.monotonic() - started)
        return folder
