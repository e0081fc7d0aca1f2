"""What a dense checkpoint computes after its encoder (worker/st_pipeline.py) and the numpy steps that compute it
(worker/adapters/st_head.py), against sentence-transformers' own modules; refusals of what is not implemented; custom
code behind `--trust-remote-code`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sie_worker.adapters import build_adapter
from sie_worker.adapters.base import BadModelConfig
from sie_worker.adapters.dense import DenseAdapter
from sie_worker.adapters.dense import pool as torch_pool
from sie_worker.adapters.st_head import ACTIVATION_FUNCTIONS, Head, WeightsNeedTorch, pool
from sie_worker.failures import load_error_class
from sie_worker.options import DenseOptions
from sie_worker.protocol import LoadErrorClass, WorkerSpec
from sie_worker.st_layout import read_layout
from sie_worker.st_pipeline import POOLING_MODES, Dense, Unsupported, max_length, read_pipeline
from tests import tiny_encoders as tiny
from tests.adapters.conftest import encode
from tests.test_st_layout import write

CLASSIC = "sentence_transformers.models."


def checkpoint(folder: Path, *after: tuple[str, str, dict[str, Any]], transformer: dict[str, Any] | None = None,
               pooling: dict[str, Any] | None = None) -> Path:
    """modules.json with a Transformer, a mean Pooling, then `after` as (path, type, config) entries."""
    entries = [("", CLASSIC + "Transformer", None), ("1_Pooling", CLASSIC + "Pooling",
                                                     pooling or {"word_embedding_dimension": 32})]
    entries += list(after)
    files: dict[str, Any] = {"modules.json": [{"idx": i, "name": str(i), "path": path, "type": kind}
                                              for i, (path, kind, _) in enumerate(entries)],
                             "sentence_bert_config.json": transformer or {"max_seq_length": 64}}
    files.update({f"{path}/config.json": config for path, _, config in entries if config is not None})
    return write(folder, files)


DENSE = {"in_features": 32, "out_features": 8, "bias": True, "activation_function": "torch.nn.modules.activation.Tanh"}
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "a LayerNorm": ({"after": [("2_LayerNorm", CLASSIC + "LayerNorm", {"dimension": 32})]},
                    r"sentence_transformers.models.LayerNorm \(2_LayerNorm\) is not computed; .*Dense, Normalize"),
    "custom module code": ({"after": [("2_X", "custom_st.Projection", {})]}, r"custom_st.Projection .*not computed"),
    "an unknown pooling mode": ({"pooling": {"pooling_mode": "median"}},
                                r"pooling mode 'median' is not computed; the dense engines compute cls, max, mean"),
    "an unknown Pooling key": ({"pooling": {"pooling_mode": "mean", "pooling_scale": 2}},
                               r"1_Pooling\) sets \['pooling_scale'\]"),
    "an activation torch has but we do not": (
        {"after": [("2_Dense", CLASSIC + "Dense", {**DENSE, "activation_function": "torch.nn.Softmax"})]},
        r"applies torch.nn.Softmax, which the dense engines do not compute; they compute torch.nn's Identity, Tanh"),
    "a Dense key we do not implement": ({"after": [("2_Dense", CLASSIC + "Dense", {**DENSE, "dropout": 0.1})]},
                                        r"2_Dense\) sets \['dropout'\]"),
    "a Dense on token embeddings": (
        {"after": [("2_Dense", CLASSIC + "Dense", {**DENSE, "module_input_name": "token_embeddings"})]},
        r"module_input_name='token_embeddings'"),
    "a second Pooling": ({"after": [("2_Pooling", CLASSIC + "Pooling", {})]}, "a second Pooling module"),
    "a tokenizer argument that changes tokens": ({"transformer": {"tokenizer_args": {"add_eos_token": True}}},
                                                 r"passes tokenizer_args \['add_eos_token'\]"),
    "a Transformer key we do not implement": ({"transformer": {"query_length": 32}}, r"sets 'query_length'"),
    "another transformer task": ({"transformer": {"transformer_task": "fill-mask"}},
                                 r"transformer_task='fill-mask'; the dense engines compute "
                                 r"transformer_task='feature-extraction'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_no_engine_computes_is_refused_naming_it_and_what_is(tmp_path: Path, case: str) -> None:
    shape, message = REFUSED[case]
    folder = checkpoint(tmp_path, *shape.get("after", []), transformer=shape.get("transformer"),
                        pooling=shape.get("pooling"))
    with pytest.raises(Unsupported, match=message):
        read_pipeline(read_layout(folder))


def test_a_checkpoint_saved_by_sentence_transformers_with_an_unimplemented_module_fails_its_load(
        tmp_path: Path) -> None:
    """Written by the installed sentence-transformers: a LayerNorm after pooling. The worker's load fails as a
    config error (permanent), naming the module, on every engine."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import LayerNorm

    folder = tiny.build_case(tiny.Case("plain"), tmp_path)
    model = SentenceTransformer(str(folder), device="cpu")
    SentenceTransformer(modules=[*model, LayerNorm(32)], device="cpu").save(str(tmp_path / "layernorm"))
    for engine in ("auto", "torch"):
        with pytest.raises(Unsupported, match=r"layer_norm.LayerNorm \(3_LayerNorm\) is not computed") as caught:
            build_adapter(spec(tmp_path / "layernorm", engine=engine))
        assert load_error_class(caught.value) == LoadErrorClass.CONFIG


