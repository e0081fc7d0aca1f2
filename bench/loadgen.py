"""Closed-loop async load generator for OpenAI-shaped embedding routes (loopback only, bounded in time and count).

Every response is checked: count, order (by `index`) and the cosine of each vector against the reference row.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import aiohttp
import numpy as np

try:
    import orjson

    _loads, _dumps = orjson.loads, orjson.dumps
except ImportError:  # stdlib fallback: a few per cent more client CPU
    _loads = json.loads

    def _dumps(obj: object) -> bytes:
        return json.dumps(obj).encode()


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    concurrency: int


SHAPES = [Shape("c1", 1, 1), Shape("c32", 1, 32), Shape("c128", 1, 128), Shape("b32c4", 32, 4),
          Shape("b256c1", 256, 1)]
QUICK_SHAPES = [Shape("c1", 1, 1), Shape("c32", 1, 32), Shape("b32c4", 32, 4)]


def select(names: str | None, quick: bool = False) -> list[Shape]:
    """The shapes named in a comma-separated list (all of them, or the quick set, when none are named)."""
    if not names:
        return QUICK_SHAPES if quick else SHAPES
    by_name = {shape.name: shape for shape in SHAPES}
    unknown = [name for name in names.split(",") if name not in by_name]
    if unknown:
        raise SystemExit(f"unknown load shape(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[name] for name in names.split(",")]


def assert_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing to send load to non-loopback host {host!r}")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100.0 * (len(ordered) - 1))))]


def min_cosine(vectors: np.ndarray, reference: np.ndarray) -> float:
    """Smallest cosine between matching rows; `reference` rows are unit length."""
    norms = np.linalg.norm(vectors, axis=1)
    return float(np.min(np.einsum("ij,ij->i", vectors, reference) / np.maximum(norms, 1e-12)))


def summarize(latencies: list[float], sentences: int, seconds: float, errors: list[str], cos: float) -> dict:
    return {"sentences": sentences, "requests": len(latencies), "seconds": round(seconds, 3),
            "sent_per_s": sentences / seconds if seconds else 0.0, "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3, "errors": len(errors), "first_errors": errors[:3],
            "min_cos": cos}


async def _load(url: str, model: str, corpus: list[str], reference: np.ndarray, shape: Shape, duration: float,
                max_requests: int, start: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    state = {"next": 0, "sentences": 0, "cos": 1.0}
    n = len(corpus)
    stop_at = time.perf_counter() + duration
    connector = aiohttp.TCPConnector(limit=shape.concurrency)
    timeout = aiohttp.ClientTimeout(total=max(120.0, duration * 2))  # a 256-sentence request on a busy machine
    headers = {"content-type": "application/json"}

    async def client(session: aiohttp.ClientSession) -> None:
        while state["next"] < max_requests and time.perf_counter() < stop_at:
            base = (start + state["next"] * shape.batch) % n
            state["next"] += 1
            rows = [(base + j) % n for j in range(shape.batch)]
            body = _dumps({"model": model, "input": [corpus[i] for i in rows], "encoding_format": "float"})
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        errors.append(f"HTTP {resp.status}: {raw[:160]!r}")
                        continue
                elapsed = time.perf_counter() - t0
                data = sorted(_loads(raw)["data"], key=lambda d: d["index"])
                vectors = np.asarray([d["embedding"] for d in data], dtype=np.float32)
                if vectors.shape[0] != shape.batch or vectors.shape[1] != reference.shape[1]:
                    errors.append(f"bad shape {vectors.shape} for {shape.batch} inputs")
                    continue
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError, IndexError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            state["cos"] = min(state["cos"], min_cosine(vectors, reference[rows]))
            latencies.append(elapsed)
            state["sentences"] += shape.batch

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t_start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(shape.concurrency)))
        seconds = time.perf_counter() - t_start
    return summarize(latencies, state["sentences"], seconds, errors, state["cos"])


def run(url: str, model: str, corpus: list[str], reference: np.ndarray, shape: Shape, duration: float,
        max_requests: int = 100_000, start: int = 0) -> dict:
    """One closed-loop run of `shape` for at most `duration` seconds (plus the requests already in flight)."""
    assert_loopback(url)
    return asyncio.run(_load(url, model, corpus, reference, shape, duration, max_requests, start))


def warm_up(url: str, model: str, corpus: list[str], reference: np.ndarray, shape: Shape, seconds: float) -> dict:
    """A short unrecorded run of the same shape (fills connection pools and the server's batcher)."""
    return run(url, model, corpus, reference, shape, seconds, max_requests=2 * shape.concurrency,
               start=len(corpus) // 2)
