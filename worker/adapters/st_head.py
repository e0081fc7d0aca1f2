"""The steps after a dense encoder in numpy (worker process, free of torch): sentence-transformers' Pooling in every
mode (prompt tokens excluded where the checkpoint says so), Dense modules with their activation, Normalize.

Each function mirrors sentence-transformers' own (`Pooling._forward_padded`, `Dense.forward`, `Normalize.forward`) on
padded float32 arrays, left or right padding alike. The lean engine runs them on the graph's hidden states; the torch
engine pools on its device (`dense.pool`) and runs the rest here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sie_worker.adapters.base import BadModelConfig
from sie_worker.st_pipeline import ACTIVATIONS, Dense, Normalize, Pipeline

Array = np.ndarray
_erf = np.frompyfunc(math.erf, 1, 1)


def _softplus(x: Array) -> Array:
    return np.where(x > 20, x, np.logaddexp(0, x))  # torch's beta 1, threshold 20


def _sigmoid(x: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large negative x


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805
# torch.nn activations at their default arguments, by class name.
ACTIVATION_FUNCTIONS: dict[str, Callable[[Array], Array]] = {
    "Identity": lambda x: x,
    "Tanh": np.tanh,
    "ReLU": lambda x: np.maximum(x, 0),
    "GELU": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(x.dtype)),  # the exact GELU, torch's default
    "Sigmoid": _sigmoid,
    "SiLU": lambda x: x * _sigmoid(x),
    "LeakyReLU": lambda x: np.where(x >= 0, x, 0.01 * x),
    "ELU": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
    "Softplus": _softplus,
    "Mish": lambda x: x * np.tanh(_softplus(x)),
    "Hardtanh": lambda x: np.clip(x, -1.0, 1.0),
    "ReLU6": lambda x: np.clip(x, 0.0, 6.0),
    "SELU": lambda x: _SELU_SCALE * np.where(x > 0, x, _SELU_ALPHA * np.expm1(np.minimum(x, 0))),
    "Softsign": lambda x: x / (1.0 + np.abs(x)),
}
assert set(ACTIVATION_FUNCTIONS) == set(ACTIVATIONS), "st_pipeline names what this module computes"


class WeightsNeedTorch(Exception):
    """A Dense module's weights are only in torch's pickle format, which the torch engine reads."""


def exclude_prompt(mask: Array, prompt_length: int) -> Array:
    """The mask with the prompt's tokens (and any left padding before them) zeroed."""
    mask = mask.copy()
    pad = mask.argmax(axis=1)
    if pad.sum() == 0:
        mask[:, :prompt_length] = 0
    else:
        mask[np.arange(mask.shape[1])[None, :] < (pad + prompt_length)[:, None]] = 0
    return mask


def pool(hidden: Array, mask: Array, modes: tuple[str, ...], prompt_length: int = 0) -> Array:
    """[B, T, H] token embeddings and their [B, T] mask -> [B, len(modes) * H] float32, modes concatenated in order;
    with `prompt_length`, the prompt's tokens are left out (Pooling's `include_prompt: false`)."""
    hidden = hidden.astype(np.float32, copy=False)
    original = mask
    if prompt_length:
        mask = exclude_prompt(mask, prompt_length)
    weights = mask.astype(np.float32)
    rows = np.arange(hidden.shape[0])
    out = []
    for mode in modes:
        if mode == "cls":  # the first token the mask keeps
            out.append(hidden[rows, mask.argmax(axis=1)])
        elif mode == "max":
            out.append(np.where(weights[..., None] > 0, hidden, -np.inf).max(axis=1).astype(np.float32))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            count = np.maximum(weights.sum(axis=1, keepdims=True), 1e-9)
            total = np.einsum("bth,bt->bh", hidden, weights)
            out.append(total / (count if mode == "mean" else np.sqrt(count)))
        elif mode == "weightedmean":  # positions from 1 at the first real token, kept past an excluded prompt
            positions = np.arange(1, hidden.shape[1] + 1, dtype=np.float32)[None, :]
            weighted = weights * (positions - original.argmax(axis=1)[:, None])
            total = np.einsum("bth,bt->bh", hidden, weighted)
            out.append(total / np.maximum(weighted.sum(axis=1, keepdims=True), 1e-9))
        elif mode == "lasttoken":  # the last token the mask keeps; zeros when it keeps none
            flipped = mask[:, ::-1]
            last = hidden.shape[1] - 1 - np.where(flipped.max(axis=1) == 0, hidden.shape[1] - 1, flipped.argmax(1))
            out.append(hidden[rows, last] * weights[rows, last][:, None])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return np.concatenate(out, axis=1) if len(out) > 1 else out[0]


