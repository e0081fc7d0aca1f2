"""CLIP's image preprocessing in Pillow and numpy (worker process, free of torch and transformers): the steps of
transformers' Pillow image processor (`CLIPImageProcessorPil`, the `PilBackend`), operation for operation, so that a
lean worker's pixel values equal the processor's bit for bit.

The export helper reads the steps from the checkpoint's processor as transformers resolves it (`export_clip`), refuses
what this module does not reproduce, checks equality on probe images of odd sizes and modes, and writes the steps into
the image graph's `graph.json`; the lean worker reads them back (`ImageSteps`).
"""

from __future__ import annotations

import msgspec
import numpy as np
from PIL import Image


class Unsupported(Exception):
    """The checkpoint's image processor asks for a step this module does not reproduce; the message says which."""


class ImageSteps(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The processor's steps, resolved: resize (shortest edge kept in proportion, or to a fixed size), center crop,
    rescale, normalise. None skips a step."""

    resample: int  # a Pillow filter (PIL.Image.Resampling)
    shortest_edge: int | None = None
    resize_to: tuple[int, int] | None = None  # (height, width)
    crop: tuple[int, int] | None = None  # (height, width)
    rescale: float | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


def _resized(width: int, height: int, steps: ImageSteps) -> tuple[int, int] | None:
    """(height, width) after the resize step, as transformers' `get_resize_output_image_size` computes it."""
    if steps.resize_to is not None:
        return steps.resize_to
    if steps.shortest_edge is None:
        return None
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(steps.shortest_edge * long / short)
    return (new_long, steps.shortest_edge) if width <= height else (steps.shortest_edge, new_long)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, H, W] cropped about the centre, zero-padded where the image is smaller (transformers' `center_crop`)."""
    rows, cols = pixels.shape[-2:]
    top, left = (rows - height) // 2, (cols - width) // 2
    if top >= 0 and left >= 0:
        return pixels[:, top:top + height, left:left + width]
    new_rows, new_cols = max(height, rows), max(width, cols)
    canvas = np.zeros((pixels.shape[0], new_rows, new_cols), dtype=pixels.dtype)
    pad_top, pad_left = -(-(new_rows - rows) // 2), -(-(new_cols - cols) // 2)  # ceil
    canvas[:, pad_top:pad_top + rows, pad_left:pad_left + cols] = pixels
    top, left = top + pad_top, left + pad_left
    return canvas[:, max(0, top):min(new_rows, top + height), max(0, left):min(new_cols, left + width)]


def pixels_of(image: Image.Image, steps: ImageSteps) -> np.ndarray:
    """One RGB image's float32 [3, H, W] pixel values."""
    size = _resized(image.width, image.height, steps)
    if size is not None:
        image = image.resize((size[1], size[0]), resample=steps.resample)
    pixels = np.asarray(image).transpose(2, 0, 1)
    if steps.crop is not None:
        pixels = _center_crop(pixels, *steps.crop)
    values = pixels.astype(np.float32)
    if steps.rescale is not None:
        values = (pixels.astype(np.float64) * steps.rescale).astype(np.float32)  # upcast first, as transformers
    if steps.mean is not None and steps.std is not None:
        mean = np.asarray(steps.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(steps.std, dtype=np.float32)[:, None, None]
        values = (values - mean) / std
    return np.ascontiguousarray(values, dtype=np.float32)


def pixel_values(images: list[Image.Image], steps: ImageSteps) -> np.ndarray:
    """A batch's float32 [N, 3, H, W] pixel values."""
    return np.stack([pixels_of(image, steps) for image in images])
