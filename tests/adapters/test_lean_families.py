"""The lean engine beyond dense: cross-encoders, SPLADE, ColBERT, classifiers and NER served from exported graphs under
OpenVINO and ONNX Runtime, against sentence-transformers' `CrossEncoder`, `SparseEncoder`, the ColBERT formula and
transformers' pipelines on the same checkpoints (BGE-M3: test_lean_hybrid.py); the shared fallback over runtimes (a
corrupt IR, a broken graph); and a worker per family that never imports torch or transformers."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder, SparseEncoder

from sie_worker.adapters import graph_cache, graph_runtime, lean_engine
from sie_worker.adapters.base import InputTooLong, UnsupportedTask
from sie_worker.adapters.cross_encoder import CrossEncoderAdapter
from sie_worker.adapters.lean_classifier import LeanClassifierAdapter
from sie_worker.adapters.lean_cross_encoder import LeanCrossEncoderAdapter
from sie_worker.adapters.lean_multivector import LeanMultivectorAdapter
from sie_worker.adapters.lean_ner import LeanNerAdapter
from sie_worker.adapters.lean_sparse import LeanSparseAdapter
from sie_worker.adapters.ner import NerAdapter
from sie_worker.protocol import EncodeBatch, ExtractBatch, ExtractResult, InputItem, ScoreBatch
from tests import declared, precision, tiny_extract_models, tiny_models
from tests.adapters.conftest import MakeAdapter, encode, multivector_items, score, sparse_items
from tests.extract_server import image_bytes
from tests.references import colbert as colbert_reference
from tests.sentences import SENTENCES

declared.module("openvino")
declared.module("onnxruntime")

PAIRS = [("what is the capital of france", doc) for doc in ["paris is the capital and largest city of france",
                                                             "berlin is in germany", *SENTENCES[:30]]]
TEXTS = ["what is the capital of france", *SENTENCES[:30], "berlin"]
COLBERT_QUERIES = ["what is the capital of france", "berlin", "query document passage search retrieval and more words"]
REPO = Path(__file__).resolve().parents[2]
ENGINES = [*(("openvino", p) for p in precision.cpu_precisions()), ("onnx", "float32")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("graphs")


@pytest.fixture(scope="module")
def sentiment_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_extract_models.build_sentiment(tmp_path_factory.mktemp("sentiment") / "model")


@pytest.fixture(scope="module")
def ner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_extract_models.build_ner(tmp_path_factory.mktemp("ner") / "model")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_extract_models.build_clip(tmp_path_factory.mktemp("clip") / "model")


@pytest.fixture(scope="module")
def typed_reranker(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A tiny reranker whose tokenizer gives pairs token types, as ms-marco MiniLM's does."""
    return tiny_models.build_cross_encoder_like(tmp_path_factory.mktemp("typed") / "reranker", minilm_dir)


def lean(make_adapter: MakeAdapter, family: str, weights: Path, cache: Path, engine: str = "auto",
         **fields: Any) -> Any:
    options = {"engine": engine, "onnx_cache_dir": str(cache), **fields.pop("options", {})}
    return make_adapter(family, weights, threads=2, options=options, **fields)


@pytest.mark.numeric
@pytest.mark.parametrize(("engine", "dtype"), ENGINES)
def test_a_lean_reranker_scores_as_cross_encoder_predict(make_adapter: MakeAdapter, typed_reranker: Path,
                                                         cache: Path, engine: str,
                                                         dtype: precision.Precision) -> None:
    adapter = lean(make_adapter, "cross_encoder", typed_reranker, cache, engine, compute_precision=dtype)
    assert isinstance(adapter, LeanCrossEncoderAdapter) and adapter.load().engine == engine
    reference = CrossEncoder(str(typed_reranker), device="cpu")
    result = score(adapter, PAIRS)
    tol = precision.tolerance(dtype)
    precision.assert_scores_close(result.scores.numpy(), reference.predict(PAIRS), tol, head=True)
    precision.assert_scores_close(result.raw.numpy(), reference.predict(PAIRS, activation_fn=torch.nn.Identity()),
                                  tol, head=True)


