"""`python -m sie_worker.export_graph WEIGHTS_DIR FOLDER [PARENT_PID] [--head HEAD] [--padded]` (a short-lived
helper process): export an encoder and its head (`graph_cache.HIDDEN` by default; the heads are listed there) to an
ONNX graph that a lean worker serves without torch; an encoder export_packed knows is exported packed unless
`--padded` (benchmarks and tests compare the two). It dies with the worker that started it (PARENT_PID): a worker
killed mid-export leaves no helper behind, and the next export removes the staging folder it left (export_lock).

It loads the checkpoint with transformers in float32, traces it (opset 17, dynamic batch and sequence), checks the
graph under ONNX Runtime against torch on probe texts of unlike lengths and padding and on a long text at the model's
maximum length, and writes the folder that `graph_cache.read_graph` reads, atomically: a reader sees all of it or
none. Exit 0 on success, `NOT_EXPORTABLE` when the model cannot be served from a graph (the worker then serves it
with torch).
"""

from __future__ import annotations

import inspect
import logging
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

from sie_worker.adapters import clip_pixels
from sie_worker.adapters.export_lock import staging_prefix
from sie_worker.adapters.graph_cache import (
    CLIP_IMAGE,
    HIDDEN,
    NOT_EXPORTABLE,
    OPENVINO_IR,
    OPSET,
    PACKED,
    PADDED,
    PROBE_BATCHES,
    PROBE_MAX_LENGTH,
    SEQUENCE_LOGITS,
    TOKEN_LOGITS,
    agreement,
    hidden_state_head,
    min_agreement,
    pair_head,
    per_token_head,
    write_graph_meta,
)
from sie_worker.adapters.packed_feed import PACKED_INPUTS, pack
from sie_worker.export_clip import checked_steps, image_probes, image_processor
from sie_worker.export_heads import head_model, special_ids, write_head_files
from sie_worker.export_packed import PackedClassifier, PackedEncoder, classifier_unpackable, unpackable
from sie_worker.parent import die_with_parent

log = logging.getLogger("sie.worker.export")

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EXPORT_TEXTS = ["a short sentence", "another, somewhat longer sentence used to trace the export"]
# Lengths and padding unlike the export's, so a shape or mask baked into the trace shows up in the check.
PROBE_TEXTS = ["hi", "The quick brown fox jumps over the lazy dog near the river bank, twice.",
               "Embedding servers batch sentences of very different lengths together.",
               "Ünïcödé, emoji 🙂 and 数字 123"]
# Real-ish prose, repeated up to the long probe's length: words, punctuation, digits and accents as texts have them.
LONG_TEXT = ("Search engines rank documents by how well their meaning matches a query, not only by the words they "
             "share. In 2024 a retrieval stack often combined dense vectors, sparse weights and a cross-encoder; each "
             "stage trades cost (CPU time, memory) against recall@10 and nDCG. Café menus, naïve résumés and Zürich's "
             "three rivers still tokenise into many pieces, and a long report repeats itself more than its authors "
             "would admit.")


class NotExportable(Exception):
    """The checkpoint cannot be served from a graph; the message says why."""


# Pairs for the heads that read two texts (cross-encoders): one pair long enough to be truncated in the tokenizer check.
PROBE_PAIRS = [("hi", "The quick brown fox jumps over the lazy dog near the river bank, twice."),
               ("what do embedding servers do?", "Embedding servers batch sentences of very different lengths."),
               ("Ünïcödé, emoji 🙂", "and 数字 123"), ("a question", "a rather long answer " * 40)]
EXPORT_PAIRS = [("a short question", "a short answer"), ("another question", "another, somewhat longer answer")]


class _Positional(torch.nn.Module):
    """The head model as a positional function of its inputs, which the tracer needs."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(**dict(zip(self.names, args, strict=True)))
        return out


def tokenize(tokenizer: Any, head: str, texts: list[str], pairs: list[tuple[str, str]], **kwargs: Any) -> Any:
    """The probe or export batch for `head`: pairs for a pair head, single texts otherwise."""
    if pair_head(head):
        return tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation=True, max_length=64, **kwargs)
    return tokenizer(texts, **kwargs)


def input_names(model: torch.nn.Module, tokenizer: Any, head: str = HIDDEN) -> list[str]:
    if head == CLIP_IMAGE:
        return ["pixel_values"]
    accepted = inspect.signature(model.forward).parameters
    produced = set(getattr(tokenizer, "model_input_names", INPUTS))
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in accepted and "token_type_ids" in produced:
        names.append("token_type_ids")
    return names


@dataclass(frozen=True)
class Traced:
    """What an export traced: the module, the example it traced on and its inputs' names, in order."""

    module: torch.nn.Module
    example: tuple[torch.Tensor, ...]
    names: list[str]


