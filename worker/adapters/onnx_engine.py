"""ONNX Runtime engine for dense encoders on CPU (worker process): export the loaded model once, cache it, verify it.

The graph is cached under a key made of the weights files' contents and the exporter's versions; any failure returns
None so that the adapter keeps its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import logging
import os
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("sie.worker.onnx")

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Files whose contents define the graph: the weights and the architecture.
_KEY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_KEY_FILES = ("config.json",)
_EXPORT_TEXTS = ["a short sentence", "another, somewhat longer sentence used to trace the export"]
# Lengths and padding unlike the export's, so a shape or mask baked into the trace shows up here.
_VERIFY_TEXTS = ["hi", "The quick brown fox jumps over the lazy dog near the river bank, twice.",
                 "Embedding servers batch sentences of very different lengths together."]
MIN_COSINE = 0.999
# Padded tokens of one batch above which the heap's free pages go back to the OS. With ORT's arena off, a 64 x 256
# batch leaves glibc holding ~600 MiB it will not return by itself; malloc_trim costs ~1 ms, a small batch's forward
# a few ms, so only batches at least this large pay for it (bench/onnx_memory.py).
TRIM_ABOVE_TOKENS = 4096


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None on a libc without it (musl, macOS)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


@dataclass
class OnnxEncoder:
    """An open session over a cached graph; `export_s` is None when the graph came from the cache.

    `lanes` calls run side by side, each on threads // lanes threads. On a small encoder one thread per call beats
    splitting every operator across threads under load (no barrier per operator, and a thread the tokeniser or the
    router preempts delays only its own micro-batch), while a lone request is faster on every thread
    (bench/README.md, "lanes").
    """

    session: Any
    path: Path
    input_names: list[str]
    export_s: float | None
    lanes: int = 1
    _executor: ThreadPoolExecutor | None = field(default=None, repr=False)

    def run_all(self, buckets: list[dict[str, torch.Tensor]]) -> list[np.ndarray]:
        """last_hidden_state for each padded bucket, in order; longest first across the lanes. After a large batch
        the heap is trimmed, so one long batch does not leave the worker holding its high-water mark."""
        hidden = self._run_buckets(buckets)
        if _MALLOC_TRIM is not None and sum(b["input_ids"].numel() for b in buckets) > TRIM_ABOVE_TOKENS:
            _MALLOC_TRIM(0)
        return hidden

    def _run_buckets(self, buckets: list[dict[str, torch.Tensor]]) -> list[np.ndarray]:
        if self.lanes == 1 or len(buckets) == 1:
            return [self.run(tensors) for tensors in buckets]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.lanes, thread_name_prefix="sie-onnx")
        order = sorted(range(len(buckets)), key=lambda i: -buckets[i]["input_ids"].numel())
        hidden = dict(zip(order, self._executor.map(self.run, [buckets[i] for i in order]), strict=True))
        return [hidden[i] for i in range(len(buckets))]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def run(self, tensors: dict[str, torch.Tensor]) -> np.ndarray:
        """last_hidden_state for one padded bucket of int64 tensors."""
        feed = {}
        for name in self.input_names:
            value = tensors.get(name)
            feed[name] = (value.numpy() if value is not None else np.zeros_like(feed["input_ids"])).astype(
                np.int64, copy=False)
        return self.session.run(None, feed)[0]

    def describe(self) -> str:
        how = f"exported in {self.export_s:.1f}s" if self.export_s is not None else "loaded from cache"
        return f"onnxruntime ({how}, cached at {self.path}; {self.lanes} lane(s))"


class _LastHidden(torch.nn.Module):
    """The encoder as a positional function of its inputs returning last_hidden_state, which the tracer needs."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, args, strict=True))).last_hidden_state


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "sie" / "onnx"


def input_names(model: torch.nn.Module, tokenizer: Any) -> list[str]:
    accepted = inspect.signature(model.forward).parameters
    produced = set(getattr(tokenizer, "model_input_names", INPUTS))
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in accepted and "token_type_ids" in produced:
        names.append("token_type_ids")
    return names