def test_pairs_are_tokenised_and_truncated_as_transformers_does(make_adapter: MakeAdapter, typed_reranker: Path,
                                                                cache: Path) -> None:
    """Token types included, longest first at max_length."""
    long_pairs = [(q * 3, doc * 5) for q, doc in PAIRS]
    reference = CrossEncoder(str(typed_reranker), device="cpu", max_length=24)
    adapter = lean(make_adapter, "cross_encoder", typed_reranker, cache, "onnx", max_sequence_length=24)
    assert "token_type_ids" in adapter.session.graph.input_names
    prepared = adapter.prepare(score_batch(long_pairs))
    features = reference.tokenizer([q for q, _ in long_pairs], [d for _, d in long_pairs], truncation=True,
                                   max_length=24)
    for indices, feed in prepared.inputs:
        for row, i in enumerate(indices):
            assert feed["input_ids"][row, :24].tolist() == features["input_ids"][i]
            assert feed["token_type_ids"][row, :24].tolist() == features["token_type_ids"][i]
    result = adapter.forward(prepared)
    assert result.token_counts == [24] * len(long_pairs)
    precision.assert_scores_close(result.scores.numpy(), reference.predict(long_pairs),
                                  precision.tolerance("float32"))
    with pytest.raises(InputTooLong):
        score(adapter, long_pairs, options={"truncate": False})


def score_batch(pairs: list[tuple[str, str]]) -> ScoreBatch:
    return ScoreBatch(batch_id=1, pairs=pairs)


@pytest.mark.numeric
@pytest.mark.parametrize(("engine", "dtype"), ENGINES)
def test_lean_splade_matches_sparse_encoder_on_the_real_checkpoint(make_adapter: MakeAdapter, splade_dir: Path,
                                                                   cache: Path, engine: str,
                                                                   dtype: precision.Precision) -> None:
    """The packaged SPLADE. bf16 misses the SPLADE bar on the probe (weights move by ~0.05), so an `auto` worker
    computes it in float32: the float32 bars hold whatever the CPU offers, unless bf16 was asked for by name."""
    expected = SparseEncoder(str(splade_dir), device="cpu").encode(TEXTS, convert_to_tensor=True).to_dense().numpy()
    adapter = lean(make_adapter, "sparse", splade_dir, cache, engine)
    assert isinstance(adapter, LeanSparseAdapter)
    assert adapter.load().dims == {"sparse": expected.shape[1]}
    got = sparse_items(encode(adapter, TEXTS, ["sparse"]), expected.shape[1])
    precision.assert_vectors_close(got, expected, precision.tolerance("float32"))
    assert "bf16" not in adapter.session.lanes.runtime.describe()


@pytest.mark.numeric
@pytest.mark.parametrize(("strategy", "activation"), [("max", "log1p_relu"), ("sum", "relu")])
def test_lean_splade_follows_the_checkpoint_pooling(strategy: str, activation: str, make_adapter: MakeAdapter,
                                                    mlm_dir: Path, cache: Path, tmp_path: Path) -> None:
    reference = SparseEncoder(str(mlm_dir), device="cpu")
    reference[1].pooling_strategy, reference[1].activation_function = strategy, activation
    reference.save(str(tmp_path))
    expected = reference.encode(TEXTS, convert_to_tensor=True).to_dense().numpy()
    adapter = lean(make_adapter, "sparse", tmp_path, cache, "onnx")
    assert isinstance(adapter, LeanSparseAdapter)
    assert adapter.session.graph.head == graph_cache.splade_head(strategy, activation)
    got = sparse_items(encode(adapter, TEXTS, ["sparse"]), expected.shape[1])
    precision.assert_vectors_close(got, expected, precision.tolerance("float32"))