def export(model: torch.nn.Module, tokenizer: Any, names: list[str], out: Path, head: str = HIDDEN,
           pixels: np.ndarray | None = None, packed: bool = False) -> Traced:
    """Trace the encoder and its head to `out`, leaving the model in eval mode; an image head traces `pixels`, a
    packed export (`export_packed`) takes its inputs in adapters.packed_feed's layout. What was traced, for
    save_openvino_ir."""
    graph_names = list(names)
    if pixels is not None:  # of the processor's size: only the batch varies
        sample = {"pixel_values": torch.from_numpy(pixels)}
        axes: dict[str, dict[int, str]] = {"pixel_values": {0: "batch"}}
        wrapper: torch.nn.Module = _Positional(model, names)
    elif packed:
        padded = tokenize(tokenizer, head, EXPORT_TEXTS, EXPORT_PAIRS, padding=True, return_tensors="np")
        sample = {k: torch.from_numpy(v) for k, v in pack({k: np.asarray(v, np.int64) for k, v in padded.items()
                                                          if k in names}).items()}
        graph_names = list(PACKED_INPUTS)
        axes = {name: {0: "tokens"} for name in graph_names}
        axes["gather_index"] = axes["attention_mask"] = {0: "batch", 1: "sequence"}
        wrapper = PackedEncoder(model.model) if hidden_state_head(head) else PackedClassifier(model.model)
    else:
        sample = tokenize(tokenizer, head, EXPORT_TEXTS, EXPORT_PAIRS, padding=True, return_tensors="pt")
        axes = {name: {0: "batch", 1: "sequence"} for name in names}
        wrapper = _Positional(model, names)
    axes["output"] = {0: "batch", 1: "sequence"} if per_token_head(head) else {0: "batch"}
    wrapper.eval()
    example = tuple(sample[name] for name in graph_names)
    try:
        # The TorchScript exporter warns about itself and about traced Python branches; the check after it is what
        # decides whether the graph is right.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, example, str(out), input_names=graph_names,
                              output_names=["output"], dynamic_axes=axes, opset_version=OPSET,
                              dynamo=False)
    finally:
        model.eval()  # the exporter restores the training flag of the wrapper onto its children
    return Traced(wrapper, example, graph_names)


def graph_inputs(path: Path, names: list[str]) -> list[str]:
    """The inputs the traced graph kept, in `names` order: the exporter drops one the model ignores (DeBERTa-v2's
    token types when it has no type embeddings)."""
    import onnxruntime as ort

    kept = {i.name for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()}
    return [name for name in names if name in kept]


def onnx_hidden(path: Path, feeds: list[dict[str, np.ndarray]], packed: bool = False) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(session.run(None, pack(feed) if packed else feed)[0]) for feed in feeds]


def save_openvino_ir(onnx_path: Path, out: Path, packed: Traced | None = None) -> None:
    """The graph in OpenVINO's own format too, weights stored in float16, where OpenVINO is installed. A worker that
    compiles it holds ~105 MiB for MiniLM against ~210 MiB from the ONNX file, whose float32 constants OpenVINO keeps
    (bench/README.md, "lean workers"); float16 weights cost nothing measurable on the probe's cosine.

    A packed graph is converted from the traced torch module itself, not from its ONNX file: OpenVINO's PyTorch
    frontend keeps each layer's `scaled_dot_product_attention` as one ScaledDotProductAttention op, which the CPU
    plugin runs as one fused kernel, where the ONNX file (opset 17 has no attention op) spells it as seven (MatMul,
    Softmax, IsNaN, Select...). The worker checks either graph against torch on the probe batches when it opens it."""
    try:
        import openvino as ov
    except ImportError:
        return
    if packed is None:
        model = ov.Core().read_model(onnx_path)
    else:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's warnings on Python branches, as in export()
            model = ov.convert_model(packed.module, example_input=packed.example)
        for port, name in zip(model.inputs, packed.names, strict=True):  # the frontend names some inputs by number
            port.get_tensor().set_names({name})
        model.outputs[0].get_tensor().set_names({"output"})
    ov.save_model(model, out, compress_to_fp16=True)