def normalized(vectors: Array) -> Array:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


ReadBin = Callable[[Path], dict[str, Array]]


def dense_weights(step: Dense, read_bin: ReadBin | None = None) -> dict[str, Array]:
    """A Dense module's float32 weights (`linear.weight`, `linear.bias`, `residual.weight`), checked against its
    config. `pytorch_model.bin` needs `read_bin` (the torch engine's); without it WeightsNeedTorch."""
    safetensors, pickled = step.folder / "model.safetensors", step.folder / "pytorch_model.bin"
    if safetensors.is_file():
        from safetensors.numpy import load_file

        found = load_file(str(safetensors))
    elif pickled.is_file():
        if read_bin is None:
            raise WeightsNeedTorch(f"{step.folder.name} holds its weights only as pytorch_model.bin, which the lean "
                                   "engines do not read")
        found = read_bin(pickled)
    else:
        raise BadModelConfig(f"{step.folder} holds no Dense weights (model.safetensors or pytorch_model.bin)")
    weights = {name: np.asarray(value, dtype=np.float32) for name, value in found.items()}
    expected = {"linear.weight": (step.out_features, step.in_features)}
    if step.bias:
        expected["linear.bias"] = (step.out_features,)
    if step.residual and step.in_features != step.out_features:
        expected["residual.weight"] = (step.out_features, step.in_features)
    for name, shape in expected.items():
        if name not in weights or weights[name].shape != shape:
            raise BadModelConfig(f"{step.folder.name}: expected {name} of shape {shape}, found "
                                 f"{weights[name].shape if name in weights else 'none'}")
    return weights


class Head:
    """A checkpoint's steps after the encoder, weights loaded; `__call__` runs them for a pipeline that may differ
    from the checkpoint's only in its pooling modes and Normalize (a request's options)."""

    def __init__(self, pipeline: Pipeline, read_bin: ReadBin | None = None) -> None:
        self.pipeline = pipeline
        self.weights = {step.folder: dense_weights(step, read_bin) for step in pipeline.steps
                        if isinstance(step, Dense)}

    def __call__(self, hidden: Array, mask: Array, prompt_length: int = 0, pipeline: Pipeline | None = None) -> Array:
        pipeline = pipeline or self.pipeline
        return self.after_pooling(pool(hidden, mask, pipeline.pooling.modes, prompt_length), pipeline)

    def after_pooling(self, vectors: Array, pipeline: Pipeline | None = None) -> Array:
        """The Dense and Normalize steps, in order, on [B, D] pooled float32 vectors."""
        for step in (pipeline or self.pipeline).steps:
            if isinstance(step, Normalize):
                vectors = normalized(vectors)
            else:
                weights = self.weights[step.folder]
                projected = vectors @ weights["linear.weight"].T
                if step.bias:
                    projected += weights["linear.bias"]
                out = ACTIVATION_FUNCTIONS[step.activation](projected)
                if step.residual:
                    out = out + (vectors if step.in_features == step.out_features
                                 else vectors @ weights["residual.weight"].T)
                vectors = out.astype(np.float32, copy=False)
        return vectors