def cache_key(weights_dir: Path, names: list[str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{torch.__version__} opset{OPSET} {','.join(names)}".encode())
    for path in sorted(weights_dir.iterdir()):
        if path.is_file() and (path.suffix in _KEY_SUFFIXES or path.name in _KEY_FILES):
            digest.update(path.name.encode())
            with path.open("rb") as f:
                digest.update(hashlib.file_digest(f, "blake2b").digest())
    return digest.hexdigest()


def writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def export(model: torch.nn.Module, tokenizer: Any, names: list[str], out: Path) -> None:
    """Trace the encoder to `out` (opset 17, dynamic batch and sequence), leaving the model in eval mode."""
    sample = tokenizer(_EXPORT_TEXTS, padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
    wrapper = _LastHidden(model, names).eval()
    try:
        # The TorchScript exporter warns about itself and about traced Python branches; the verification run
        # after it is what decides whether the graph is right.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(sample[name] for name in names), str(out), input_names=names,
                              output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=OPSET,
                              dynamo=False)
    finally:
        model.eval()  # the exporter restores the training flag of the wrapper onto its children


def open_session(path: Path, threads_per_call: int, arena: bool = False) -> Any:
    """A CPU session. ORT's CPU arena is off by default: it keeps the high-water mark of the longest batch (a 64 x 256
    batch of MiniLM: 1.19 GiB RSS) and costs no throughput when off (bench/onnx_memory.py)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads_per_call
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify(model: torch.nn.Module, tokenizer: Any, encoder: OnnxEncoder) -> float:
    """The lowest cosine, over every real token of a padded batch, between torch's and the graph's hidden states."""
    batch = dict(tokenizer(_VERIFY_TEXTS, padding=True, pad_to_multiple_of=8, return_tensors="pt"))
    with torch.inference_mode():
        expected = model(**{k: v for k, v in batch.items() if k in encoder.input_names}).last_hidden_state.float()
    got = torch.from_numpy(encoder.run(batch))
    if got.shape != expected.shape:
        return -1.0
    mask = batch["attention_mask"].bool()
    return float(torch.nn.functional.cosine_similarity(expected[mask], got[mask], dim=-1).min())


def export_or_load(model: torch.nn.Module, tokenizer: Any, weights_dir: str | Path, cache_dir: str | Path | None,
                   threads: int = 0, lanes: int = 0, arena: bool = False) -> OnnxEncoder | None:
    """An ORT session equivalent to `model` (float32, CPU), exported on first use; None, with a warning, on failure.

    `lanes` calls run side by side on `threads` threads in all (0: one thread per call); `arena` turns ORT's CPU
    memory arena back on."""
    threads = threads or torch.get_num_threads()
    lanes = max(1, min(lanes or threads, threads))
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        log.warning("onnx engine unavailable (%s); using torch", exc)
        return None
    temp: Path | None = None
    try:
        names = input_names(model, tokenizer)
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        if not writable_dir(root):
            temp = Path(tempfile.mkdtemp(prefix="sie-onnx-"))
            log.warning("onnx cache %s is not writable; exporting into %s for this load only", root, temp)
            root = temp
        folder = root / cache_key(Path(weights_dir), names)
        path = folder / "model.onnx"
        export_s: float | None = None
        session = None
        if path.is_file():
            try:
                session = open_session(path, threads // lanes, arena)
            except Exception as exc:  # a torn or stale file: export it again
                log.warning("cached onnx graph %s does not open (%s); exporting it again", path, exc)
        if session is None:
            started = time.perf_counter()
            staging = Path(tempfile.mkdtemp(prefix=".export-", dir=root))
            try:
                export(model, tokenizer, names, staging / "model.onnx")
                shutil.rmtree(folder, ignore_errors=True)
                staging.rename(folder)  # atomic: a concurrent worker sees the whole graph or none
            except OSError:
                if not path.is_file():
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            export_s = time.perf_counter() - started
            session = open_session(path, threads // lanes, arena)
        encoder = OnnxEncoder(session=session, path=path, input_names=names, export_s=export_s, lanes=lanes)
        cosine = verify(model, tokenizer, encoder)
        if cosine < MIN_COSINE:
            log.warning("onnx graph %s disagrees with torch (lowest cosine %.6f < %s); using torch", path, cosine,
                        MIN_COSINE)
            return None
        return encoder
    except Exception as exc:
        log.warning("onnx export or session failed (%s: %s); using torch", type(exc).__name__, exc)
        return None
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)  # the session holds the graph in memory