def check_pairs(tokenizer: Any, backend: Any) -> None:
    """The Rust tokenizer must tokenise pairs as transformers does, token types included, and truncate a long pair
    the same way (longest first, from the right, as `CrossEncoder` asks)."""
    expected = tokenizer([q for q, _ in PROBE_PAIRS], [d for _, d in PROBE_PAIRS], truncation=True, max_length=48)
    backend.enable_truncation(48, strategy="longest_first", direction="right")
    try:
        got = backend.encode_batch(PROBE_PAIRS)
    finally:
        backend.no_truncation()
    if [e.ids for e in got] != expected["input_ids"]:
        raise NotExportable("its Rust tokenizer alone does not tokenise pairs as transformers does")
    if "token_type_ids" in expected and [e.type_ids for e in got] != expected["token_type_ids"]:
        raise NotExportable("its Rust tokenizer alone does not give pairs transformers' token types")


def check_tokenizer(tokenizer: Any, head: str = HIDDEN) -> Any:
    """The fast tokenizer's Rust backend, after checking it tokenises the probe texts (or pairs, for a pair head)
    exactly as transformers does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        raise NotExportable("its tokenizer is a slow (Python) one, with no tokenizer.json")
    backend.no_padding()
    backend.no_truncation()
    expected = tokenizer(PROBE_TEXTS)["input_ids"]
    if [encoding.ids for encoding in backend.encode_batch(PROBE_TEXTS)] != expected:
        raise NotExportable("its Rust tokenizer alone does not tokenise as transformers does")
    if pair_head(head):
        check_pairs(tokenizer, backend)
    return backend


def probe_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """The long probe's length: the model's maximum (its tokenizer's and its position table's), capped."""
    bounds = [PROBE_MAX_LENGTH, int(min(tokenizer.model_max_length, 1 << 20))]
    positions = getattr(model.config, "max_position_embeddings", None)
    return min([*bounds, *([int(positions)] if positions else [])])


def long_probe(tokenizer: Any, names: list[str], length: int) -> dict[str, np.ndarray]:
    """Two rows of LONG_TEXT, one of `length` tokens and one of three quarters of it, padded: bf16's error grows with
    the length attended over, so the check must see the longest input a worker serves."""
    text = LONG_TEXT
    while len(tokenizer(text, truncation=True, max_length=length)["input_ids"]) < length:  # truncated: no warning
        text = f"{text} {LONG_TEXT}"
    rows = [tokenizer(text, truncation=True, max_length=n) for n in (length, max(2, 3 * length // 4))]
    feed = {name: np.zeros((2, length), dtype=np.int64) for name in names}
    feed["input_ids"][:] = int(tokenizer.pad_token_id or 0)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        feed["attention_mask"][i, :n] = 1
        for name in names:
            if name != "attention_mask":
                feed[name][i, :n] = row[name]
    return feed


def text_probes(model: torch.nn.Module, tokenizer: Any, head: str, names: list[str]) -> list[dict[str, np.ndarray]]:
    """The short texts (or pairs) padded together, and the long text. The long probe is one text (one segment, for a
    pair head too): it checks the numbers at length, where a runtime's rounding accumulates most."""
    short = tokenize(tokenizer, head, PROBE_TEXTS, PROBE_PAIRS, padding=True, pad_to_multiple_of=8, return_tensors="np")
    return [{name: np.asarray(short[name], dtype=np.int64) for name in names},
            long_probe(tokenizer, names, probe_length(model.model, tokenizer))]


def image_head_probes(weights_dir: Path, head: str) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """For the CLIP image head: its probe batches of pixel values and the image steps for `graph.json`, after checking
    that the steps equal the checkpoint's image processor (NotExportable if not); nothing for any other head."""
    if head != CLIP_IMAGE:
        return [], {}
    try:
        steps = checked_steps(image_processor(weights_dir))
    except clip_pixels.Unsupported as exc:
        raise NotExportable(str(exc)) from None
    return image_probes(steps), {"image_steps": msgspec.to_builtins(steps)}


def packable(model: torch.nn.Module, head: str) -> bool:
    """Whether export_packed reproduces `head` over this checkpoint: a BERT-shaped encoder's last hidden state, or its
    sequence or token classification head."""
    if hidden_state_head(head):
        return unpackable(model.model) is None
    return head in (SEQUENCE_LOGITS, TOKEN_LOGITS) and classifier_unpackable(model.model) is None


