"""Packed graphs (export_packed, adapters.packed_feed): the layout of a packed call, and BERT, RoBERTa and XLM-R
exported packed computing what transformers and the padded export compute, under both runtimes; the encoders the
packed forward does not reproduce, and a packed graph that disagrees with torch, are exported padded."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from sie_worker import export_graph
from sie_worker.adapters import graph_cache, graph_runtime
from sie_worker.adapters.packed_feed import COMPUTED, PACKED_INPUTS, TOKEN_MULTIPLE, graph_inputs, pack
from sie_worker.export_packed import PackedEncoder
from tests import declared
from tests.sentences import SENTENCES
from tests.tiny_encoders import build_backbone

declared.module("onnxruntime")
declared.module("openvino")

TEXTS = ["berlin", "what is the capital of france?", *SENTENCES[:6], " ".join(SENTENCES[6:12])]


def padded_feed(lengths: list[int], width: int) -> dict[str, np.ndarray]:
    """Rows of distinct token ids (row i's tokens 100 i + 1, 100 i + 2, ...), each row's real tokens first."""
    ids = np.zeros((len(lengths), width), np.int64)
    mask, types = np.zeros_like(ids), np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n], types[i, :n] = 100 * i + np.arange(1, n + 1), 1, i % 2
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def test_pack_lays_each_rows_real_tokens_end_to_end_and_indexes_both_ways() -> None:
    lengths, width = [3, 7, 1, 6], 8
    feed = padded_feed(lengths, width)
    packed = pack(feed)
    assert list(packed) == list(PACKED_INPUTS)
    real = sum(lengths)  # 17: rounded up to the next multiple with spare tokens
    total = -(-real // TOKEN_MULTIPLE) * TOKEN_MULTIPLE
    assert total > real and all(packed[name].shape == (total,) for name in PACKED_INPUTS
                               if name not in ("gather_index", "attention_mask"))
    rows = [feed["input_ids"][i, :n] for i, n in enumerate(lengths)]
    np.testing.assert_array_equal(packed["input_ids"][:real], np.concatenate(rows))
    np.testing.assert_array_equal(packed["position_ids"][:real], np.concatenate([np.arange(n) for n in lengths]))
    np.testing.assert_array_equal(packed["token_type_ids"][:real], np.concatenate([[i % 2] * n
                                                                                   for i, n in enumerate(lengths)]))
    assert not packed["input_ids"][real:].any() and not packed["unpad_index"][real:].any()
    # Padded rows from the flat tokens (a row of zeros appended at index `total`), and the flat tokens back.
    flat = np.concatenate([packed["input_ids"], [0]])
    np.testing.assert_array_equal(flat[packed["gather_index"]], feed["input_ids"] * feed["attention_mask"])
    assert (packed["gather_index"][feed["attention_mask"] == 0] == total).all()
    np.testing.assert_array_equal(feed["input_ids"].reshape(-1)[packed["unpad_index"][:real]],
                                  packed["input_ids"][:real])
    np.testing.assert_array_equal(packed["attention_mask"], feed["attention_mask"])


def test_a_feed_without_token_types_packs_zeros() -> None:
    feed = padded_feed([2, 5], 8)
    del feed["token_type_ids"]
    packed = pack(feed)
    assert packed["token_type_ids"].shape == packed["input_ids"].shape and not packed["token_type_ids"].any()


def test_tokens_read_but_not_attended_to_are_packed_too() -> None:
    feed = padded_feed([2, 5], 8)
    feed[COMPUTED] = np.zeros_like(feed["attention_mask"])
    feed[COMPUTED][0, 2:6] = 1  # row 0: two attended tokens, then four [MASK]s that only read
    packed = pack(feed)
    total = len(packed["input_ids"])
    assert total >= 11 and (packed["gather_index"][0, :6] == np.arange(6)).all()
    assert (packed["gather_index"][0, 6:] == total).all() and (packed["gather_index"][1, :5] == np.arange(6, 11)).all()
    np.testing.assert_array_equal(packed["attention_mask"], feed["attention_mask"])  # attention still ignores them
    assert COMPUTED not in graph_inputs(feed) and set(graph_inputs(feed)) == set(feed) - {COMPUTED}


def real_tokens(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return hidden[mask.astype(bool)]


@pytest.mark.parametrize("arch", ["bert", "roberta", "xlm-roberta"])
def test_a_packed_graph_computes_what_transformers_and_the_padded_graph_do(arch: str, tmp_path: Path) -> None:
    weights = build_backbone(arch, tmp_path / arch)
    export_graph.export_folder(weights, tmp_path / "packed")
    export_graph.export_folder(weights, tmp_path / "padded", padded=True)
    packed, padded = graph_cache.read_graph(tmp_path / "packed"), graph_cache.read_graph(tmp_path / "padded")
    assert packed is not None and padded is not None
    assert packed.packed and not padded.packed
    assert packed.input_names == padded.input_names  # a worker feeds both alike

    tokenizer = AutoTokenizer.from_pretrained(weights)
    batch = tokenizer(TEXTS, padding=True, pad_to_multiple_of=8, return_tensors="np")
    feed = {name: np.asarray(batch[name], np.int64) for name in packed.input_names}
    with torch.inference_mode():
        want = AutoModel.from_pretrained(weights).eval()(**{k: torch.from_numpy(v) for k, v in feed.items()})
    want_tokens = real_tokens(want.last_hidden_state.numpy(), feed["attention_mask"])
    for runtime in (graph_runtime.OrtRuntime(packed, threads=1, lanes=1),
                    graph_runtime.OpenVinoRuntime(packed, threads=1, lanes=1, precision="float32")):
        got = runtime.run(feed)
        assert got.shape == want.last_hidden_state.shape
        assert not got[feed["attention_mask"] == 0].any(), "padding is zeros in a packed graph's output"
        np.testing.assert_allclose(real_tokens(got, feed["attention_mask"]), want_tokens, atol=2e-5, rtol=0)
    from_padded = graph_runtime.OrtRuntime(padded, threads=1, lanes=1).run(feed)
    np.testing.assert_allclose(real_tokens(from_padded, feed["attention_mask"]), want_tokens, atol=2e-5, rtol=0)


def openvino_ir_output(graph: graph_cache.Graph, feed: dict[str, np.ndarray]) -> np.ndarray:
    """What the graph's OpenVINO file (the bf16 engine's; float16 weights) computes on `feed` in float32."""
    import openvino as ov

    assert graph.openvino_path.suffix == ".xml", "OpenVINO's own format, not the ONNX file"
    compiled = ov.Core().compile_model(graph.openvino_path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled(pack(feed))[0])


def test_a_packed_graphs_openvino_ir_is_converted_from_torch_with_one_attention_op_a_layer(tmp_path: Path) -> None:
    """The bf16 engine's file: attention as OpenVINO's ScaledDotProductAttention (one fused kernel), not ONNX's seven
    ops; the inputs named and ordered as a packed feed, and the same numbers as transformers (float16 weights)."""
    import openvino as ov

    weights = build_backbone("bert", tmp_path / "bert")
    export_graph.export_folder(weights, tmp_path / "packed")
    graph = graph_cache.read_graph(tmp_path / "packed")
    assert graph is not None and graph.packed
    model = ov.Core().read_model(graph.openvino_path)
    ops = [op.get_type_name() for op in model.get_ordered_ops()]
    layers = AutoModel.from_pretrained(weights).config.num_hidden_layers
    assert ops.count("ScaledDotProductAttention") == layers and "IsNaN" not in ops and "Softmax" not in ops
    assert [port.get_any_name() for port in model.inputs] == list(PACKED_INPUTS)
    assert model.outputs[0].get_any_name() == "output"

    tokenizer = AutoTokenizer.from_pretrained(weights)
    batch = tokenizer(TEXTS, padding=True, pad_to_multiple_of=8, return_tensors="np")
    feed = {name: np.asarray(batch[name], np.int64) for name in graph.input_names}
    with torch.inference_mode():
        want = AutoModel.from_pretrained(weights).eval()(**{k: torch.from_numpy(v) for k, v in feed.items()})
    got = openvino_ir_output(graph, feed)
    assert got.shape == want.last_hidden_state.shape
    np.testing.assert_allclose(real_tokens(got, feed["attention_mask"]),
                               real_tokens(want.last_hidden_state.numpy(), feed["attention_mask"]), atol=2e-3, rtol=0)


@pytest.mark.parametrize("arch", ["distilbert", "mpnet"])
def test_an_encoder_the_packed_forward_does_not_reproduce_is_exported_padded(arch: str, tmp_path: Path) -> None:
    weights = build_backbone(arch, tmp_path / arch)
    export_graph.export_folder(weights, tmp_path / "graph")
    graph = graph_cache.read_graph(tmp_path / "graph")
    assert graph is not None and graph.layout == graph_cache.PADDED


class Disagreeing(PackedEncoder):
    """A packed forward that is wrong: its hidden states point the other way."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return -super().forward(*inputs)


