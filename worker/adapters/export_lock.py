"""One graph export per cache key at a time, and at most `export_slots()` exports of any keys at once (worker
process): lock files per key and per slot, and the removal of the staging folders (`.export-<key>-<pid>-*`) that
exports killed mid-way leave behind.

The lock is `flock` on `<cache>/locks/<key>.lock`: the kernel releases it when its holders are gone, so a worker
SIGKILLed mid-export never leaves a key locked. The worker that exports hands the locked descriptor to its helper
process, so the key stays locked while either of them lives; a staging folder whose key nobody holds is therefore
left over, and removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("sie.worker.graph")

STAGING_PREFIX = ".export-"
# How often a worker waiting for another's export of the same key tries the lock: an export takes seconds to
# minutes, so a tenth of a second is noise in the wait and a handful of syscalls in the CPU.
RETRY_S = 0.1
_KEYED = re.compile(r"\.export-(?P<key>[0-9a-f]{32})-")
_UNKEYED = re.compile(r"\.export-(?P<pid>\d+)-")  # GRAPH_FORMAT 2's helpers named their staging by pid alone


def export_slots() -> int:
    """How many graph exports run side by side under one cache: one per two CPUs this process may use. Each helper
    runs torch on every thread and holds about 600 MiB; more of them at once only share the same cores (a server
    started with eight new models on 2 cores had every export take ~2 minutes together) and multiply the memory."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // 2)


def lock_path(root: Path, key: str) -> Path:
    return root / "locks" / f"{key}.lock"


def staging_prefix(key: str) -> str:
    """The prefix of a helper's staging folder for `key` (its pid and a random tail follow)."""
    return f"{STAGING_PREFIX}{key}-{os.getpid()}-"


def _open_lock(root: Path, key: str) -> int:
    path = lock_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def export_lock(root: Path, key: str, deadline: float) -> Iterator[int | None]:
    """The locked descriptor of `key`'s lock file, waiting for another worker's export of it until `deadline`
    (time.monotonic()); None when the deadline passed first. Released on exit."""
    fd = _open_lock(root, key)
    try:
        if not _try_lock(fd):
            log.info("waiting for another worker's export of graph %s", key)
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    yield None
                    return
                time.sleep(RETRY_S)
        yield fd
    finally:
        os.close(fd)  # releases the lock, unless a helper still holds a copy of the descriptor


@contextlib.contextmanager
def export_slot(root: Path, deadline: float) -> Iterator[int | None]:
    """The locked descriptor of a free export slot (`<cache>/locks/export-slot-<i>.lock`), waiting for one until
    `deadline` (time.monotonic()); None when the deadline passed first. Released on exit, unless the helper that
    inherited it still lives."""
    fds = [_open_lock(root, f"export-slot-{i}") for i in range(export_slots())]
    try:
        held = next((fd for fd in fds if _try_lock(fd)), None)
        if held is None:
            log.info("waiting for a free export slot (%d export(s) at a time under %s)", len(fds), root)
        while held is None and time.monotonic() < deadline:
            time.sleep(RETRY_S)
            held = next((fd for fd in fds if _try_lock(fd)), None)
        yield held
    finally:
        for fd in fds:
            os.close(fd)


def _key_free(root: Path, key: str) -> bool:
    """Whether no worker or helper holds `key`'s lock now."""
    try:
        fd = _open_lock(root, key)
    except OSError:
        return False
    try:
        return _try_lock(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(root: Path, held: str | None = None) -> None:
    """Remove the staging folders under `root` that no export is writing: those of a key whose lock is free (or is
    `held`, by the caller, which exports nothing yet), and the older pid-named ones whose helper is gone."""
    for staging in root.glob(f"{STAGING_PREFIX}*"):
        if keyed := _KEYED.match(staging.name):
            stale = keyed["key"] == held or _key_free(root, keyed["key"])
        elif unkeyed := _UNKEYED.match(staging.name):
            stale = not _alive(int(unkeyed["pid"]))
        else:
            continue
        if stale:
            log.info("removing %s, left by an export that did not finish", staging)
            shutil.rmtree(staging, ignore_errors=True)