@pytest.mark.numeric
@pytest.mark.parametrize(("engine", "dtype"), ENGINES)
@pytest.mark.parametrize("layout", ["stanford", "pylate"])
@pytest.mark.parametrize("is_query", [True, False], ids=["query", "doc"])
def test_lean_colbert_matches_the_colbert_formula(layout: str, is_query: bool, engine: str,
                                                  dtype: precision.Precision, make_adapter: MakeAdapter, cache: Path,
                                                  request: pytest.FixtureRequest) -> None:
    """Both checkpoint layouts; queries expanded with [MASK] to their cap, documents' punctuation rows dropped."""
    weights = request.getfixturevalue(f"colbert_{layout}_dir")
    texts = COLBERT_QUERIES if is_query else TEXTS
    adapter = lean(make_adapter, "multivector", weights, cache, engine, compute_precision=dtype)
    assert isinstance(adapter, LeanMultivectorAdapter)
    got = multivector_items(encode(adapter, texts, ["multivector"], is_query=is_query))
    expected = colbert_reference(layout, weights, texts, is_query)
    assert [len(rows) for rows in got] == [len(rows) for rows in expected]
    precision.assert_vectors_close(np.concatenate(got), np.concatenate(expected), precision.tolerance(dtype))


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", precision.cpu_precisions())
def test_a_lean_classifier_scores_as_the_pipeline_in_each_precision(make_adapter: MakeAdapter, sentiment_dir: Path,
                                                                   cache: Path, dtype: precision.Precision) -> None:
    from transformers import pipeline

    adapter = lean(make_adapter, "classifier", sentiment_dir, cache, "openvino", compute_precision=dtype)
    assert isinstance(adapter, LeanClassifierAdapter)
    batch = ExtractBatch(batch_id=1, items=[InputItem(text=t) for t in TEXTS])
    result = adapter.forward(adapter.prepare(batch))
    classify = pipeline("text-classification", model=str(sentiment_dir), top_k=None, device="cpu")
    for item, want in zip(result.items, classify(TEXTS), strict=True):
        assert [c.label for c in item.classifications] == [d["label"] for d in want]
        precision.assert_scores_close([c.score for c in item.classifications], [d["score"] for d in want],
                                      precision.tolerance(dtype), head=True)


NER_TEXTS = ["Alice lives in Paris and works for Acme Corporation.", "Bob moved from Berlin to London last year!",
             "Zyxxy Qworp, unseen-words & punctuation... in Kraków.", *SENTENCES[:20]]


def extract(adapter: Any, texts: list[str], labels: list[str] | None = None) -> ExtractResult:
    batch = ExtractBatch(batch_id=1, items=[InputItem(text=t) for t in texts], labels=labels or [])
    result = adapter.forward(adapter.prepare(batch))
    assert isinstance(result, ExtractResult)
    return result


def reference_probabilities(weights: Path, texts: list[str]) -> list[np.ndarray]:
    """transformers' float32 tag probabilities [tokens, tags] of each text run alone, as the pipeline runs it."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(weights)
    model = AutoModelForTokenClassification.from_pretrained(weights, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits[0], dim=-1).numpy()
                for text in texts]


@pytest.mark.numeric
@pytest.mark.parametrize(("engine", "dtype"), ENGINES)
def test_lean_ner_finds_the_pipelines_entities(make_adapter: MakeAdapter, ner_dir: Path, cache: Path, engine: str,
                                               dtype: precision.Precision) -> None:
    """Each token's tag is the reference's best, its score within the precision's bar for a head's score; and each
    text whose tags are all the reference's has the pipeline's entities (`aggregation_strategy="simple"`): same spans
    and labels, the text sliced from the input. In bf16 a tag may be another whose probability is within the bar of
    the best: the random head's near ties (top two 1e-3 apart) then go either way, as on a GPU in half precision."""
    from transformers import pipeline

    adapter = lean(make_adapter, "ner", ner_dir, cache, engine, compute_precision=dtype)
    assert isinstance(adapter, LeanNerAdapter) and adapter.load().engine == engine
    tol = precision.tolerance(dtype)
    prepared = adapter.prepare(ExtractBatch(batch_id=1, items=[InputItem(text=t) for t in NER_TEXTS]))
    scores, tags = adapter.tag(prepared)
    result = adapter.forward(prepared)
    pipeline_entities = pipeline("token-classification", model=str(ner_dir), aggregation_strategy="simple",
                                 device="cpu")(NER_TEXTS)
    compared = 0
    for i, probabilities in enumerate(reference_probabilities(ner_dir, NER_TEXTS)):
        rows = np.arange(len(probabilities))
        assert np.all(probabilities[rows, tags[i]] >= probabilities.max(axis=-1) - tol.head_score)
        precision.assert_scores_close(scores[i], probabilities[rows, tags[i]], tol, head=True)
        if dtype == "float32":
            assert tags[i] == probabilities.argmax(axis=-1).tolist()
        elif tags[i] != probabilities.argmax(axis=-1).tolist():
            continue
        got, want = result.items[i].entities, pipeline_entities[i]
        assert [(e.label, e.start, e.end) for e in got] == [(w["entity_group"], w["start"], w["end"]) for w in want]
        precision.assert_scores_close([e.score for e in got], [float(w["score"]) for w in want], tol, head=True)
        assert all(e.text == NER_TEXTS[i][e.start:e.end] for e in got)
        compared += len(got)
    assert compared >= 20, "the random head tags enough tokens for the comparison to mean something"


