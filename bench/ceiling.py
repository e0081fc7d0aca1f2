"""The compute ceiling for a BERT-style encoder on this machine: torch's GEMM rate, in the precision our server
computes in, over the model's FLOPs per corpus sentence at its mean token count, unpadded (issue 24).

The precision is what the server says it serves (TEI's `/info`, `model_dtype`): bf16 where the CPU computes it
natively (AVX512-BF16 or AMX), float32 elsewhere. A bf16 GEMM on a CPU without it is emulated and slow, and would
make a ceiling the float32 server could pass.

FLOPs per sentence of n tokens, per layer: 2n(4h² + 2hf) for the Q, K, V, output and two FFN projections, plus
4n²h for QKᵀ and the attention-weighted sum; embeddings, norms, softmax and pooling are left out (a few per cent),
so the ceiling is an upper bound on the unpadded work. A server that computes padding does more work per sentence.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

# (M, K, N) products timed: a large square one, and MiniLM's FFN up-projection on 1024 tokens.
GEMMS = [(2048, 2048, 2048), (1024, 384, 1536)]


DTYPES = {"bfloat16": "bf16", "float32": "f32"}  # what the server says it computes in -> the ceiling line's name


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively, as our worker decides it (OpenVINO's capability list). Where it does
    not, torch's bf16 GEMM is emulated at about 1 GFLOP/s on 2 cores (a Zen 3 EPYC: float32 reaches 97)."""
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def served_dtype(port: int) -> str:
    """What the server on `port` computes in, as its TEI `/info` says (`model_dtype`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=10) as response:
        return str(json.load(response)["model_dtype"])


def gemm_gflops(threads: int, dtype: str = "bfloat16", seconds: float = 0.5) -> dict[str, float]:
    """Best GFLOP/s of repeated matmuls in `dtype` of each shape in GEMMS, on `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    rates = {}
    for m, k, n in GEMMS:
        a = torch.randn(m, k, dtype=getattr(torch, dtype))
        b = torch.randn(k, n, dtype=getattr(torch, dtype))
        for _ in range(3):
            torch.matmul(a, b)
        best = 0.0
        for _ in range(5):  # the best of 5 windows: other tenants only ever slow a window down
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds / 5:
                torch.matmul(a, b)
                calls += 1
            best = max(best, 2.0 * m * k * n * calls / (time.perf_counter() - started) / 1e9)
        rates[f"{m}x{k}x{n}"] = best
    return rates


def flops_per_sentence(model_dir: Path, tokens: float) -> float:
    config = json.loads((model_dir / "config.json").read_text())
    h, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    return layers * (2.0 * tokens * (4 * h * h + 2 * h * f) + 4.0 * tokens * tokens * h)


def mean_tokens(model_dir: Path, corpus: list[str], max_length: int = 256) -> float:
    """Mean tokens per sentence, special tokens included, as the model's tokenizer counts them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(corpus, truncation=True, max_length=max_length)["input_ids"]
    return sum(len(x) for x in ids) / len(ids)


def measure(model_dir: Path, corpus: list[str], threads: int, dtype: str = "bfloat16") -> dict:
    """The ceiling in sentences/s for a server computing in `dtype` (a DTYPES key), with what it came from."""
    if dtype not in DTYPES:
        raise ValueError(f"no ceiling for a server computing in {dtype!r}; known: {', '.join(DTYPES)}")
    rates = gemm_gflops(threads, dtype)
    tokens = mean_tokens(model_dir, corpus)
    flops = flops_per_sentence(model_dir, tokens)
    best = max(rates.values())
    return {"sent_per_s": best * 1e9 / flops, "gflops": best, "gemm_gflops": rates, "mean_tokens": tokens,
            "gflop_per_sentence": flops / 1e9, "threads": threads, "dtype": dtype}


def again(ceiling: dict) -> float:
    """The ceiling in sentences/s from the GEMM rate measured now, over the FLOPs per sentence of `ceiling` (a
    `measure` result). The machine's pace moves by 10-25 % within minutes, so run.measure pairs each of our
    measurements with the higher of the ceilings measured just before and just after it."""
    return max(gemm_gflops(ceiling["threads"], ceiling["dtype"]).values()) / ceiling["gflop_per_sentence"]


def line(ceiling: dict) -> str:
    rates = ", ".join(f"{shape} {rate:.0f}" for shape, rate in ceiling["gemm_gflops"].items())
    return (f"# compute ceiling: {ceiling['sent_per_s']:.0f} sentences/s = torch {DTYPES[ceiling['dtype']]} GEMM "
            f"{ceiling['gflops']:.0f} "
            f"GFLOP/s (best of {rates}; {ceiling['threads']} threads) / {ceiling['gflop_per_sentence']:.3f} GFLOP "
            f"per sentence at {ceiling['mean_tokens']:.1f} tokens (linear layers and attention, unpadded)")
