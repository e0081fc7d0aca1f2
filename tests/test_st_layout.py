"""The one reader of sentence-transformers checkpoints (worker/st_layout.py): the classic layout and the one
sentence-transformers 5/6 writes, written by hand and by the installed sentence-transformers itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sie_worker.adapters.dense import DenseAdapter
from sie_worker.adapters.st_config import dense_settings
from sie_worker.options import DenseOptions
from sie_worker.protocol import WorkerSpec
from sie_worker.st_layout import read_layout
from tests import tiny_models as tiny
from tests.adapters.conftest import encode

CLASSIC = "sentence_transformers.models."
ST6_BASE = "sentence_transformers.base.modules."
ST6_POOLING = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"


def write(folder: Path, files: dict[str, Any]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(data))
    return folder


def modules(*entries: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(entries)]


def spec(folder: Path, **options: Any) -> WorkerSpec:
    return WorkerSpec(worker_id="w", model="m", adapter="dense", weights_dir=str(folder), to_worker_endpoint="",
                      from_worker_endpoint="", options=DenseOptions(**options))


def test_the_classic_layout(tmp_path: Path) -> None:
    folder = write(tmp_path, {
        "modules.json": modules(("", CLASSIC + "Transformer"), ("1_Pooling", CLASSIC + "Pooling"),
                                ("2_Dense", CLASSIC + "Dense"), ("3_Normalize", CLASSIC + "Normalize")),
        "1_Pooling/config.json": {"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
                                  "pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": True},
        "2_Dense/config.json": {"in_features": 32, "out_features": 8, "activation_function": "torch.nn.Tanh"},
        "sentence_bert_config.json": {"max_seq_length": 64, "do_lower_case": False},
        "config_sentence_transformers.json": {"prompts": {"query": "query: "}, "default_prompt_name": "query"}})
    layout = read_layout(folder)
    assert layout.kinds == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert layout.pooling == ("lasttoken",) and layout.normalize and layout.max_seq_length == 64
    dense = layout.module("Dense")
    assert dense is not None and dense.folder == folder / "2_Dense" and dense.config["out_features"] == 8
    assert layout.encoder_folder == folder
    assert layout.prompts == {"query": "query: "} and layout.default_prompt_name == "query"
    settings = dense_settings(spec(folder))
    assert settings.pipeline.pooling.modes == ("lasttoken",) and settings.default == "query: "
    assert [type(step).__name__ for step in settings.pipeline.steps] == ["Dense", "Normalize"]
    assert settings.pipeline.dim(32) == 8 and settings.max_length == 64


def test_the_layout_sentence_transformers_5_and_6_write(tmp_path: Path) -> None:
    folder = write(tmp_path, {
        "modules.json": modules(("", ST6_BASE + "transformer.Transformer"), ("1_Pooling", ST6_POOLING),
                                ("2_Normalize", ST6_BASE + "normalize.Normalize")),
        "1_Pooling/config.json": {"embedding_dimension": 32, "pooling_mode": "cls", "include_prompt": True},
        "sentence_bert_config.json": {"transformer_task": "feature-extraction",
                                      "module_output_name": "token_embeddings"}})
    layout = read_layout(folder)
    assert layout.kinds == ["Transformer", "Pooling", "Normalize"]
    assert layout.pooling == ("cls",) and layout.normalize and layout.max_seq_length is None
    settings = dense_settings(spec(folder))
    pipeline = settings.pipeline
    assert (pipeline.pooling.modes, pipeline.normalize, settings.max_length) == (("cls",), True, None)


def test_a_classic_pooling_config_with_no_flag_is_mean_and_no_files_are_an_empty_layout(tmp_path: Path) -> None:
    folder = write(tmp_path / "a", {"modules.json": modules(("1_Pooling", CLASSIC + "Pooling")),
                                    "1_Pooling/config.json": {"word_embedding_dimension": 32}})
    assert read_layout(folder).pooling == ("mean",)
    empty = read_layout(tmp_path / "nothing")
    assert empty.modules == () and empty.pooling is None and not empty.normalize and empty.max_seq_length is None
    assert dense_settings(spec(tmp_path / "nothing")).pipeline.pooling.modes == ("mean",)


@pytest.mark.parametrize(("pooling", "modes"), [
    ({"pooling_mode": "max"}, ("max",)), ({"pooling_mode": ["cls", "mean"]}, ("cls", "mean")),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, ("max", "mean")),
    ({"pooling_mode_weightedmean_tokens": True}, ("weightedmean",))])
def test_every_pooling_mode_and_concatenation_is_read_in_sentence_transformers_order(
        tmp_path: Path, pooling: dict[str, Any], modes: tuple[str, ...]) -> None:
    folder = write(tmp_path, {"modules.json": modules(("", CLASSIC + "Transformer"), ("1_Pooling", ST6_POOLING)),
                              "1_Pooling/config.json": pooling})
    assert dense_settings(spec(folder)).pipeline.pooling.modes == modes
    assert dense_settings(spec(folder, pooling="last")).pipeline.pooling.modes == ("lasttoken",)


def test_a_pooling_mode_no_engine_computes_is_refused_naming_what_is(tmp_path: Path) -> None:
    folder = write(tmp_path, {"modules.json": modules(("", CLASSIC + "Transformer"), ("1_Pooling", ST6_POOLING)),
                              "1_Pooling/config.json": {"pooling_mode": "median"}})
    with pytest.raises(ValueError, match=r"pooling mode 'median' is not computed; .* cls, max, mean"):
        dense_settings(spec(folder))


def test_the_cross_encoder_activation_in_either_place(tmp_path: Path) -> None:
    identity = "torch.nn.modules.linear.Identity"
    st6 = write(tmp_path / "st6", {"config_sentence_transformers.json": {"activation_fn": identity}})
    st4 = write(tmp_path / "st4", {"config.json": {"sentence_transformers": {"activation_fn": identity}}})
    older = write(tmp_path / "older", {"config.json": {"sbert_ce_default_activation_function": identity}})
    assert {read_layout(f).cross_encoder_activation for f in (st6, st4, older)} == {identity}
    assert read_layout(tmp_path / "none").cross_encoder_activation is None


def test_importing_the_reader_pulls_in_no_torch_or_transformers() -> None:
    code = ("import sys, sie_worker.st_layout, sie_worker.adapters.st_config; "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_what_sentence_transformers_6_saves_reads_as_it_loads(tmp_path: Path) -> None:
    """A classic checkpoint re-saved by the installed sentence-transformers (the 5/6 layout), and a new model with a
    Dense module, last-token pooling and prompts: the reader finds what sentence-transformers itself loads."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    classic = tiny.build_dense_st(tmp_path / "classic")
    reference = SentenceTransformer(str(classic), device="cpu")
    reference.save(str(tmp_path / "resaved"))
    resaved = read_layout(tmp_path / "resaved")
    assert [m.type.split(".")[1] for m in resaved.modules] == ["base", "sentence_transformer", "base"]
    assert (resaved.pooling, resaved.normalize) == (read_layout(classic).pooling, True) == (("cls",), True)
    adapter = DenseAdapter(spec(tmp_path / "resaved", engine="torch"))
    adapter.load()
    try:
        texts = ["berlin", "what is the capital of france"]
        ours = encode(adapter, texts, ["dense"]).dense
        assert ours is not None
        np.testing.assert_allclose(ours.numpy(), reference.encode(texts), atol=1e-5)
    finally:
        adapter.close()

    transformer = Transformer(str(classic))
    fresh = SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="lasttoken"),
                                         Dense(32, 8), Normalize()],
                                device="cpu", prompts={"query": "q: ", "document": "d: "})
    fresh.save(str(tmp_path / "fresh"))
    layout = read_layout(tmp_path / "fresh")
    assert layout.kinds == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert layout.pooling == ("lasttoken",) and layout.prompts == {"query": "q: ", "document": "d: "}
    dense = layout.module("Dense")
    assert dense is not None and dense.config["out_features"] == 8
    assert dense.config["activation_function"] == "torch.nn.modules.activation.Tanh"
