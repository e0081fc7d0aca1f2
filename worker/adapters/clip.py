"""CLIP text and image embeddings in one space on torch (worker process): both towers, normalisation. Images are
decoded with Pillow on the prepare thread within byte and pixel limits (clip_inputs, shared with the lean adapter);
an item with images takes the image tower (several images mean-pooled), any other the text tower (at most 77 tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoProcessor, CLIPModel

from sie_worker.adapters.base import LoadInfo, Prepared, UnsupportedTask, refuse_over_length, truncates
from sie_worker.adapters.clip_inputs import (
    TEXT_TOKENS,
    ClipBatch,
    ClipLimits,
    pool_images,
    raise_pillow_limit,
    text_rows,
)
from sie_worker.adapters.torch_common import (
    MICRO_BATCH_ITEMS,
    Stopwatch,
    compute_dtype,
    full_warm_up,
    memory_bytes,
    release,
    to_device,
    torch_device,
    warm_up,
)
from sie_worker.options import ClipOptions
from sie_worker.protocol import EncodeBatch, EncodeResult, Tensor, WorkerSpec


class ClipAdapter:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch_device(spec.device)
        self.weights_dir = Path(spec.weights_dir)
        self.limits = ClipLimits.of(spec.options_as(ClipOptions))

    def load(self) -> LoadInfo:
        self.processor = AutoProcessor.from_pretrained(  # type: ignore[no-untyped-call]
            self.weights_dir, local_files_only=True)
        dtype = compute_dtype(self.spec.compute_precision, self.device)
        model = CLIPModel.from_pretrained(self.weights_dir, local_files_only=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.dtype = dtype
        positions = int(self.model.config.text_config.max_position_embeddings)
        self.max_length = min(self.spec.max_sequence_length or TEXT_TOKENS, positions)
        raise_pillow_limit(self.limits.max_pixels)
        dim = int(self.model.config.projection_dim)
        self._warm_up()
        return LoadInfo(dims={"dense": dim}, capabilities=["dense"], max_sequence_length=self.max_length)

    def _warm_up(self) -> None:
        """Both towers: the text tower through torch_common.warm_up, the image tower with as many blank images as a
        micro-batch has items where full_warm_up says so (on a GPU: an OOM shows at load, not under traffic)."""
        warm_up(lambda t: self._text_vectors(t, self.limits.normalize), self.processor.tokenizer, self.max_length,
                self.spec, self.device)
        size = self.model.config.vision_config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        with torch.inference_mode():
            for rows in (MICRO_BATCH_ITEMS, 1) if full_warm_up(self.spec, self.device) else (1,):
                pixels = torch.zeros((rows, 3, int(height), int(width)))
                self._image_vectors(pixels, [1] * rows, self.limits.normalize)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prepare(self, batch: Any) -> Prepared:
        if not isinstance(batch, EncodeBatch):
            raise UnsupportedTask("this model only encodes")
        clock = Stopwatch()
        split = ClipBatch.split(batch, self.limits)
        inputs: dict[str, Any] = {}
        text_counts: list[int] = []
        if split.texts:
            truncate, tokenizer = truncates(batch.options), self.processor.tokenizer
            # The tokenizer belongs to the prepare thread, so setting its side for one call is safe.
            side, tokenizer.truncation_side = tokenizer.truncation_side, str(batch.options.get("truncation_direction",
                                                                                               "right"))
            try:
                encoded = tokenizer(split.texts, padding=True, truncation=truncate,
                                    max_length=self.max_length if truncate else None, return_tensors="pt")
            finally:
                tokenizer.truncation_side = side
            text_counts = encoded["attention_mask"].sum(dim=1).tolist()
            if not truncate:
                refuse_over_length(text_counts, self.max_length)
            inputs["text"] = dict(encoded)
        if split.images:
            inputs["pixel_values"] = self.processor.image_processor(images=split.images,
                                                                    return_tensors="pt")["pixel_values"]
        return Prepared(batch=batch, inputs=inputs, token_counts=split.token_counts(text_counts),
                        tokenize_ms=clock.ms(), extra={"split": split})

    def forward(self, prepared: Prepared) -> EncodeResult:
        batch = prepared.batch
        assert isinstance(batch, EncodeBatch)
        normalize = bool(batch.options.get("normalize", self.limits.normalize))
        split: ClipBatch = prepared.extra["split"]
        with torch.inference_mode():
            text = self._text_vectors(prepared.inputs.get("text"), normalize)
            image = self._image_vectors(prepared.inputs.get("pixel_values"), split.image_counts(), normalize)
        return EncodeResult(token_counts=prepared.token_counts, dense=Tensor.from_numpy(split.rows(text, image)))

    def _text_vectors(self, encoded: dict[str, torch.Tensor] | None, normalize: bool) -> np.ndarray:
        if encoded is None:
            return np.zeros((0, 0), dtype=np.float32)
        vectors = self.model.get_text_features(**to_device(encoded, self.device)).pooler_output
        return text_rows(vectors.float().cpu().numpy(), normalize)

    def _image_vectors(self, pixels: torch.Tensor | None, counts: list[int], normalize: bool) -> np.ndarray:
        if pixels is None:
            return np.zeros((0, 0), dtype=np.float32)
        pixels = to_device({"pixel_values": pixels}, self.device)["pixel_values"].to(self.dtype)
        vectors = self.model.get_image_features(pixel_values=pixels).pooler_output
        return pool_images(vectors.float().cpu().numpy(), counts, normalize)

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        release(self.device)
