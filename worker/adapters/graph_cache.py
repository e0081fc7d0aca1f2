"""Exported encoder graphs on disk (worker process, free of torch): where they live, what a complete one holds, and
how a lean worker gets one it lacks.

A cached graph is a folder named by a key over the checkpoint's files and the exporter's versions. It holds
everything a worker needs to serve the encoder without torch or transformers: the ONNX graph, the same graph in
OpenVINO's format, the fast tokenizer as one `tokenizer.json`, `graph.json` (input names, sizes, special ids, and
every file the export wrote with its size), and `probe.npz`, torch's float32 hidden states for a few short probe texts
and for a long one at the model's maximum length, which each runtime is checked against once per cache entry
(probe_record). The export itself runs in a short-lived helper process (`python -m sie_worker.export_graph`) so that
the worker that serves never maps torch's libraries; one per key at a time (export_lock).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sie_worker.adapters.batching import read_json
from sie_worker.adapters.export_lock import export_lock, export_slot, remove_stale_staging

log = logging.getLogger("sie.worker.graph")

# Bumped whenever the folder's contents change meaning, so that an older cache is exported again, not misread.
GRAPH_FORMAT = 6
# How a graph takes its inputs (graph.json's `layout`): padded rows [B, L], or a packed graph's real tokens end to end
# (adapters.packed_feed), which the runtime builds from the same padded feeds.
PADDED = "padded"
PACKED = "packed"
OPSET = 17
# Files whose contents define the graph or the tokenizer: weights, architecture and tokenizer configs, vocabularies.
KEY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model")
# OpenVINO writes the IR in the export, so its version is part of what the folder means.
EXPORTER_PACKAGES = ("torch", "transformers", "onnx", "openvino")
# sentence-transformers' files beside the encoder: what runs after the graph, read at every load, not baked into it.
NOT_GRAPH_FILES = frozenset({"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"})
# The files every graph folder has. graph.json lists the others with their sizes, OpenVINO's IR too where written.
FILES = ("model.onnx", "tokenizer.json", "graph.json", "probe.npz")
# probe.npz holds one batch per prefix: short texts of unlike lengths and padding, and a long text at the model's
# maximum length (capped at PROBE_MAX_LENGTH), where bf16's rounding accumulates most.
PROBE_BATCHES = ("", "long_")
# The long probe's length cap: 512 covers the common encoders' whole range; longer ones (8192) would cost the export
# seconds of float32 attention and gigabytes for one check.
PROBE_MAX_LENGTH = 512
# OpenVINO's own format of the same graph (float16 weights), written where the exporter had OpenVINO.
OPENVINO_IR = "openvino.xml"
# The lowest cosine, over every real token of the probe batch, that a runtime may have against torch in float32.
MIN_COSINE = 0.999
# The helper exits with this when the model cannot be served from a graph (a slow tokenizer, a disagreeing export).
NOT_EXPORTABLE = 3
# The most one ensure_graph waits for a graph: another worker's export of the key, then its own. Below the router's
# load timeout (Settings.load_timeout_s, 600 s), so a slow export ends in a warning and torch, with time left to load
# the model on torch, rather than in the router killing the worker (tests/adapters/test_graph_cache.py asserts it).
EXPORT_TIMEOUT_S = 420.0
# The router's load timeout leaves the worker at least this long after EXPORT_TIMEOUT_S to load the model on torch.
LOAD_AFTER_EXPORT_S = 120.0
# Called just before the export helper starts: the worker's loop sets it to tell the router, whose placement reserves
# the helper's memory (torch and the checkpoint) until the worker is ready.
on_export_start: Callable[[], None] | None = None
# What the graph computes after the backbone (`export_heads.head_model` builds each): `hidden`, the last hidden state
# [B, T, H] (dense; ColBERT, whose projection runs in numpy); `sequence_logits`, a sequence-classification head's
# logits [B, labels] over single texts or pairs (cross-encoders); `token_logits`, a token-classification head's logits
# [B, T, labels] (NER); `splade-<max|sum>-<relu|log1p_relu>`, a masked-LM's SPLADE term weights [B, vocabulary],
# pooled inside the graph so the [B, T, vocabulary] logits never leave it; `bge_m3`, the last hidden state as `hidden`
# plus BGE-M3's sparse and ColBERT linear heads in HYBRID_HEADS, read by numpy (their `.pt` files need torch to read).
HIDDEN = "hidden"
SEQUENCE_LOGITS = "sequence_logits"
TOKEN_LOGITS = "token_logits"
HYBRID = "bge_m3"
HYBRID_HEADS = "heads.npz"
# CLIP's towers with their projections: `clip_text` (input_ids, attention_mask -> text embeddings [B, D]) and
# `clip_image` (pixel_values -> image embeddings [B, D]), whose graph.json also holds the image steps (clip_pixels).
CLIP_TEXT = "clip_text"
CLIP_IMAGE = "clip_image"
# What the image steps depend on beyond the exporter: Pillow's resize kernels, and torchvision, whose presence makes
# transformers pick another image processor.
IMAGE_PACKAGES = ("pillow", "torchvision")
# How far a logit may be from torch's, relative to the probe's largest (at least 1): scores must stay within 0.02 of
# the reference's, and sigmoid or softmax move less than the logit does.
MAX_LOGIT_ERROR = 0.02
# How far a SPLADE term weight (of order 1) may be from torch's. Cosine alone is too lenient a bar here: bf16 keeps
# MiniLM-sized SPLADE at cosine 0.9997 but moves weights by up to 0.08 (its vocabulary logits run to 20), so bf16
# falls under this bar and the graph runs in float32.
MAX_SPLADE_ERROR = 2e-3


def splade_head(strategy: str, activation: str) -> str:
    return f"splade-{strategy}-{activation}"


def per_token_head(head: str) -> bool:
    """Whether the graph's output has a row per token [B, T, ...], so only the real tokens' rows are compared."""
    return head in (HIDDEN, HYBRID, TOKEN_LOGITS)


def hidden_state_head(head: str) -> bool:
    """Whether the graph's output is the encoder's last hidden state [B, T, H], judged by cosine per real token."""
    return head in (HIDDEN, HYBRID)


def pair_head(head: str) -> bool:
    """Whether the graph's inputs are (text, text) pairs, so its probe batch is made of pairs."""
    return head == SEQUENCE_LOGITS


