"""Dense embeddings on torch (worker process): the transformers encoder as sentence-transformers loads it, pooling on
its device, then the checkpoint's Dense and Normalize steps (`st_head`).

The steps, the maximum length and the prompts come from the checkpoint's sentence-transformers files under the model
config's options (`st_config.dense_settings`). This is the torch engine: GPUs, `engine: torch`, custom code (with
`--trust-remote-code`), and any checkpoint that cannot be served from an exported graph. On CPU the other engines
serve dense encoders without torch (`dense_lean.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from sie_worker.adapters.base import LoadInfo, Prepared, UnsupportedTask
from sie_worker.adapters.st_config import dense_settings
from sie_worker.adapters.st_head import Head
from sie_worker.adapters.text_tokenizer import lowercase_first
from sie_worker.adapters.torch_common import (
    Buckets,
    compute_dtype,
    load_encoder,
    memory_bytes,
    prepare_texts,
    release,
    to_device,
    torch_device,
    warm_up,
)
from sie_worker.protocol import EncodeBatch, EncodeResult, Tensor, WorkerSpec
from sie_worker.st_layout import read_layout
from sie_worker.st_pipeline import Pipeline

log = logging.getLogger("sie.worker")
# The maximum length when neither the model config nor the checkpoint's files limit it.
FALLBACK_MAX_LENGTH = 512


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...], prompt_length: int = 0) -> torch.Tensor:
    """[B, T, H] -> [B, len(modes) * H] as sentence-transformers' Pooling computes it (`st_head.pool` is the same in
    numpy), always in float32: a sum over thousands of fp16 tokens overflows fp16's 65504 (8192 tokens near 9 give
    inf, then NaN once normalised)."""
    hidden = hidden.float()
    original = mask
    if prompt_length:
        mask = mask.clone()
        pad = mask.int().argmax(dim=1)
        positions = torch.arange(mask.shape[1], device=mask.device)[None, :]
        mask[positions < (pad + prompt_length)[:, None]] = 0
    weights = mask.to(torch.float32)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[rows, mask.int().argmax(dim=1)])
        elif mode == "max":
            out.append(hidden.masked_fill(weights[..., None] == 0, float("-inf")).amax(dim=1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            count = weights.sum(dim=1, keepdim=True).clamp(min=1e-9)
            total = torch.einsum("bth,bt->bh", hidden, weights)
            out.append(total / (count if mode == "mean" else count.sqrt()))
        elif mode == "weightedmean":
            positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=torch.float32)[None, :]
            weighted = weights * (positions - original.int().argmax(dim=1)[:, None])
            out.append(torch.einsum("bth,bt->bh", hidden, weighted) / weighted.sum(dim=1, keepdim=True).clamp(1e-9))
        elif mode == "lasttoken":
            values, flipped = mask.flip(1).max(dim=1)
            last = hidden.shape[1] - 1 - torch.where(values == 0, hidden.shape[1] - 1, flipped)
            out.append(hidden[rows, last] * weights[rows, last][:, None])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


def read_bin(path: Path) -> dict[str, np.ndarray]:
    """A Dense module's pytorch_model.bin, tensors only."""
    return {name: value.float().numpy() for name, value in
            torch.load(path, map_location="cpu", weights_only=True).items()}


class DenseAdapter:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch_device(spec.device)
        self.settings = dense_settings(spec)
        self.encoder_folder = read_layout(Path(spec.weights_dir)).encoder_folder
        self.head = Head(self.settings.pipeline, read_bin)
        self.max_length = self.settings.max_length
        self.prompt_lengths: dict[str, int] = {}

    def load(self) -> LoadInfo:
        trust = self.spec.trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(self.encoder_folder, local_files_only=True,
                                                       trust_remote_code=trust)
        if self.settings.pipeline.do_lower_case:
            lowercase_first(self.tokenizer.backend_tokenizer)
        dtype = compute_dtype(self.spec.compute_precision, self.device)
        self.model = load_encoder(self.encoder_folder, dtype, trust).to(self.device)
        if self.max_length is None:
            self.max_length = min(int(self.tokenizer.model_max_length), FALLBACK_MAX_LENGTH)
        self.dim = dim = self.settings.pipeline.dim(int(self.model.config.hidden_size))
        log.info("engine: torch (%s)", self.device.type)
        self.warm_up()
        return LoadInfo(dims={"dense": dim}, capabilities=["dense"], max_sequence_length=self.max_length)

    def warm_up(self) -> None:
        """The largest micro-batch, then a small one (torch_common.warm_up); RSS then stays flat under load."""
        assert self.max_length is not None

        def run(tensors: dict[str, torch.Tensor]) -> None:
            for _, inputs, hidden in self.encoded([(list(range(len(tensors["input_ids"]))), tensors)]):
                pooled = pool(hidden, inputs["attention_mask"].to(hidden.device), self.settings.pipeline.pooling.modes)
                self.head.after_pooling(pooled.cpu().numpy())

        # At the budget on the CPU too: MiniLM-class encoders take it in a second, and RSS then stays flat.
        warm_up(run, self.tokenizer, self.max_length, self.spec, self.device, on_cpu=True)

    def encoded(self, buckets: Buckets) -> Iterator[tuple[list[int], dict[str, torch.Tensor], torch.Tensor]]:
        """(item indices, inputs on the device, last hidden state) per bucket, one at a time, so that a GPU holds one
        bucket's activations."""
        for indices, tensors in buckets:
            inputs = to_device(tensors, self.device)
            yield indices, inputs, self.model(**inputs).last_hidden_state

    def prepare(self, batch: Any) -> Prepared:
        """Tokenise the prompted texts without padding, then pad each length bucket on its own."""
        if not isinstance(batch, EncodeBatch):
            raise UnsupportedTask("this model only encodes")
        pipeline = self.settings.batch_pipeline(batch.options)
        prompt = self.settings.batch_prompt(batch.options, batch.is_query)
        prepared = prepare_texts(batch, self.tokenizer, self.max_length, self.spec.max_batch_tokens, self.device,
                                 prefix=prompt)
        prepared.extra = {"pipeline": pipeline, "prompt_length": self.prompt_length(prompt, pipeline)}
        return prepared

    def prompt_length(self, prompt: str, pipeline: Pipeline) -> int:
        """The prompt's tokens to leave out of pooling (Pooling's `include_prompt: false`), else 0; counted as
        sentence-transformers counts them, a trailing special token excluded."""
        if not prompt or pipeline.pooling.include_prompt:
            return 0
        if prompt not in self.prompt_lengths:
            ids = self.tokenizer(prompt)["input_ids"]
            self.prompt_lengths[prompt] = len(ids) - (1 if ids and ids[-1] in self.tokenizer.all_special_ids else 0)
        return self.prompt_lengths[prompt]

    def forward(self, prepared: Prepared) -> EncodeResult:
        batch = prepared.batch
        assert isinstance(batch, EncodeBatch)
        pipeline, prompt_length = prepared.extra["pipeline"], prepared.extra["prompt_length"]
        out = np.empty((len(batch.items), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for indices, inputs, hidden in self.encoded(prepared.inputs):
                pooled = pool(hidden, inputs["attention_mask"], pipeline.pooling.modes, prompt_length)
                out[indices] = self.head.after_pooling(pooled.cpu().numpy(), pipeline)
        return EncodeResult(token_counts=prepared.token_counts, dense=Tensor.from_numpy(out))

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        release(self.device)
