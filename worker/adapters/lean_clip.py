"""CLIP text and image embeddings on CPU without torch (worker process): two cached graphs, the text tower and the image
tower each with its projection (`graph_cache.CLIP_TEXT`, `CLIP_IMAGE`), the Rust tokenizer, and the image processor's
steps in Pillow and numpy (clip_pixels), with the options, limits and refusals of the torch adapter (clip_inputs).

Both graphs run on the same runtime. A checkpoint whose image processor asks for a step clip_pixels does not
reproduce is not exported (the export helper says why) and torch serves it, as it does when either graph fails to open.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import psutil

from sie_worker.adapters import graph_cache, graph_runtime
from sie_worker.adapters.base import LoadInfo, Prepared, UnsupportedTask
from sie_worker.adapters.batching import MICRO_BATCH_ITEMS, Bucket, Stopwatch, read_json, split_for_lanes
from sie_worker.adapters.clip_inputs import (
    TEXT_TOKENS,
    ClipBatch,
    ClipLimits,
    pool_images,
    raise_pillow_limit,
    text_rows,
)
from sie_worker.adapters.clip_pixels import ImageSteps, pixel_values
from sie_worker.adapters.lean_engine import (
    HUNG_FACTOR,
    WARM_UP_FLOOR_S,
    GraphSession,
    build_lean,
    computes,
    engine_options,
    first_that_opens,
    open_lanes,
    run_engine,
)
from sie_worker.options import ClipOptions
from sie_worker.protocol import EncodeBatch, EncodeResult, Tensor, WorkerSpec

log = logging.getLogger("sie.worker")


def build(spec: WorkerSpec) -> LeanClipAdapter | None:
    """The lean adapter with both graphs open on one runtime, exporting them first if needed; None when torch must
    serve the model (lean_engine.build_lean says when, for either graph)."""
    weights = Path(spec.weights_dir)
    config = read_json(weights / "config.json")
    text_config = (config.get("text_config") if isinstance(config, dict) else None) or {}
    max_length = min(spec.max_sequence_length or TEXT_TOKENS, int(text_config.get("max_position_embeddings")
                                                                  or TEXT_TOKENS))
    text = build_lean(spec, weights, graph_cache.CLIP_TEXT,
                      lambda graph, runtime: GraphSession(spec, graph, runtime, max_length))
    if text is None:
        return None
    graph = graph_cache.ensure_graph(weights, engine_options(spec).onnx_cache_dir, graph_cache.CLIP_IMAGE)
    image = None if graph is None else first_that_opens(
        spec, [text.runtime_kind], graph, lambda graph, runtime: ImageSession(spec, graph, runtime, text.max_tokens))
    if image is None:
        text.close()
        return None
    return LeanClipAdapter(spec, text, image)


class ImageSession:
    """The image graph open on a runtime, with the processor's steps its `graph.json` holds."""

    def __init__(self, spec: WorkerSpec, graph: graph_cache.Graph, runtime_kind: str, max_tokens: int) -> None:
        self.spec, self.graph, self.runtime_kind = spec, graph, runtime_kind
        meta = read_json(graph.folder / "graph.json")
        self.steps = msgspec.convert(meta["image_steps"], ImageSteps)
        self.lanes: graph_runtime.Lanes | None = None
        config = read_json(Path(spec.weights_dir) / "config.json")
        vision = (config.get("vision_config") if isinstance(config, dict) else None) or {}
        patch = int(vision.get("patch_size") or 32)
        height, width = self.size
        image_tokens = (height // patch) * (width // patch) + 1  # the patches and the class token
        # The most images in one call: as many as the text session's token cap holds, at most MICRO_BATCH_ITEMS.
        self.rows = max(1, min(MICRO_BATCH_ITEMS, max_tokens // image_tokens))

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of every image's pixel values: the crop, else the fixed resize (export_clip asks one)."""
        size = self.steps.crop or self.steps.resize_to
        assert size is not None, "export_clip exports only steps of a fixed size"
        return size

    def open(self) -> None:
        self.lanes = open_lanes(self.spec, self.graph, self.runtime_kind)
        self.warm_up()

    def warm_up(self) -> None:
        """One image alone, then (unless `warm_up: small`) the largest image call on each stream, so that the memory
        reported at Ready is the working set: one call at a time, each with a deadline, as GraphSession.warm_up (which
        says why), so a runtime that hangs is handed on (here, with the text graph, to torch)."""
        assert self.lanes is not None, "open first"
        runtime = self.lanes.runtime
        started = time.monotonic()
        graph_runtime.within(WARM_UP_FLOOR_S, f"{runtime.describe()}'s first image call", runtime.run_alone,
                             self.zeros(1), thread="sie-warm-up")
        per_image = time.monotonic() - started
        if engine_options(self.spec).warm_up == "small":
            return
        for _ in range(runtime.lanes):
            deadline = max(WARM_UP_FLOOR_S, HUNG_FACTOR * per_image * self.rows)
            graph_runtime.within(deadline, f"{runtime.describe()}'s warm-up call ({self.rows} images)", runtime.run,
                                 self.zeros(self.rows), thread="sie-warm-up")

    def zeros(self, rows: int) -> dict[str, np.ndarray]:
        return {"pixel_values": np.zeros((rows, 3, *self.size), dtype=np.float32)}

    def buckets(self, pixels: np.ndarray, rows: int) -> list[Bucket]:
        return [(list(range(start, min(start + rows, len(pixels)))), {"pixel_values": pixels[start:start + rows]})
                for start in range(0, len(pixels), rows)]

    def run(self, pixels: np.ndarray, rows: int) -> np.ndarray:
        """The image embeddings [N, D] of pixel values [N, 3, H, W], in calls of at most `rows` images."""
        assert self.lanes is not None, "open first"
        out = np.empty((len(pixels), self.graph.output_width), dtype=np.float32)
        buckets = split_for_lanes(self.buckets(pixels, rows), self.lanes.runtime.lanes)
        for (indices, _), vectors in zip(buckets, self.lanes.run_all([feed for _, feed in buckets]), strict=True):
            out[indices] = vectors
        return out

    def close(self) -> None:
        if self.lanes is not None:
            self.lanes.close()
        self.lanes = None


class LeanClipAdapter:
    """The text session (lean_engine.GraphSession) and the image session, and clip_inputs' steps around them."""

    def __init__(self, spec: WorkerSpec, text: GraphSession, image: ImageSession) -> None:
        self.spec, self.session, self.image = spec, text, image
        text.neighbours.append(image)  # texts take every thread only while neither tower's calls run
        self.limits = ClipLimits.of(spec.options_as(ClipOptions))
        self.max_length = text.max_length

    def load(self) -> LoadInfo:
        raise_pillow_limit(self.limits.max_pixels)
        if self.session.lanes is None:
            self.session.open()
        if self.image.lanes is None:
            self.image.open()
        assert self.image.lanes is not None
        # Each graph falls back to float32 on its own where bf16 misses the probe's bar: the worker reports the less
        # precise of the two, which the bars of its results are set by.
        precisions = {self.session.precision, computes(self.image.lanes)}
        return LoadInfo(dims={"dense": self.image.graph.output_width}, capabilities=["dense"],
                        max_sequence_length=self.max_length, engine=run_engine(self.session.runtime_kind),
                        precision="bfloat16" if "bfloat16" in precisions else self.session.precision)

    def prepare(self, batch: Any) -> Prepared:
        if not isinstance(batch, EncodeBatch):
            raise UnsupportedTask("this model only encodes")
        clock = Stopwatch()
        split = ClipBatch.split(batch, self.limits)
        encodings = self.session.tokenize(split.texts, batch.options) if split.texts else []
        inputs = {"text": self.session.buckets(encodings) if encodings else [],
                  "pixels": pixel_values(split.images, self.image.steps) if split.images else None}
        return Prepared(batch=batch, inputs=inputs, token_counts=split.token_counts([len(e.ids) for e in encodings]),
                        tokenize_ms=clock.ms(), extra={"split": split, "texts": len(encodings)})

    def forward(self, prepared: Prepared) -> EncodeResult:
        batch = prepared.batch
        assert isinstance(batch, EncodeBatch) and self.session.lanes is not None
        normalize = bool(batch.options.get("normalize", self.limits.normalize))
        split: ClipBatch = prepared.extra["split"]
        text = np.empty((prepared.extra["texts"], self.image.graph.output_width), dtype=np.float32)
        buckets, outputs = self.session.start(prepared.inputs["text"])  # at its turn: images run after the texts
        for (indices, _), vectors in zip(buckets, outputs(), strict=True):
            text[indices] = vectors
        pixels = prepared.inputs["pixels"]
        images = self.image.run(pixels, self.image.rows) if pixels is not None else text[:0]
        rows = split.rows(text_rows(text, normalize), pool_images(images, split.image_counts(), normalize))
        return EncodeResult(token_counts=prepared.token_counts, dense=Tensor.from_numpy(rows))

    def memory_bytes(self) -> int:
        return int(psutil.Process(os.getpid()).memory_info().rss)

    def close(self) -> None:
        self.session.close()
        self.image.close()
