"""Torch helpers shared by the real adapter families (worker process): device, precision, memory, tokenising."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from sie_worker.adapters.base import Prepared, refuse_over_length, truncates
from sie_worker.adapters.batching import (  # noqa: F401  (re-exported: the adapters import them from here)
    CPU_CALL_OVERHEAD_TOKENS,
    GPU_CALL_OVERHEAD_TOKENS,
    MICRO_BATCH_ITEMS,
    PAD_MULTIPLE,
    Stopwatch,
    length_buckets,
    micro_batch_items,
    padded,
    read_json,
    split_for_lanes,
)
from sie_worker.options import Common
from sie_worker.protocol import EncodeBatch, WorkerSpec

_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Encoder-decoder families whose encoder alone embeds, loaded as sentence-transformers loads them (AutoModel would
# build the whole model, whose forward wants decoder inputs).
ENCODER_ONLY = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                "longt5": "LongT5EncoderModel"}


def load_encoder(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> Any:
    """The checkpoint's encoder in eval mode, as sentence-transformers' Transformer module loads it."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    name = ENCODER_ONLY.get(str(config.model_type))
    if name is not None:
        model = getattr(transformers, name).from_pretrained(folder, config=config, local_files_only=True, dtype=dtype)
    else:
        model = transformers.AutoModel.from_pretrained(folder, config=config, local_files_only=True, dtype=dtype,
                                                       trust_remote_code=trust_remote_code)
    return model.eval()


def torch_device(name: str) -> torch.device:
    # CUDA_VISIBLE_DEVICES pins the worker to one GPU, so it always sees it as cuda:0.
    if name.startswith("cuda"):
        return torch.device("cuda:0")
    return torch.device("cpu")


def compute_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """The dtype to run in: as configured on a GPU, where the worker's start resolved None to the family's default
    (`cuda.default_precision`); float32 on CPU unless bfloat16 is asked for explicitly."""
    if precision is None:
        return torch.float32
    dtype = _PRECISIONS[precision]
    if device.type == "cpu" and dtype is torch.float16:
        return torch.float32  # fp16 matmuls on CPU are slow and lossy; bf16 stays an explicit choice
    return dtype


def memory_bytes(device: torch.device) -> int:
    """Memory this worker holds: reserved CUDA memory on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_reserved(device))
    return int(psutil.Process(os.getpid()).memory_info().rss)


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """By type: the text "out of memory" also appears in errors that a smaller batch would not cure."""
    return isinstance(exc, torch.OutOfMemoryError)


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy tokenised inputs to the device; pinned host memory lets the copy run asynchronously on a GPU."""
    if device.type != "cuda":
        return tensors
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in tensors.items()}


Buckets = list[tuple[list[int], dict[str, torch.Tensor]]]


def call_overhead_tokens(device: torch.device) -> int:
    return GPU_CALL_OVERHEAD_TOKENS if device.type == "cuda" else CPU_CALL_OVERHEAD_TOKENS


def tokenize_in_buckets(tokenizer: Any, texts: list[str], max_length: int | None, *, max_batch_tokens: int,
                        device: torch.device, truncate: bool = True, pairs: list[str] | None = None,
                        truncation_side: str = "right") -> tuple[Buckets, list[int]]:
    """Tokenise without padding, then pad each bucket of similar lengths on its own: (buckets, tokens per item).

    With `truncate` off, a text over `max_length` fails the batch instead of being cut; `truncation_side` "left"
    keeps a text's end (TEI's `truncation_direction`). The tokenizer belongs to the prepare thread, so setting its
    side for one call is safe.
    """
    side, tokenizer.truncation_side = tokenizer.truncation_side, truncation_side
    try:
        encoded = tokenizer(texts, pairs, truncation=truncate, max_length=max_length if truncate else None)
    finally:
        tokenizer.truncation_side = side
    counts = [len(ids) for ids in encoded["input_ids"]]
    if not truncate:
        refuse_over_length(counts, max_length)
    buckets = []
    for indices in length_buckets(counts, micro_batch_items(device.type), max_batch_tokens,
                                  call_overhead_tokens(device)):
        features = {key: [encoded[key][i] for i in indices] for key in encoded}
        buckets.append((indices, dict(tokenizer.pad(features, pad_to_multiple_of=PAD_MULTIPLE, return_tensors="pt"))))
    return buckets, counts


def full_warm_up(spec: WorkerSpec, device: torch.device, on_cpu: bool = False) -> bool:
    """Whether load() runs a forward at the full budget: always on a GPU, where an out-of-memory must show at start;
    on the CPU only where `on_cpu` (the family's default) or the option `warm_up: budget` says so, as the budget
    forward of a large model takes minutes on a few cores (BGE-M3 at 2 x 8192 tokens) and host memory has no such
    cliff. The option `warm_up: small` skips it everywhere."""
    setting = spec.options_as(Common).warm_up
    if setting is not None:
        return setting == "budget"
    return device.type == "cuda" or on_cpu


def warm_up(run: Callable[[dict[str, torch.Tensor]], object], tokenizer: Any, max_length: int, spec: WorkerSpec,
            device: torch.device, max_items: int | None = None, on_cpu: bool = False) -> None:
    """Run the family's forward at the largest micro-batch it will take (max_length tokens, as many rows as the token
    budget allows; see full_warm_up), then at a small one, with `run(inputs)` on host tensors; on a GPU, synchronise.

    Done at load, before `Ready`: an out-of-memory or an asynchronous CUDA error shows at start rather than under
    traffic, and the memory the worker reports is its working set, so the router's ledger accounts what it will hold.
    """
    cap = micro_batch_items(device.type) if max_items is None else max_items
    length = min(max_length, spec.max_batch_tokens)  # a text over the budget runs alone, in a call of its own
    rows = max(1, min(cap, spec.max_batch_tokens // max(1, length)))
    shapes = [(rows, length)] if full_warm_up(spec, device, on_cpu) else []
    with torch.inference_mode():
        for shape in [*shapes, (1, min(PAD_MULTIPLE, max_length))]:
            run(placeholder_inputs(tokenizer, shape))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def placeholder_inputs(tokenizer: Any, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Padding-token ids of `shape` with a full attention mask (and token types where the model takes them)."""
    ids = torch.full(shape, int(tokenizer.pad_token_id or 0), dtype=torch.long)
    tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in tokenizer.model_input_names:
        tensors["token_type_ids"] = torch.zeros_like(ids)
    return tensors


def prepare_texts(batch: EncodeBatch, tokenizer: Any, max_length: int | None, max_batch_tokens: int,
                  device: torch.device, prefix: str = "") -> Prepared:
    """The `prepare` step of a plain text encoder: its items' texts, after `prefix`, in length buckets, honouring
    `truncate`."""
    clock = Stopwatch()
    texts = [prefix + (item.text or "") for item in batch.items]
    buckets, counts = tokenize_in_buckets(tokenizer, texts, max_length, max_batch_tokens=max_batch_tokens,
                                          device=device, truncate=truncates(batch.options),
                                          truncation_side=str(batch.options.get("truncation_direction", "right")))
    return Prepared(batch=batch, inputs=buckets, token_counts=counts, tokenize_ms=clock.ms())