@dataclass(frozen=True)
class Graph:
    """A complete cached graph and what its `graph.json` says."""

    folder: Path
    input_names: list[str]
    hidden_size: int
    pad_token_id: int
    model_max_length: int
    clean_up_tokenization_spaces: bool
    export_cosine: float
    temporary: bool = False  # in a temporary folder (the cache was not writable): remove it once the runtime opened
    head: str = HIDDEN
    output_width: int = 0  # the head's last dimension: hidden size, labels or vocabulary
    special_ids: dict[str, int] | None = None  # the tokenizer's special tokens by role (mask, pad, unk, cls, sep)
    layout: str = PADDED

    @property
    def packed(self) -> bool:
        return self.layout == PACKED

    @property
    def model_path(self) -> Path:
        return self.folder / "model.onnx"

    @property
    def openvino_path(self) -> Path:
        """OpenVINO's format of the graph where the exporter wrote it, else the ONNX file."""
        ir = self.folder / OPENVINO_IR
        return ir if ir.is_file() and ir.with_suffix(".bin").is_file() else self.model_path

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / "tokenizer.json"

    def probes(self) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Each probe batch's inputs and torch's float32 output of the head for them: the short texts (or pairs),
        then the long text."""
        with np.load(self.folder / "probe.npz") as data:
            return [({name: data[prefix + name] for name in self.input_names}, data[prefix + "hidden"])
                    for prefix in PROBE_BATCHES]


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "sie" / "graphs"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _key_files(weights_dir: Path) -> list[Path]:
    return [path for path in sorted(weights_dir.iterdir())
            if path.is_file() and path.suffix in KEY_SUFFIXES and path.name not in NOT_GRAPH_FILES]


# The sie_worker package folder: the export helper's modules, read by exporter_digest.
WORKER_DIR = Path(__file__).resolve().parent.parent


def exporter_sources(worker_dir: Path = WORKER_DIR) -> list[Path]:
    """The modules whose code decides what an export writes: the helper and its heads (`export_*.py`) and the packed
    layout it traces (`adapters/packed_feed.py`)."""
    return [*sorted(worker_dir.glob("export_*.py")), worker_dir / "adapters" / "packed_feed.py"]


@functools.cache
def exporter_digest(worker_dir: Path = WORKER_DIR) -> str:
    """A digest of `exporter_sources`' bytes, read, never imported (they import torch). In every cache key, so that a
    change to the export code re-exports even where nobody bumped GRAPH_FORMAT: a cache entry written by a
    prototype of the packed export once outlived its code and was what two rounds of benchmarks measured."""
    digest = hashlib.blake2b(digest_size=8)
    for path in exporter_sources(worker_dir):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _versions(head: str = HIDDEN) -> str:
    packages = EXPORTER_PACKAGES + (IMAGE_PACKAGES if head == CLIP_IMAGE else ())
    versions = " ".join(f"{name}={_version(name)}" for name in packages)
    return f"format{GRAPH_FORMAT} opset{OPSET} exporter={exporter_digest()} head={head} {versions}"


def cache_key(weights_dir: Path, head: str = HIDDEN) -> str:
    """A digest of the checkpoint's defining files, the head and the exporter's versions (read from package metadata:
    the serving worker never imports the exporter)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(_versions(head).encode())
    for path in _key_files(weights_dir):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "blake2b").digest())
    return digest.hexdigest()