def test_an_activation_outside_torch_is_tanh_as_sentence_transformers_loads_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = checkpoint(tmp_path, ("2_Dense", CLASSIC + "Dense", {**DENSE, "activation_function": "mylib.Swish"}))
    with caplog.at_level(logging.WARNING, logger="sie.st"):
        (dense,) = read_pipeline(read_layout(folder)).steps
    assert isinstance(dense, Dense) and dense.activation == "Tanh" and "mylib.Swish" in caplog.text
    with pytest.raises(Unsupported, match=r"custom activation 'mylib\.Swish'"):
        read_pipeline(read_layout(folder), trust_remote_code=True)


def test_dropout_is_the_identity_and_the_output_width_is_the_last_dense(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path, ("2_Dropout", CLASSIC + "Dropout", {"dropout": 0.2}),
                        ("3_Dense", CLASSIC + "Dense", DENSE), ("4_Normalize", CLASSIC + "Normalize", None),
                        pooling={"word_embedding_dimension": 32, "pooling_mode_cls_token": True,
                                 "pooling_mode_max_tokens": True})
    pipeline = read_pipeline(read_layout(folder))
    assert pipeline.pooling.modes == ("cls", "max") and [type(s).__name__ for s in pipeline.steps] == [
        "Dense", "Normalize"]
    assert pipeline.dim(32) == 8 and pipeline.with_normalize(False).steps == pipeline.steps[:1]
    with pytest.raises(Unsupported, match="takes 32"):  # the Dense after it was made for cls+max's 64 values
        read_pipeline(read_layout(checkpoint(tmp_path / "b", ("2_Dense", CLASSIC + "Dense", DENSE),
                                             pooling={"embedding_dimension": 32}))).with_pooling(("cls", "mean"))


def test_the_maximum_length_as_sentence_transformers_finds_it(tmp_path: Path) -> None:
    """`max_seq_length` wins; else the tokenizer's `model_max_length` capped at `max_position_embeddings`; T5 has
    no positions to cap it; a tokenizer without a limit and no positions leave it unlimited."""
    folder = write(tmp_path / "a", {"config.json": {"max_position_embeddings": 512},
                                    "tokenizer_config.json": {"model_max_length": 8192}})
    assert max_length(read_layout(folder)) == 512
    write(folder, {"sentence_bert_config.json": {"max_seq_length": 1024}})
    assert max_length(read_layout(folder)) == 1024
    t5 = write(tmp_path / "t5", {"config.json": {"d_model": 32}, "tokenizer_config.json": {"model_max_length": 512}})
    assert max_length(read_layout(t5)) == 512
    assert max_length(read_layout(write(tmp_path / "none", {"config.json": {}}))) is None


def hidden_and_masks(left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 9, 8, generator=generator)
    lengths = [9, 6, 2]
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, n in enumerate(lengths):
        if left:
            mask[row, 9 - n:] = 1
        else:
            mask[row, :n] = 1
    return hidden, mask


@pytest.mark.parametrize("left", [False, True], ids=["right padding", "left padding"])
@pytest.mark.parametrize("prompt_length", [0, 3])
@pytest.mark.parametrize("mode", [*POOLING_MODES, ("cls", "max", "mean")])
def test_numpy_and_torch_pooling_are_sentence_transformers_pooling(mode: Any, prompt_length: int, left: bool) -> None:
    from sentence_transformers.sentence_transformer.modules import Pooling

    modes = mode if isinstance(mode, tuple) else (mode,)
    hidden, mask = hidden_and_masks(left)
    features: dict[str, Any] = {"token_embeddings": hidden, "attention_mask": mask, "prompt_length": prompt_length}
    want = Pooling(8, pooling_mode=modes, include_prompt=not prompt_length)(features)["sentence_embedding"].numpy()
    np.testing.assert_allclose(pool(hidden.numpy(), mask.numpy(), modes, prompt_length), want, atol=1e-5)
    np.testing.assert_allclose(torch_pool(hidden, mask, modes, prompt_length).numpy(), want, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ACTIVATION_FUNCTIONS))
