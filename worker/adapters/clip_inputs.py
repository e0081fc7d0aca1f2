"""What the CLIP adapters share, torch or lean (worker process, free of torch): the profile's modalities, images decoded
safely with Pillow within byte and pixel limits, a batch split into texts and images, and rows pooled per item.

An item with images takes the image tower (several images mean-pooled), any other the text tower (at most 77 tokens).
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from sie_worker.adapters.base import BadInput
from sie_worker.options import ClipOptions
from sie_worker.protocol import EncodeBatch, InputItem

TEXT_TOKENS = 77


def allowed_inputs(options: ClipOptions) -> set[str]:
    """Modalities the profile allows: `inputs` as a list (["image"]) or flags ({text: true, image: false})."""
    if options.inputs is None:
        return {"text", "image"}
    if isinstance(options.inputs, dict):
        return {kind for kind, on in options.inputs.items() if on}
    return set(options.inputs)


def raise_pillow_limit(max_pixels: int) -> None:
    """Pillow refuses images over its own bomb limit before ours; keep its limit at least as high as ours."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


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


@dataclass(frozen=True)
class ClipLimits:
    """A CLIP profile's modalities and image limits, read once from its options."""

    inputs: frozenset[str]
    max_bytes: int
    max_pixels: int
    normalize: bool

    @classmethod
    def of(cls, options: ClipOptions) -> ClipLimits:
        return cls(frozenset(allowed_inputs(options)), options.max_image_bytes, options.max_image_pixels,
                   options.normalize)

    def kind(self, i: int, item: InputItem) -> str:
        """"image" or "text", or BadInput for an item with neither or of a modality the profile refuses."""
        kind = "image" if item.images else "text" if item.text is not None else ""
        if not kind:
            raise BadInput(f"item {i} has neither text nor images")
        if kind not in self.inputs:
            raise BadInput(f"item {i} is {kind} input; this model takes only {sorted(self.inputs)}")
        return kind


@dataclass(frozen=True)
class ClipBatch:
    """A batch split by tower: each item's kind, the texts in order, the decoded images in order, images per item."""

    kinds: list[str]
    texts: list[str]
    images: list[Image.Image]
    images_per_item: list[int]

    @classmethod
    def split(cls, batch: EncodeBatch, limits: ClipLimits) -> ClipBatch:
        kinds = [limits.kind(i, item) for i, item in enumerate(batch.items)]
        texts = [item.text or "" for item, kind in zip(batch.items, kinds, strict=True) if kind == "text"]
        images = [decode_image(data, limits.max_bytes, limits.max_pixels)
                  for item, kind in zip(batch.items, kinds, strict=True) if kind == "image" for data in item.images]
        return cls(kinds, texts, images, [len(item.images) for item in batch.items])

    def token_counts(self, text_counts: list[int]) -> list[int]:
        """Each item's tokens: its text's for a text item, 0 for an image item."""
        counts = iter(text_counts)
        return [next(counts) if kind == "text" else 0 for kind in self.kinds]

    def image_counts(self) -> list[int]:
        return [n for n, kind in zip(self.images_per_item, self.kinds, strict=True) if kind == "image"]

    def rows(self, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        """One float32 row per item, in item order, from the text rows and the pooled image rows."""
        texts, images = iter(text), iter(image)
        return np.stack([next(images) if kind == "image" else next(texts) for kind in self.kinds]).astype(np.float32)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows of unit length, as torch's F.normalize(p=2, eps=1e-12)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.asarray(vectors / np.maximum(norms, 1e-12), dtype=vectors.dtype)


def pool_images(vectors: np.ndarray, counts: list[int], normalize: bool) -> np.ndarray:
    """One float32 row per item from its images' rows: several images become their mean, renormalised, so every row
    of a normalised batch is unit length. Float32 first: fp16 squares overflow in the norm of large vectors."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if normalize:
        vectors = l2_normalize(vectors)
    if not counts:
        return vectors[:0]
    pooled = np.stack([vectors[a:b].mean(axis=0) for a, b in itertools.pairwise(np.cumsum([0, *counts]))])
    return l2_normalize(pooled) if normalize else pooled


def text_rows(vectors: np.ndarray, normalize: bool) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return l2_normalize(vectors) if normalize else vectors
