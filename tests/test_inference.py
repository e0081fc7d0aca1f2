"""Family inference from a checkpoint's files (router/models/inference.py), on tiny checkpoints in their real
layouts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sie_router.models.inference import CannotInfer, infer_config, infer_family
from tests import tiny_encoders
from tests import tiny_extract_models as tiny_extract
from tests import tiny_models as tiny

LAYOUTS: dict[str, tuple[Callable[[Path], Path], str, dict[str, object]]] = {
    "dense-st": (tiny.build_dense_st, "dense", {"encode": {"dense": {"dim": 32}}}),
    "sparse-st": (tiny.build_sparse_st, "sparse", {}),
    "mlm": (tiny.build_mlm, "sparse", {}),
    "colbert-ir": (tiny.build_colbert_stanford, "multivector", {"encode": {"multivector": {"dim": tiny.COLBERT_DIM}}}),
    "pylate": (tiny.build_colbert_pylate, "multivector", {"encode": {"multivector": {"dim": tiny.COLBERT_DIM}}}),
    "bge-m3": (tiny.build_bge_m3, "hybrid", {}),
    "cross-encoder": (tiny.build_cross_encoder, "cross_encoder", {"score": {}}),
    "nli": (tiny_extract.build_nli, "classifier", {"extract": {}}),
    "sentiment": (tiny_extract.build_sentiment, "classifier", {"extract": {}}),
    "ner": (tiny_extract.build_ner, "ner", {"extract": {}}),
    "clip": (tiny_extract.build_clip, "clip", {"encode": {"dense": {"dim": 16}}}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_is_its_own_family(tmp_path: Path, layout: str) -> None:
    build, family, tasks = LAYOUTS[layout]
    found = infer_family(build(tmp_path / layout))
    assert found.family == family and found.reason
    if tasks:
        assert found.tasks == tasks
    assert found.inputs == ({"text": True, "image": True} if family == "clip" else {})


def test_gliner_and_bge_m3_files_outrank_the_encoder_beside_them(tmp_path: Path) -> None:
    folder = tiny.build_dense_st(tmp_path / "m")
    (folder / "gliner_config.json").write_text("{}")
    assert infer_family(folder).family == "gliner"
    folder = tiny.build_dense_st(tmp_path / "m3")  # BGE-M3 ships modules.json and 1_Pooling too
    (folder / "colbert_linear.pt").write_bytes(b"")
    (folder / "sparse_linear.pt").write_bytes(b"")
    found = infer_family(folder)
    assert found.family == "hybrid" and set(found.tasks["encode"]) == {"dense", "sparse", "multivector"}


def test_a_bare_encoder_is_dense_with_mean_pooling_and_says_so(tmp_path: Path) -> None:
    folder = tiny.build_dense_st(tmp_path / "m")
    (folder / "modules.json").unlink()
    found = infer_family(folder)
    assert found.family == "dense" and "mean pooling" in found.reason


def _without(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _modules_with(folder: Path, kind: str) -> Path:
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps([*modules, {"idx": 3, "name": "3", "path": "3", "type": kind}]))
    return folder


def _architecture(folder: Path, name: str) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": [name]}))
    return folder


UNKNOWN: dict[str, tuple[Callable[[Path], Path], str]] = {
    "half a BGE-M3": (lambda f: _without(tiny.build_bge_m3(f), "sparse_linear.pt"), "colbert_linear.pt"),
    "a LayerNorm after pooling": (lambda f: _modules_with(tiny.build_dense_st(f),
                                                           "sentence_transformers.models.LayerNorm"), "LayerNorm"),
    "a custom module": (lambda f: _modules_with(tiny.build_dense_st(f), "custom_st.Projection"),
                        "custom_st.Projection (3) is not computed"),
    "an inference-free SPLADE": (lambda f: _modules_with(tiny.build_sparse_st(f),
                                                          "sentence_transformers.models.Router"), "Router"),
    "a decoder": (lambda f: _architecture(_without(tiny.build_dense_st(f), "modules.json"), "LlamaForCausalLM"),
                  "LlamaForCausalLM"),
    "no config.json": (lambda f: _without(tiny.build_mlm(f), "config.json"), "config.json"),
}


@pytest.mark.parametrize("case", list(UNKNOWN))
def test_files_of_no_known_family_are_never_served_as_dense(tmp_path: Path, case: str) -> None:
    build, found = UNKNOWN[case]
    folder = build(tmp_path / "m")
    with pytest.raises(CannotInfer) as caught:
        infer_config(str(folder), offline=True)
    assert found in str(caught.value) and "--adapter" in str(caught.value) and str(folder) in str(caught.value)


def test_the_adapter_flag_names_the_family_the_files_do_not(tmp_path: Path) -> None:
    folder = _without(tiny.build_bge_m3(tmp_path / "m"), "sparse_linear.pt")
    config = infer_config(str(folder), offline=True, adapter="dense")
    assert config.family() == "dense" and config.tasks == {"encode": {"dense": {"dim": 32}}}
    assert infer_config(str(folder), offline=True, adapter="colbert").family() == "multivector"  # SIE's names too
    with pytest.raises(CannotInfer, match="unknown adapter 'bogus'"):
        infer_config(str(folder), offline=True, adapter="bogus")


def _st6(folder: Path) -> Path:
    """The checkpoint rewritten in the layout sentence-transformers 5/6 writes: new module type names, one
    `pooling_mode` key, no `max_seq_length`."""
    renamed = {"Transformer": "sentence_transformers.base.modules.transformer.Transformer",
               "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
               "Normalize": "sentence_transformers.base.modules.normalize.Normalize",
               "MLMTransformer": "sentence_transformers.sparse_encoder.modules.mlm_transformer.MLMTransformer",
               "SpladePooling": "sentence_transformers.sparse_encoder.modules.splade_pooling.SpladePooling"}
    modules = json.loads((folder / "modules.json").read_text())
    for module in modules:
        module["type"] = renamed[module["type"].rsplit(".", 1)[-1]]
    (folder / "modules.json").write_text(json.dumps(modules))
    if (folder / "1_Pooling").is_dir():
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32,
                                                                       "pooling_mode": "cls"}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"transformer_task": "feature-extraction"}))
    return folder


def test_the_layout_sentence_transformers_5_and_6_write_infers_as_the_classic_one(tmp_path: Path) -> None:
    classic = infer_config(str(tiny.build_dense_st(tmp_path / "classic")), offline=True)
    new = infer_config(str(_st6(tiny.build_dense_st(tmp_path / "new"))), offline=True)
    assert (classic.family(), new.family()) == ("dense", "dense") and new.tasks == classic.tasks
    assert (classic.max_sequence_length, new.max_sequence_length) == (64, None)  # 5/6 leave it to the tokenizer
    assert infer_family(_st6(tiny.build_sparse_st(tmp_path / "sparse"))).family == "sparse"
    weighted = _modules_with(_st6(tiny.build_dense_st(tmp_path / "weighted")),
                             "sentence_transformers.sentence_transformer.modules.WeightedLayerPooling")
    with pytest.raises(CannotInfer, match="WeightedLayerPooling"):  # a Pooling by suffix only is not Pooling
        infer_family(weighted)


@pytest.mark.parametrize(("case", "dim", "reason"), [
    (tiny_encoders.Case("labse", pooling="cls", dense=((24, tiny_encoders.TANH),), layout="classic"), 24,
     "Transformer, Pooling (cls), Dense (32 -> 24, Tanh), Normalize"),
    (tiny_encoders.Case("concat", pooling=("cls", "max"), normalize=False), 64, "Transformer, Pooling (cls+max)"),
    (tiny_encoders.Case("t5", arch="t5", include_prompt=False), 32, "Pooling (mean, prompt excluded), Normalize"),
    (tiny_encoders.Case("distilbert", arch="distilbert"), 32, "Pooling (mean)")])
def test_a_dense_checkpoint_says_its_steps_and_its_width(tmp_path: Path, case: tiny_encoders.Case, dim: int,
                                                         reason: str) -> None:
    """Dense modules, concatenated poolings and encoders whose config names its width otherwise (T5's d_model,
    DistilBERT's dim): the width is the one the worker will report, and the reason lists what will be computed."""
    config = infer_config(str(tiny_encoders.build_case(case, tmp_path)), offline=True)
    assert config.family() == "dense" and config.tasks == {"encode": {"dense": {"dim": dim}}}
    assert reason in config.source and config.max_sequence_length == (48 if case.layout == "classic" else None)
