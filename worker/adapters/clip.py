"""CLIP text and image embeddings in one space (worker process): decoding images safely, both towers, normalisation.

Images are decoded with Pillow on the prepare thread, within byte and pixel limits; an item with images takes the image
tower (several images mean-pooled), any other the text tower (at most 77 tokens).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers import AutoProcessor, CLIPModel

from sie_worker.adapters.base import BadInput, LoadInfo, Prepared, UnsupportedTask
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
from sie_worker.protocol import ClipOptions, EncodeBatch, EncodeResult, InputItem, Tensor, WorkerSpec

TEXT_TOKENS = 77


def allowed_inputs(options: ClipOptions) -> set[str]:
    """Modalities the profile allows: `inputs` as a list (["image"]) or flags ({text: true, image: false})."""
    if options.inputs is None:
        return {"text", "image"}
    if isinstance(options.inputs, dict):
        return {kind for kind, on in options.inputs.items() if on}
    return set(options.inputs)


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """An RGB image, or BadInput for bytes that are too many, not an image, or too many pixels once decoded."""
    if len(data) > max_bytes:
        raise BadInput(f"image is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only, so the size check below costs nothing
        width, height = image.size
        if width * height > max_pixels:
            raise BadInput(f"image is {width}x{height} pixels, over the {max_pixels}-pixel limit")
        return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadInput(f"image data is not a decodable image of an accepted size: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data past a valid header
        raise BadInput(f"image data is not a decodable image: {exc}") from None


def pool_images(vectors: torch.Tensor, counts: list[int], normalize: bool) -> list[torch.Tensor]:
    """One float32 row per item from its images' rows: several images become their mean, renormalised, so every row
    of a normalised batch is unit length. Float32 first: fp16 squares overflow in the norm of large vectors."""
    vectors = vectors.float()
    if normalize:
        vectors = F.normalize(vectors, p=2, dim=-1)
    pooled = [group.mean(dim=0) for group in torch.split(vectors, counts)]
    return [F.normalize(v, p=2, dim=-1) if normalize else v for v in pooled]


class ClipAdapter:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch_device(spec.device)
        self.weights_dir = Path(spec.weights_dir)
        options = spec.options_as(ClipOptions)
        self.max_pixels, self.max_bytes = options.max_image_pixels, options.max_image_bytes
        self.inputs = allowed_inputs(options)
        self.normalize = options.normalize

    def load(self) -> LoadInfo:
        self.processor = AutoProcessor.from_pretrained(  # type: ignore[no-untyped-call]
            self.weights_dir, local_files_only=True)
        dtype = compute_dtype(self.spec.compute_precision, self.device)
        model = CLIPModel.from_pretrained(self.weights_dir, local_files_only=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.dtype = dtype
        positions = int(self.model.config.text_config.max_position_embeddings)
        self.max_length = min(self.spec.max_sequence_length or TEXT_TOKENS, positions)
        # Pillow refuses images over its own bomb limit before ours; keep its limit at least as high as ours.
        if Image.MAX_IMAGE_PIXELS is not None and self.max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = self.max_pixels
        dim = int(self.model.config.projection_dim)
        self._warm_up()
        return LoadInfo(dims={"dense": dim}, capabilities=["dense"], max_sequence_length=self.max_length)

    def _warm_up(self) -> None:
        """Both towers: the text tower through torch_common.warm_up, the image tower with as many blank images as a
        micro-batch has items where full_warm_up says so (on a GPU: an OOM shows at load, not under traffic)."""
        warm_up(lambda t: self._text_vectors(t, self.normalize), self.processor.tokenizer, self.max_length,
                self.spec, self.device)
        size = self.model.config.vision_config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        with torch.inference_mode():
            for rows in (MICRO_BATCH_ITEMS, 1) if full_warm_up(self.spec, self.device) else (1,):
                pixels = torch.zeros((rows, 3, int(height), int(width)))
                self._image_vectors(pixels, {"images_per_item": [1] * rows, "kinds": ["image"] * rows}, self.normalize)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _check_modality(self, i: int, item: InputItem) -> str:
        kind = "image" if item.images else "text" if item.text is not None else ""
        if not kind:
            raise BadInput(f"item {i} has neither text nor images")
        if kind not in self.inputs:
            raise BadInput(f"item {i} is {kind} input; this model takes only {sorted(self.inputs)}")
        return kind

    def prepare(self, batch: Any) -> Prepared:
        if not isinstance(batch, EncodeBatch):
            raise UnsupportedTask("this model only encodes")
        clock = Stopwatch()
        kinds = [self._check_modality(i, item) for i, item in enumerate(batch.items)]
        texts = [item.text or "" for item, kind in zip(batch.items, kinds, strict=True) if kind == "text"]
        images = [decode_image(data, self.max_bytes, self.max_pixels)
                  for item, kind in zip(batch.items, kinds, strict=True) if kind == "image" for data in item.images]
        inputs: dict[str, Any] = {}
        counts = [0] * len(kinds)
        if texts:
            encoded = self.processor.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                               return_tensors="pt")
            inputs["text"] = dict(encoded)
            text_counts = iter(encoded["attention_mask"].sum(dim=1).tolist())
            counts = [next(text_counts) if kind == "text" else 0 for kind in kinds]
        if images:
            inputs["pixel_values"] = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        extra = {"kinds": kinds, "images_per_item": [len(item.images) for item in batch.items]}
        return Prepared(batch=batch, inputs=inputs, token_counts=counts, tokenize_ms=clock.ms(), extra=extra)

    def forward(self, prepared: Prepared) -> EncodeResult:
        batch = prepared.batch
        assert isinstance(batch, EncodeBatch)
        normalize = bool(batch.options.get("normalize", self.normalize))
        kinds: list[str] = prepared.extra["kinds"]
        with torch.inference_mode():
            text = iter(self._text_vectors(prepared.inputs.get("text"), normalize))
            image = iter(self._image_vectors(prepared.inputs.get("pixel_values"), prepared.extra, normalize))
            rows = [next(image) if kind == "image" else next(text) for kind in kinds]
        dense = torch.stack(rows).float().cpu().numpy()
        return EncodeResult(token_counts=prepared.token_counts, dense=Tensor.from_numpy(dense))

    def _text_vectors(self, encoded: dict[str, torch.Tensor] | None, normalize: bool) -> list[torch.Tensor]:
        if encoded is None:
            return []
        vectors = self.model.get_text_features(**to_device(encoded, self.device)).pooler_output.float()
        return list(F.normalize(vectors, p=2, dim=-1) if normalize else vectors)

    def _image_vectors(self, pixels: torch.Tensor | None, extra: dict[str, Any], normalize: bool) -> list[torch.Tensor]:
        if pixels is None:
            return []
        pixels = to_device({"pixel_values": pixels}, self.device)["pixel_values"].to(self.dtype)
        vectors = self.model.get_image_features(pixel_values=pixels).pooler_output
        counts = [n for n, kind in zip(extra["images_per_item"], extra["kinds"], strict=True) if kind == "image"]
        return pool_images(vectors, counts, normalize)

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        release(self.device)