@pytest.mark.numeric
def test_lean_ner_truncates_narrows_and_refuses_as_the_torch_adapter(make_adapter: MakeAdapter, ner_dir: Path,
                                                                    cache: Path) -> None:
    """Texts cut at the maximum length, labels narrowing the tag set, and an encode batch refused, as `ner` does."""
    texts = [*NER_TEXTS[:3], " ".join(["Alice met Bob in Paris."] * 12)]
    lean_ner = lean(make_adapter, "ner", ner_dir, cache, "onnx", max_sequence_length=16)
    torch_ner = make_adapter("ner", ner_dir, max_sequence_length=16)
    assert isinstance(lean_ner, LeanNerAdapter) and isinstance(torch_ner, NerAdapter)
    every = {e.label for item in extract(torch_ner, texts).items for e in item.entities}
    for labels in ([], sorted(every)[:1]):
        got, want = extract(lean_ner, texts, labels), extract(torch_ner, texts, labels)
        assert got.token_counts == want.token_counts and max(got.token_counts) == 16
        assert [[(e.label, e.start, e.end, e.text) for e in item.entities] for item in got.items] == [
            [(e.label, e.start, e.end, e.text) for e in item.entities] for item in want.items]
        for mine, theirs in zip(got.items, want.items, strict=True):
            precision.assert_scores_close([e.score for e in mine.entities], [e.score for e in theirs.entities],
                                          precision.tolerance("float32"), head=True)
    assert {e.label for item in extract(lean_ner, texts, sorted(every)[:1]).items for e in item.entities} == set(
        sorted(every)[:1])
    with pytest.raises(UnsupportedTask):
        lean_ner.prepare(EncodeBatch(batch_id=1, items=[InputItem(text="x")], output_types=["dense"]))


def test_a_token_heads_agreement_reads_the_real_tokens_only() -> None:
    """Padding rows' logits are never read, so they may differ; a real token's error counts against the bar."""
    expected = np.zeros((1, 4, 3), dtype=np.float32)
    mask = np.array([[1, 1, 0, 0]])
    padding_off, token_off = expected.copy(), expected.copy()
    padding_off[0, 3] = 5.0
    token_off[0, 1, 2] = 0.5
    assert graph_cache.agreement(graph_cache.TOKEN_LOGITS, expected, padding_off, mask) == 1.0
    assert graph_cache.agreement(graph_cache.TOKEN_LOGITS, expected, token_off, mask) == 0.5
    assert graph_cache.min_agreement(graph_cache.TOKEN_LOGITS) == graph_cache.min_agreement(
        graph_cache.SEQUENCE_LOGITS)


def test_the_cache_key_covers_the_head(mlm_dir: Path) -> None:
    keys = {graph_cache.cache_key(mlm_dir, head) for head in (graph_cache.HIDDEN, graph_cache.SEQUENCE_LOGITS,
                                                               graph_cache.TOKEN_LOGITS,
                                                               graph_cache.splade_head("max", "relu"),
                                                               graph_cache.splade_head("sum", "relu"))}
    assert len(keys) == 5