def export_checked(model: torch.nn.Module, tokenizer: Any, names: list[str], staging: Path, head: str,
                   image_feeds: list[dict[str, np.ndarray]], packed: bool,
                   ) -> tuple[list[str], dict[str, np.ndarray], float, Traced]:
    """Export the graph into `staging` and run it under ONNX Runtime on the probe batches: the input names a worker
    feeds, the probe record (inputs and torch's outputs), the graph's agreement with torch and what was traced."""
    traced = export(model, tokenizer, names, staging / "model.onnx", head,
           image_feeds[0]["pixel_values"][:2] if image_feeds else None, packed)
    if not packed:  # a packed graph reads every input it is given (export_packed)
        names = graph_inputs(staging / "model.onnx", names)
    feeds = image_feeds or text_probes(model, tokenizer, head, names)
    probe: dict[str, np.ndarray] = {}
    cosine = 1.0
    for prefix, feed, onnx in zip(PROBE_BATCHES, feeds, onnx_hidden(staging / "model.onnx", feeds, packed),
                                  strict=True):
        with torch.inference_mode():
            hidden = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).float().numpy()
        cosine = min(cosine, agreement(head, hidden, onnx, feed.get("attention_mask")))
        probe.update({prefix + "hidden": hidden, **{prefix + name: value for name, value in feed.items()}})
    return names, probe, cosine, traced


def export_folder(weights_dir: Path, folder: Path, head: str = HIDDEN, padded: bool = False) -> float:
    """Write the complete graph folder for `weights_dir` and `head` at `folder`, packed where the encoder allows it
    (export_packed) unless `padded`; the graph's agreement with torch (`graph_cache.agreement`)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load in the server's log says nothing
    tokenizer = AutoTokenizer.from_pretrained(weights_dir, local_files_only=True)
    backend = check_tokenizer(tokenizer, head)
    image_feeds, extra = image_head_probes(weights_dir, head)
    model = head_model(weights_dir, head)
    names = input_names(model.model, tokenizer, head)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(folder.name), dir=folder.parent))
    try:
        packed = not padded and packable(model, head)
        names, probe, cosine, traced = export_checked(model, tokenizer, names, staging, head, image_feeds, packed)
        if packed and cosine < min_agreement(head):
            log.warning("the packed graph of %s disagrees with torch (agreement %.6f); exporting it padded",
                        weights_dir, cosine)
            packed = False
            names, probe, cosine, traced = export_checked(model, tokenizer, names, staging, head, image_feeds, packed)
        if cosine < min_agreement(head):
            raise NotExportable(f"the graph disagrees with torch (agreement {cosine:.6f} < {min_agreement(head)})")
        save_openvino_ir(staging / "model.onnx", staging / OPENVINO_IR, traced if packed else None)
        backend.save(str(staging / "tokenizer.json"))
        np.savez(staging / "probe.npz", **probe)
        write_head_files(weights_dir, head, staging)
        width = int(probe["hidden"].shape[-1])
        write_graph_meta(staging, names, int(getattr(model.model.config, "hidden_size", width)),
                         int(tokenizer.pad_token_id or 0), int(min(tokenizer.model_max_length, 1 << 20)),
                         bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)), cosine, head=head,
                         output_width=width, special_ids=special_ids(tokenizer), layout=PACKED if packed else PADDED,
                         **extra)
        try:
            staging.rename(folder)  # atomic; fails when a concurrent helper got there first, whose folder serves
        except OSError:
            if not (folder / "graph.json").is_file():
                raise
        return cosine
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) > 2 and argv[2].isdigit():
        die_with_parent(signal.SIGKILL, int(argv[2]))  # nothing here is worth finishing once the worker is gone
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s sie-export %(message)s")
    head = argv[argv.index("--head") + 1] if "--head" in argv else HIDDEN
    weights_dir, folder = Path(argv[0]), Path(argv[1])
    started = time.perf_counter()
    try:
        cosine = export_folder(weights_dir, folder, head, padded="--padded" in argv)
    except NotExportable as exc:
        print(exc, flush=True)  # the worker's warning says why (graph_cache.ensure_graph)
        return NOT_EXPORTABLE
    except Exception as exc:  # the tracer or a runtime refusing the model: the worker serves it with torch
        log.info("the export of %s failed", weights_dir, exc_info=True)
        print(f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}", flush=True)
        return 1
    log.info("exported %s (head %s) in %.1fs (agreement with torch %.6f) to %s", weights_dir, head,
             time.perf_counter() - started, cosine, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