def test_each_activation_is_torchs(name: str) -> None:
    x = torch.linspace(-30, 30, 2001)
    want = getattr(torch.nn, name)()(x).numpy()
    np.testing.assert_allclose(ACTIVATION_FUNCTIONS[name](x.numpy()), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("residual", [(32, 32), (32, 16)], ids=["same width", "projected"])
def test_dense_modules_with_residuals_and_without_bias_are_sentence_transformers(
        tmp_path: Path, residual: tuple[int, int]) -> None:
    from sentence_transformers.base.modules import Dense as StDense

    torch.manual_seed(0)
    layers = [StDense(*residual, activation_function=torch.nn.GELU(), use_residual=True),
              StDense(residual[1], 8, bias=False, activation_function=torch.nn.SiLU())]
    after = []
    for i, layer in enumerate(layers, start=2):
        (tmp_path / f"{i}_Dense").mkdir()
        layer.save(str(tmp_path / f"{i}_Dense"))
        after.append((f"{i}_Dense", CLASSIC + "Dense", None))
    folder = checkpoint(tmp_path, *after, pooling={"embedding_dimension": 32})
    head = Head(read_pipeline(read_layout(folder)))
    x = torch.randn(5, 32)
    want = layers[1]({"sentence_embedding": layers[0]({"sentence_embedding": x})["sentence_embedding"]})
    np.testing.assert_allclose(head.after_pooling(x.numpy()), want["sentence_embedding"].detach().numpy(),
                               atol=1e-5)


def test_dense_weights_only_in_torchs_format_are_read_by_the_torch_engine(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path, ("2_Dense", CLASSIC + "Dense", DENSE))
    linear = torch.nn.Linear(32, 8)
    torch.save({f"linear.{k}": v for k, v in linear.state_dict().items()}, tmp_path / "2_Dense" / "pytorch_model.bin")
    pipeline = read_pipeline(read_layout(folder))
    with pytest.raises(WeightsNeedTorch, match=r"2_Dense holds its weights only as pytorch_model\.bin"):
        Head(pipeline)
    from sie_worker.adapters.dense import read_bin

    x = np.ones((1, 32), dtype=np.float32)
    got = Head(pipeline, read_bin).after_pooling(x)
    np.testing.assert_allclose(got, torch.tanh(linear(torch.from_numpy(x))).detach().numpy(), atol=1e-6)


def spec(folder: Path, trust: bool = False, adapter: str = "dense", **options: Any) -> WorkerSpec:
    return WorkerSpec(worker_id="w", model="org/custom", adapter=adapter, weights_dir=str(folder),
                      to_worker_endpoint="", from_worker_endpoint="", threads=2, trust_remote_code=trust,
                      options=DenseOptions(**options) if adapter == "dense" else None)


def test_custom_code_is_refused_unless_trusted_and_then_runs_on_torch(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    folder = tiny.build_custom_code(tmp_path / "custom")
    for engine in ("auto", "torch"):
        with pytest.raises(BadModelConfig, match=r"runs custom code \(modeling_shifted.ShiftedBert\); start the "
                                                 r"server with --trust-remote-code") as caught:
            build_adapter(spec(folder, engine=engine))
        assert load_error_class(caught.value) == LoadErrorClass.CONFIG
    with pytest.raises(BadModelConfig, match="only for dense encoders"):
        build_adapter(spec(folder, trust=True, adapter="cross_encoder"))
    adapter = build_adapter(spec(folder, trust=True, engine="auto"))
    assert isinstance(adapter, DenseAdapter) and adapter.load().engine == "torch"
    texts = ["berlin", "what is the capital of france?"]
    want = SentenceTransformer(str(folder), device="cpu", trust_remote_code=True).encode(texts)
    stock = SentenceTransformer(str(folder), device="cpu").encode(texts)
    got = encode(adapter, texts, ["dense"]).dense
    assert got is not None
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    assert np.abs(stock - want).max() > 1e-2, "the stock class would have answered otherwise"
    adapter.close()