def fingerprint(weights_dir: Path, head: str = HIDDEN) -> str:
    """Where the checkpoint is and its files' names, sizes, inodes, modification and change times: a cheap stand-in
    for their contents. The change time is set by the kernel on every write and cannot be set back, so a rewrite that
    keeps size and mtime (`cp -p`, `rsync -t`) changes it too."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{_versions(head)} {weights_dir.resolve()}".encode())
    for path in _key_files(weights_dir):
        stat = path.stat()
        digest.update(f"{path.name} {stat.st_size} {stat.st_dev} {stat.st_ino} {stat.st_mtime_ns} "
                      f"{stat.st_ctime_ns}".encode())
    return digest.hexdigest()


def indexed_key(weights_dir: Path, root: Path, head: str = HIDDEN) -> str:
    """`cache_key`, remembered under `root/index` by the files' fingerprint: hashing MiniLM's 90 MB took 0.37 s of
    a 1 s reload. A fingerprint whose files changed misses, and the contents are hashed again."""
    index = root / "index" / fingerprint(weights_dir, head)
    try:
        key = index.read_text().strip()
        if key:
            return key
    except OSError:
        pass
    key = cache_key(weights_dir, head)
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        staging = index.with_name(f".{index.name}.{os.getpid()}")
        staging.write_text(key)
        staging.replace(index)  # atomic: a concurrent reader sees the whole key or none
    except OSError as exc:
        log.warning("cannot remember the graph key in %s (%s)", index.parent, exc)
    return key


def writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def _file_sizes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in sorted(folder.iterdir()) if path.is_file()}


def complete(folder: Path, files: Any) -> bool:
    """Whether `folder` holds every file `graph.json` lists, each of the size the export wrote."""
    if not isinstance(files, dict) or not set(FILES) - {"graph.json"} <= set(files):
        return False
    try:
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, TypeError):
        return False


def read_graph(folder: Path, temporary: bool = False) -> Graph | None:
    """The graph in `folder`, or None unless `graph.json` is of this format and every file it lists is there."""
    meta = read_json(folder / "graph.json")
    if not isinstance(meta, dict) or meta.get("format") != GRAPH_FORMAT or not complete(folder, meta.get("files")):
        return None
    try:
        return Graph(folder=folder, input_names=list(meta["input_names"]), hidden_size=int(meta["hidden_size"]),
                     pad_token_id=int(meta["pad_token_id"]), model_max_length=int(meta["model_max_length"]),
                     clean_up_tokenization_spaces=bool(meta["clean_up_tokenization_spaces"]),
                     export_cosine=float(meta["export_cosine"]), temporary=temporary,
                     head=str(meta.get("head", HIDDEN)), output_width=int(meta.get("output_width", 0)),
                     special_ids={str(k): int(v) for k, v in (meta.get("special_ids") or {}).items()},
                     layout=str(meta.get("layout", PADDED)))
    except (KeyError, TypeError, ValueError):
        return None


def write_graph_meta(folder: Path, input_names: list[str], hidden_size: int, pad_token_id: int,
                     model_max_length: int, clean_up_tokenization_spaces: bool, export_cosine: float,
                     **head: Any) -> None:
    """Write `graph.json`, last: it lists every other file in `folder` with its size; `head` adds the head's fields
    (head, output_width, special_ids, layout)."""
    meta = {"format": GRAPH_FORMAT, "input_names": input_names, "hidden_size": hidden_size,
            "pad_token_id": pad_token_id, "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": clean_up_tokenization_spaces, "export_cosine": export_cosine, **head,
            "files": _file_sizes(folder)}
    (folder / "graph.json").write_text(json.dumps(meta, indent=1))


def min_agreement(head: str) -> float:
    """The bar `agreement` must reach for a runtime to serve a graph of this head."""
    if head in (SEQUENCE_LOGITS, TOKEN_LOGITS):
        return 1.0 - MAX_LOGIT_ERROR
    return 1.0 - MAX_SPLADE_ERROR if head.startswith("splade-") else MIN_COSINE


def agreement(head: str, expected: np.ndarray, got: np.ndarray, mask: np.ndarray | None) -> float:
    """How closely a runtime's output of the probe batch matches torch's, on the scale `min_agreement` judges: the
    lowest cosine per real token (hidden states) or per row (CLIP embeddings); for logits, 1 minus the largest error
    relative to the largest logit (at least 1), as a cosine of a one-label head's scalar says nothing, over the real
    tokens only for a token head (a padding row's logits are never read); for SPLADE weights, 1 minus the largest
    error. -1 where either side is not finite: a NaN compares false with every bar, so it would pass one."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # judged below, not warned about
        value = _agreement(head, expected, got, mask)
    return value if math.isfinite(value) else -1.0


def _agreement(head: str, expected: np.ndarray, got: np.ndarray, mask: np.ndarray | None) -> float:
    if per_token_head(head):
        assert mask is not None, "a per-token output is judged over its real tokens"
    if hidden_state_head(head):
        return masked_min_cosine(expected, got, mask)
    if head in (CLIP_TEXT, CLIP_IMAGE):  # one embedding per row
        return masked_min_cosine(expected, got, np.ones(expected.shape[:1], dtype=bool))
    if expected.shape != got.shape:
        return -1.0
    a, b = expected.astype(np.float64), got.astype(np.float64)
    if head == TOKEN_LOGITS:
        keep = mask.astype(bool)
        a, b = a[keep], b[keep]
    if head in (SEQUENCE_LOGITS, TOKEN_LOGITS):
        return 1.0 - float(np.abs(a - b).max() / max(1.0, float(np.abs(a).max())))
    return 1.0 - float(np.abs(a - b).max())


def masked_min_cosine(expected: np.ndarray, got: np.ndarray, mask: np.ndarray) -> float:
    """The lowest cosine between two [B, T, H] hidden states over the tokens where `mask` is set; -1 on a shape
    mismatch."""
    if expected.shape != got.shape:
        return -1.0
    keep = mask.astype(bool)
    a, b = expected[keep].astype(np.float64), got[keep].astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(((a * b).sum(axis=1) / np.maximum(norms, 1e-12)).min())


def _cache_root(cache_dir: str | Path | None) -> tuple[Path, bool]:
    """The cache's folder, and whether it is a temporary one because the cache is not writable."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    if writable_dir(root):
        return root, False
    temporary = Path(tempfile.mkdtemp(prefix="sie-graph-"))
    log.warning("graph cache %s is not writable; exporting into %s for this load only", root, temporary)
    return temporary, True


def ensure_graph(weights_dir: Path, cache_dir: str | Path | None, head: str = HIDDEN) -> Graph | None:
    """The checkpoint's cached graph of `head`, exported first by the helper process when missing or incomplete; None
    when it cannot be had within EXPORT_TIMEOUT_S (the caller serves the model with torch instead). A worker that finds
    another exporting the same key waits for its graph instead of exporting it again."""
    root, temporary = _cache_root(cache_dir)
    key = indexed_key(weights_dir, root, head)
    remove_stale_staging(root)
    graph = read_graph(root / key, temporary)
    if graph is not None:
        return graph
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    with export_lock(root, key, deadline) as lock:
        if lock is None:
            log.warning("another worker's export of %s took over %.0fs; serving it with torch", weights_dir,
                        EXPORT_TIMEOUT_S)
            return None
        remove_stale_staging(root, held=key)
        graph = read_graph(root / key, temporary)  # another worker's export, finished while this one waited
        if graph is None and _export(weights_dir, root / key, lock, deadline, head):
            graph = read_graph(root / key, temporary)
        return graph


def _export(weights_dir: Path, folder: Path, lock: int, deadline: float, head: str) -> bool:
    """Run the helper process under the key's `lock`, which it inherits (the key stays locked while it lives);
    whether it wrote the graph."""
    if folder.exists():  # a file gone or rewritten since the export: not trusted, exported again
        log.warning("graph %s is incomplete; exporting it again", folder)
        shutil.rmtree(folder, ignore_errors=True)
    with export_slot(folder.parent, deadline) as slot:
        if slot is None:
            log.warning("no export slot came free for %s within %.0fs; serving it with torch", weights_dir,
                        EXPORT_TIMEOUT_S)
            return False
        log.info("exporting %s to an ONNX graph in a helper process (first load of these weights)", weights_dir)
        if on_export_start is not None:
            on_export_start()
        command = [sys.executable, "-m", "sie_worker.export_graph", str(weights_dir), str(folder), str(os.getpid()),
                   *(["--head", head] if head != HIDDEN else [])]
        try:
            # The helper's log goes to our stderr, the server's log; its last line on stdout says why it failed. It
            # inherits the key's lock and the slot, so both stay held while it lives.
            done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                  timeout=max(1.0, deadline - time.monotonic()), check=False, pass_fds=(lock, slot))
        except subprocess.TimeoutExpired:
            log.warning("the graph export of %s took over %.0fs; serving it with torch", weights_dir,
                        EXPORT_TIMEOUT_S)
            return False
    if done.returncode != 0:
        how = "cannot be served from a graph" if done.returncode == NOT_EXPORTABLE else "export failed"
        why = (done.stdout.strip().splitlines() or [f"helper exit {done.returncode}"])[-1]
        log.warning("%s: %s (%s); serving it with torch", weights_dir, how, why)
        return False
    return True
