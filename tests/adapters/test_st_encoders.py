"""Every encoder a user brings, in-process: a tiny checkpoint per architecture, pooling mode and head, saved by
sentence-transformers in the layout it writes and in the classic one, served by the lean engine (OpenVINO, falling
back to ONNX Runtime, then torch) and by the torch engine, each compared with `SentenceTransformer.encode`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sie_worker.adapters import graph_cache
from sie_worker.adapters.base import BadInput
from sie_worker.adapters.dense import DenseAdapter
from sie_worker.adapters.dense_lean import LeanDenseAdapter
from sie_worker.export_graph import export_folder
from tests import precision
from tests.adapters.conftest import MakeAdapter, encode
from tests.sentences import SENTENCES
from tests.tiny_encoders import GELU, IDENTITY, TANH, Case, build_case

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

# Short and long texts: the long ones are over the cases' max_seq_length (48 tokens) and are truncated.
TEXTS = ["berlin", "what is the capital of france?", *SENTENCES[:10], " ".join(SENTENCES[10:16]),
         "Ünïcödé, emoji 🙂 and 数字 " * 12]
QWEN_PROMPTS = {"query": "Instruct: find the city\nQuery: ", "document": ""}
E5_PROMPTS = {"query": "query: ", "passage": "passage: "}

# name -> (case, the engine the lean path lands on, and why where it is not OpenVINO)
MATRIX: dict[str, tuple[Case, str]] = {case.name: (case, engine) for case, engine in [
    # Each architecture, pooled as its real embedders are.
    (Case("bert-e5-prompt", prompts=E5_PROMPTS, default_prompt_name="query"), "openvino"),
    (Case("roberta-mean", arch="roberta"), "openvino"),
    (Case("xlm-roberta-mean", arch="xlm-roberta"), "openvino"),
    (Case("mpnet-mean", arch="mpnet"), "openvino"),
    (Case("distilbert-mean", arch="distilbert", normalize=False), "openvino"),
    # OpenVINO's CPU plugin refuses DeBERTa-v2's `If` of dynamic rank: ONNX Runtime serves it.
    (Case("deberta-v2-mean", arch="deberta-v2"), "onnx"),
    (Case("electra-mean", arch="electra"), "openvino"),
    (Case("modernbert-mean", arch="modernbert"), "openvino"),
    (Case("t5-sentence-t5", arch="t5", dense=((24, IDENTITY),)), "openvino"),
    (Case("qwen2-last", arch="qwen2", pooling="lasttoken"), "openvino"),
    (Case("qwen3-last-prompts", arch="qwen3", pooling="lasttoken", prompts=QWEN_PROMPTS), "openvino"),
    (Case("mistral-last", arch="mistral", pooling="lasttoken"), "openvino"),
    (Case("llama-last", arch="llama", pooling="lasttoken", normalize=False), "openvino"),
    # Every pooling mode, concatenations and the prompt left out of pooling.
    (Case("bert-max", pooling="max"), "openvino"),
    (Case("bert-mean-sqrt-len", pooling="mean_sqrt_len_tokens", normalize=False), "openvino"),
    (Case("bert-weightedmean", pooling="weightedmean"), "openvino"),
    (Case("bert-lasttoken", pooling="lasttoken"), "openvino"),
    (Case("bert-cls-max-concat", pooling=("cls", "max")), "openvino"),
    (Case("bert-mean-no-prompt", prompts=E5_PROMPTS, default_prompt_name="query", include_prompt=False),
     "openvino"),
    (Case("qwen3-weightedmean-no-prompt", arch="qwen3", pooling="weightedmean", include_prompt=False,
          prompts=QWEN_PROMPTS, default_prompt_name="query"), "openvino"),
    # Dense heads: LaBSE (CLS, Dense with Tanh, Normalize), two layers with their activations, no Normalize.
    (Case("bert-labse", pooling="cls", dense=((24, TANH),)), "openvino"),
    (Case("bert-two-dense", dense=((48, GELU), (16, IDENTITY)), normalize=False), "openvino"),
    # The classic layout, its Dense weights in safetensors and, as sentence-transformers < 2.3 saved them, in
    # pytorch_model.bin, which the lean engines do not read: torch serves that one.
    (Case("classic-bert-max", pooling="max", layout="classic"), "openvino"),
    (Case("classic-labse", pooling="cls", dense=((24, TANH),), layout="classic"), "openvino"),
    (Case("classic-labse-bin", pooling="cls", dense=((24, TANH),), layout="classic", dense_bin=True), "torch"),
    # sentence_bert_config.json's do_lower_case over a cased tokenizer: lower-cased before tokenizing.
    (Case("classic-cased-lower-case", arch="bert-cased", layout="classic", do_lower_case=True), "openvino"),
    (Case("classic-t5-no-prompt", arch="t5", layout="classic", include_prompt=False, prompts=E5_PROMPTS,
          default_prompt_name="passage"), "openvino"),
]}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("st_encoders")


@pytest.fixture(scope="module")
def built(root: Path) -> dict[str, Path]:
    return {name: build_case(case, root) for name, (case, _) in MATRIX.items()}


@pytest.fixture(scope="module")
def cache(built: dict[str, Path], root: Path) -> Path:
    """The graph cache with every backbone exported, in this process (the helper process does the same, and its
    tests are elsewhere): the cases of one backbone share its graph, as their encoder files are the same."""
    cache = root / "graphs"
    for folder in built.values():
        target = cache / graph_cache.indexed_key(folder, cache)
        if not target.exists():
            export_folder(folder, target)
    return cache


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def engine_of(adapter: Any) -> str:
    return adapter.runtime_kind.replace("onnxruntime", "onnx") if isinstance(adapter, LeanDenseAdapter) else "torch"


def assert_same_vectors(got: np.ndarray, want: np.ndarray, adapter: Any) -> None:
    """Dimension, direction and norm as sentence-transformers', within the bars of the precision the engine runs
    (tests/precision.py); norms relatively, as these random heads are not normalised."""
    bf16 = isinstance(adapter, LeanDenseAdapter) and "bf16" in adapter.lanes.runtime.describe()
    assert got.shape == want.shape
    assert cosines(got, want).min() >= precision.tolerance("bfloat16" if bf16 else "float32").min_cosine
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=2e-2 if bf16 else 1e-3)


@pytest.mark.parametrize("name", list(MATRIX))
def test_each_checkpoint_answers_as_sentence_transformers(name: str, built: dict[str, Path], cache: Path,
                                                          make_adapter: MakeAdapter) -> None:
    from sentence_transformers import SentenceTransformer

    case, lean_engine = MATRIX[name]
    folder = built[name]
    want = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    for engine, expected in (("auto", lean_engine), ("torch", "torch")):
        adapter = make_adapter("dense", folder, threads=2, options={"engine": engine, "onnx_cache_dir": str(cache)})
        assert engine_of(adapter) == expected
        result = encode(adapter, TEXTS, ["dense"])
        assert max(result.token_counts) == case.max_seq_length, "long texts are cut where sentence-transformers cuts"
        assert_same_vectors(result.dense.numpy(), want, adapter)


@pytest.mark.parametrize("name", ["qwen3-last-prompts", "bert-mean-no-prompt"])
def test_named_prompts_and_no_prompt(name: str, built: dict[str, Path], cache: Path,
                                     make_adapter: MakeAdapter) -> None:
    """A batch's `prompt_name` is the checkpoint's prompt of that name, `prompt` a text of its own, "" none; a query
    batch naming none is encoded as `encode_query` encodes it."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(built[name]), device="cpu")
    for engine in ("auto", "torch"):
        adapter = make_adapter("dense", built[name], threads=2,
                               options={"engine": engine, "onnx_cache_dir": str(cache)})
        for options, want in (({"prompt_name": "query"}, reference.encode(TEXTS, prompt_name="query")),
                              ({"prompt": "search: "}, reference.encode(TEXTS, prompt="search: ")),
                              ({"prompt": ""}, reference.encode(TEXTS, prompt=""))):
            assert_same_vectors(encode(adapter, TEXTS, ["dense"], options=options).dense.numpy(), want, adapter)
        assert_same_vectors(encode(adapter, TEXTS, ["dense"], is_query=True).dense.numpy(),
                            reference.encode_query(TEXTS), adapter)
        with pytest.raises(BadInput, match="not one of this model's prompts"):
            encode(adapter, TEXTS[:1], ["dense"], options={"prompt_name": "nope"})