def _garble(path: Path) -> None:
    """Rewrite `path` with bytes no runtime reads, keeping its size."""
    path.write_bytes(b"garbled " * (path.stat().st_size // 8) + b"!" * (path.stat().st_size % 8))


def test_a_corrupt_ir_falls_back_to_onnx_runtime_and_a_broken_graph_to_torch(
        make_adapter: MakeAdapter, cross_encoder_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Any runtime failure hands the graph on with one warning naming the reason; the load never fails for it."""
    cache = tmp_path / "graphs"
    graph = graph_cache.ensure_graph(cross_encoder_dir, cache, graph_cache.SEQUENCE_LOGITS)
    assert graph is not None
    # Damage the cache's size check cannot see (a file rewritten at its size): a changed size is exported again.
    _garble(graph.folder / "openvino.xml")  # the IR, no longer XML
    with caplog.at_level(logging.WARNING, logger="sie.worker"):
        adapter = lean(make_adapter, "cross_encoder", cross_encoder_dir, cache, compute_precision="bfloat16")
    assert isinstance(adapter, CrossEncoderAdapter), "bf16 has no runtime but OpenVINO: torch serves it"
    warned = [r.getMessage() for r in caplog.records if "cannot serve" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("openvino cannot serve") and "with torch" in warned[0]
    if precision.has_native_bf16():  # `auto` compiles the IR in bf16 (float32 reads the ONNX file, intact)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sie.worker"):
            adapter = lean(make_adapter, "cross_encoder", cross_encoder_dir, cache)
        assert isinstance(adapter, LeanCrossEncoderAdapter) and adapter.load().engine == "onnx"
        warned = [r.getMessage() for r in caplog.records if "cannot serve" in r.getMessage()]
        assert len(warned) == 1 and warned[0].startswith("openvino cannot serve")
        assert "serving it with onnxruntime" in warned[0]
    _garble(graph.folder / "model.onnx")
    adapter = lean(make_adapter, "cross_encoder", cross_encoder_dir, cache, compute_precision="float32")
    assert isinstance(adapter, CrossEncoderAdapter)
    reference = CrossEncoder(str(cross_encoder_dir), device="cpu")
    np.testing.assert_allclose(score(adapter, PAIRS).scores.numpy(), reference.predict(PAIRS),
                               atol=precision.TORCH_FLOAT32_ATOL)



# the thread a load's runtime call runs on -> (the deadline's module and name, what the warning names)
HUNG_CALLS = {"sie-probe": (graph_runtime, "PROBE_DEADLINE_S", r"probe check"),
              "sie-warm-up": (lean_engine, "WARM_UP_FLOOR_S", r"warm-up call \(\d+ x \d+ tokens\)")}


@pytest.mark.parametrize("thread", list(HUNG_CALLS))
def test_a_runtime_that_hangs_while_loading_hands_the_model_to_the_next(
        make_adapter: MakeAdapter, cross_encoder_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, thread: str) -> None:
    """An OpenVINO stream call of the probe check or of the warm-up that never returns is a hung runtime: ONNX Runtime
    serves the model, with one warning naming the call."""
    release = threading.Event()
    real_run = graph_runtime.OpenVinoRuntime.run

    def hangs(self: graph_runtime.OpenVinoRuntime, feed: dict[str, np.ndarray]) -> np.ndarray:
        if threading.current_thread().name == thread:
            release.wait()  # until the test ends: a call that never returns while the load waits on it
        return real_run(self, feed)

    module, deadline, what = HUNG_CALLS[thread]
    monkeypatch.setattr(graph_runtime.OpenVinoRuntime, "run", hangs)
    monkeypatch.setattr(module, deadline, 5.0)  # a tiny model's real calls take milliseconds
    try:
        with caplog.at_level(logging.WARNING, logger="sie.worker"):
            adapter = lean(make_adapter, "cross_encoder", cross_encoder_dir, tmp_path / "graphs",
                           compute_precision="float32")
    finally:
        release.set()
    assert isinstance(adapter, LeanCrossEncoderAdapter) and adapter.load().engine == "onnx"
    warned = [r.getMessage() for r in caplog.records if "cannot serve" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("openvino cannot serve"), warned
    assert re.search(what + r" did not return within \d+s", warned[0]), warned[0]
    assert "serving it with onnxruntime" in warned[0]
    reference = CrossEncoder(str(cross_encoder_dir), device="cpu")
    np.testing.assert_allclose(score(adapter, PAIRS).scores.numpy(), reference.predict(PAIRS),
                               atol=precision.TORCH_FLOAT32_ATOL)


FAMILY_SCRIPT = """
import sys
from sie_worker.adapters import build_adapter
from sie_worker.options import {options}
from sie_worker.protocol import {batch}, WorkerSpec
spec = WorkerSpec(worker_id="w", model="m", adapter={family!r}, weights_dir={weights!r}, threads=2,
                  to_worker_endpoint="inproc://a", from_worker_endpoint="inproc://b",
                  options={options}(engine="auto", onnx_cache_dir={cache!r}))
adapter = build_adapter(spec)
adapter.load()
adapter.forward(adapter.prepare({call}))
print(type(adapter).__name__, sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize(("family", "adapter_name"), [("cross_encoder", "LeanCrossEncoderAdapter"),
                                                      ("sparse", "LeanSparseAdapter"),
                                                      ("multivector", "LeanMultivectorAdapter"),
                                                      ("classifier", "LeanClassifierAdapter"),
                                                      ("ner", "LeanNerAdapter"),
                                                      ("hybrid", "LeanHybridAdapter"),
                                                      ("clip", "LeanClipAdapter")])
def test_a_lean_worker_of_each_family_never_imports_torch_or_transformers(
        family: str, adapter_name: str, cross_encoder_dir: Path, mlm_dir: Path, colbert_stanford_dir: Path,
        sentiment_dir: Path, ner_dir: Path, bge_m3_dir: Path, clip_dir: Path, cache: Path) -> None:
    """In a fresh interpreter, as `python -m sie_worker` runs it, once the family's graphs are cached."""
    weights = {"cross_encoder": cross_encoder_dir, "sparse": mlm_dir, "multivector": colbert_stanford_dir,
               "classifier": sentiment_dir, "ner": ner_dir, "hybrid": bge_m3_dir, "clip": clip_dir}[family]
    heads = {"cross_encoder": [graph_cache.SEQUENCE_LOGITS], "sparse": [graph_cache.splade_head("max", "relu")],
             "multivector": [graph_cache.HIDDEN], "classifier": [graph_cache.SEQUENCE_LOGITS],
             "ner": [graph_cache.TOKEN_LOGITS], "hybrid": [graph_cache.HYBRID],
             "clip": [graph_cache.CLIP_TEXT, graph_cache.CLIP_IMAGE]}[family]
    assert all(graph_cache.ensure_graph(weights, cache, head) is not None for head in heads)
    encode_call = 'EncodeBatch(batch_id=1, items=[InputItem(text="hello")], output_types={!r})'
    call = {"cross_encoder": 'ScoreBatch(batch_id=1, pairs=[("q", "d")])',
            "sparse": encode_call.format(["sparse"]), "multivector": encode_call.format(["multivector"]),
            "classifier": 'ExtractBatch(batch_id=1, items=[InputItem(text="hello")])',
            "ner": 'ExtractBatch(batch_id=1, items=[InputItem(text="Alice lives in Paris")])',
            "hybrid": encode_call.format(["dense", "sparse", "multivector"]),
            "clip": 'EncodeBatch(batch_id=1, items=[InputItem(text="hello"), InputItem(images=[{!r}])], '
                    'output_types=["dense"])'.format(image_bytes("PNG"))}[family]
    options = {"cross_encoder": "CrossEncoderOptions", "sparse": "SparseOptions",
               "multivector": "MultivectorOptions", "classifier": "ClassifierOptions",
               "ner": "NerOptions", "hybrid": "HybridOptions", "clip": "ClipOptions"}[family]
    batch = {"cross_encoder": "ScoreBatch", "classifier": "ExtractBatch, InputItem",
             "ner": "ExtractBatch, InputItem"}.get(family, "EncodeBatch, InputItem")
    script = FAMILY_SCRIPT.format(options=options, batch=batch, family=family, weights=str(weights),
                                  cache=str(cache), call=call)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == f"{adapter_name} []"
