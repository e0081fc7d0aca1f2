"""The bare model in-process: sentence-transformers `encode`, same checkpoint and torch thread count as the server.

It also computes the reference vectors that every server response is checked against.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from loadgen import min_cosine, summarize


class Bare:
    def __init__(self, model_dir: Path, threads: int, device: str = "cpu", dtype: str = "float32") -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        # The weights in `dtype` (float16 on a GPU: what TEI and Infinity run, and our server's GPU default).
        self.model = SentenceTransformer(str(model_dir), device=device, model_kwargs={"dtype": getattr(torch, dtype)})

    def encode(self, texts: list[str], batch: int) -> np.ndarray:
        return self.model.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False)

    def reference(self, corpus: list[str]) -> np.ndarray:
        return self.encode(corpus, 32).astype(np.float32)

    def measure(self, corpus: list[str], reference: np.ndarray, batch: int, duration: float,
                max_calls: int = 100_000) -> dict:
        """Calls of `batch` sentences back to back, round robin over the corpus, for at most `duration` seconds."""
        n, latencies, sentences, cos = len(corpus), [], 0, 1.0
        self.encode(corpus[:batch], batch)  # warm-up at this batch size
        t_start = time.perf_counter()
        while len(latencies) < max_calls and time.perf_counter() - t_start < duration:
            rows = [(len(latencies) * batch + j) % n for j in range(batch)]
            t0 = time.perf_counter()
            vectors = self.encode([corpus[i] for i in rows], batch)
            latencies.append(time.perf_counter() - t0)
            sentences += batch
            cos = min(cos, min_cosine(vectors, reference[rows]))
        return summarize(latencies, sentences, time.perf_counter() - t_start, [], cos)

    def best_batch(self, corpus: list[str], reference: np.ndarray, sizes: list[int],
                   duration: float) -> tuple[int, dict]:
        """Try each batch size for `duration` seconds; the one with the most sentences/s wins."""
        sweep = {size: self.measure(corpus, reference, size, duration)["sent_per_s"] for size in sizes}
        return max(sweep, key=lambda size: sweep[size]), sweep