def test_a_request_may_pool_otherwise_but_not_into_a_dense_of_another_width(built: dict[str, Path], cache: Path,
                                                                           make_adapter: MakeAdapter) -> None:
    from sentence_transformers import SentenceTransformer

    plain = SentenceTransformer(str(built["bert-max"]), device="cpu")
    plain[1].pooling_mode = "weightedmean"
    want = plain.encode(TEXTS)
    for engine in ("auto", "torch"):
        options = {"engine": engine, "onnx_cache_dir": str(cache)}
        adapter = make_adapter("dense", built["bert-max"], threads=2, options=options)
        assert_same_vectors(encode(adapter, TEXTS, ["dense"], options={"pooling": "weightedmean"}).dense.numpy(),
                            want, adapter)
        labse = make_adapter("dense", built["bert-labse"], threads=2, options=options)
        with pytest.raises(BadInput, match="Dense module"):
            encode(labse, TEXTS[:1], ["dense"], options={"pooling": ["cls", "mean"]})
        with pytest.raises(BadInput, match="not computed"):
            encode(labse, TEXTS[:1], ["dense"], options={"pooling": "none"})


def test_the_lean_engine_hands_a_model_on_when_a_runtime_cannot_compile_it(
        built: dict[str, Path], cache: Path, make_adapter: MakeAdapter, caplog: pytest.LogCaptureFixture) -> None:
    """DeBERTa-v2 under OpenVINO: one warning line naming the reason, and ONNX Runtime serves it; asked for ONNX
    Runtime alone it serves at once, and the adapter reports its engine."""
    import logging

    with caplog.at_level(logging.WARNING, logger="sie.worker"):
        adapter = make_adapter("dense", built["deberta-v2-mean"], threads=2,
                               options={"engine": "openvino", "onnx_cache_dir": str(cache)})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("openvino cannot serve")
    assert "If operation with dynamic rank" in warnings[0] and warnings[0].endswith("serving it with onnxruntime")
    assert adapter.load().engine == "onnx"
    assert isinstance(make_adapter("dense", built["bert-max"], threads=2, options={"engine": "torch"}), DenseAdapter)