def test_a_packed_graph_that_disagrees_with_torch_is_exported_padded(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    weights = build_backbone("bert", tmp_path / "bert")
    monkeypatch.setattr(export_graph, "PackedEncoder", Disagreeing)
    with caplog.at_level(logging.WARNING, logger="sie.worker.export"):
        cosine = export_graph.export_folder(weights, tmp_path / "graph")
    graph = graph_cache.read_graph(tmp_path / "graph")
    assert graph is not None and graph.layout == graph_cache.PADDED and cosine > 0.99999
    assert "packed graph" in caplog.text and "exporting it padded" in caplog.text


def test_a_packed_graph_computes_the_expansion_tokens_attention_ignores(tmp_path: Path) -> None:
    """ColBERT's query expansion: [MASK] tokens after the query, attended to by none, each returned as a vector."""
    weights = build_backbone("bert", tmp_path / "bert")
    export_graph.export_folder(weights, tmp_path / "packed")
    graph = graph_cache.read_graph(tmp_path / "packed")
    assert graph is not None and graph.packed
    tokenizer = AutoTokenizer.from_pretrained(weights)
    batch = tokenizer(TEXTS[:3], padding="max_length", max_length=16, truncation=True, return_tensors="np")
    feed = {name: np.asarray(batch[name], np.int64) for name in graph.input_names}
    feed["input_ids"][feed["attention_mask"] == 0] = tokenizer.mask_token_id
    with torch.inference_mode():
        want = AutoModel.from_pretrained(weights).eval()(**{k: torch.from_numpy(v) for k, v in feed.items()})
    got = graph_runtime.OrtRuntime(graph, threads=1, lanes=1).run({**feed, COMPUTED: np.ones_like(feed["input_ids"])})
    np.testing.assert_allclose(got, want.last_hidden_state.numpy(), atol=2e-5, rtol=0)


def classifier_checkpoint(arch: str, kind: str, folder: Path) -> Path:
    """A tiny seeded sequence or token classifier over the architecture's tiny backbone and tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    backbone = build_backbone(arch, folder / "backbone")
    config = AutoConfig.from_pretrained(backbone, num_labels=3)
    torch.manual_seed(1)
    sequence = kind == graph_cache.SEQUENCE_LOGITS
    auto = AutoModelForSequenceClassification if sequence else AutoModelForTokenClassification
    auto.from_config(config).eval().save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(backbone).save_pretrained(folder / "model")
    return folder / "model"


@pytest.mark.parametrize("kind", [graph_cache.SEQUENCE_LOGITS, graph_cache.TOKEN_LOGITS])
@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_a_packed_classifier_gives_transformers_logits(arch: str, kind: str, tmp_path: Path) -> None:
    """Cross-encoders (pairs, the [CLS] row through BERT's pooler or RoBERTa's head) and token classifiers."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    weights = classifier_checkpoint(arch, kind, tmp_path)
    export_graph.export_folder(weights, tmp_path / "graph", kind)
    graph = graph_cache.read_graph(tmp_path / "graph")
    assert graph is not None and graph.packed and graph.head == kind
    tokenizer = AutoTokenizer.from_pretrained(weights)
    if kind == graph_cache.SEQUENCE_LOGITS:
        batch = tokenizer(TEXTS[:4], TEXTS[4:8], padding=True, return_tensors="np")
        auto: type = AutoModelForSequenceClassification
    else:
        batch = tokenizer(TEXTS, padding=True, return_tensors="np")
        auto = AutoModelForTokenClassification
    feed = {name: np.asarray(batch[name], np.int64) for name in graph.input_names}
    with torch.inference_mode():
        want = auto.from_pretrained(weights).eval()(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    got = graph_runtime.OrtRuntime(graph, threads=1, lanes=1).run(feed)
    from_ir = openvino_ir_output(graph, feed)  # the bf16 engine's file, converted from torch
    if kind == graph_cache.TOKEN_LOGITS:  # a padding row's logits are never read
        got, want = real_tokens(got, feed["attention_mask"]), real_tokens(want, feed["attention_mask"])
        from_ir = real_tokens(from_ir, feed["attention_mask"])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    np.testing.assert_allclose(from_ir, want, atol=2e-3, rtol=0)
