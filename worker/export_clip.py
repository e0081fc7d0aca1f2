"""The CLIP image tower's export (export helper process, with torch and transformers): the checkpoint's image processor
resolved into `clip_pixels.ImageSteps`, checked to equal the processor bit for bit on probe images of odd sizes and
modes, and the probe batches of pixel values the image graph is checked on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sie_worker.adapters.clip_pixels import ImageSteps, Unsupported, pixel_values

# (width, height, mode): tall, wide, tiny, square and odd sizes, in the modes images arrive in (each decoded to RGB as
# the adapters decode them), so that the resize's rounding, the crop's centre and the padding of a small image show.
PROBE_IMAGES = ((48, 40, "RGB"), (17, 333, "RGBA"), (333, 17, "L"), (1, 1, "P"), (257, 255, "CMYK"),
                (224, 224, "RGB"), (5, 900, "LA"), (641, 479, "RGB"))


def probe_images() -> list[Image.Image]:
    """Random pixels in each of PROBE_IMAGES' sizes and modes, converted to RGB."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).convert("RGB")
            for w, h, mode in PROBE_IMAGES]


def _size(value: Any, name: str) -> dict[str, int]:
    found = {key: int(v) for key, v in dict(value or {}).items() if v is not None}
    if not found:
        raise Unsupported(f"its image processor has no {name}")
    return found


def _three(value: Any, name: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise Unsupported(f"its image processor's {name} has {len(values)} values, not one per RGB channel")
    return values[0], values[1], values[2]


def steps_of(processor: Any) -> ImageSteps:
    """The steps of a transformers Pillow image processor, or Unsupported naming what is not reproduced: another
    backend (torchvision's resize differs), a subclass with steps of its own, padding, a resize by longest edge or
    maximum size, or a filter that is not Pillow's."""
    from transformers.image_processing_backends import PilBackend

    kind = type(processor)
    if not isinstance(processor, PilBackend):
        raise Unsupported(f"its image processor is {kind.__name__}, not transformers' Pillow one")
    for step in ("process_image", "_preprocess", "resize", "center_crop", "rescale", "normalize"):
        if getattr(kind, step) is not getattr(PilBackend, step):
            raise Unsupported(f"its image processor {kind.__name__} has a {step} step of its own")
    if getattr(processor, "do_pad", None):
        raise Unsupported("its image processor pads images")
    if not isinstance(processor.resample, int):
        raise Unsupported(f"its image processor's resample filter {processor.resample!r} is not a Pillow filter")
    fields: dict[str, Any] = {"resample": int(processor.resample)}
    if processor.do_resize:
        size = _size(processor.size, "size")
        if set(size) == {"shortest_edge"}:
            fields["shortest_edge"] = size["shortest_edge"]
        elif set(size) == {"height", "width"}:
            fields["resize_to"] = (size["height"], size["width"])
        else:
            raise Unsupported(f"its image processor resizes by {sorted(size)}, not by shortest edge or to a size")
    if processor.do_center_crop:
        crop = _size(processor.crop_size, "crop_size")
        if set(crop) != {"height", "width"}:
            raise Unsupported(f"its image processor crops to {sorted(crop)}, not to a height and width")
        fields["crop"] = (crop["height"], crop["width"])
    if "crop" not in fields and "resize_to" not in fields:
        raise Unsupported("its image processor neither crops nor resizes to a fixed size, so images differ in size")
    if processor.do_rescale:
        fields["rescale"] = float(processor.rescale_factor)
    if processor.do_normalize:
        fields["mean"], fields["std"] = _three(processor.image_mean, "mean"), _three(processor.image_std, "std")
    if not processor.do_rescale and not processor.do_normalize:
        raise Unsupported("its image processor neither rescales nor normalises (the model would take bytes)")
    return ImageSteps(**fields)


def checked_steps(processor: Any) -> ImageSteps:
    """`steps_of(processor)`, after checking that they give the processor's pixel values exactly on every probe
    image; Unsupported otherwise."""
    steps = steps_of(processor)
    for image in probe_images():
        want = np.asarray(processor(images=[image], return_tensors="np")["pixel_values"])
        got = pixel_values([image], steps)
        if want.shape != got.shape or want.dtype != got.dtype or not np.array_equal(want, got):
            raise Unsupported(f"its image processor's pixel values for a {image.width}x{image.height} image differ "
                              "from Pillow and numpy's")
    return steps


def image_processor(weights_dir: Path) -> Any:
    """The image processor the torch CLIP adapter uses (its processor's)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(weights_dir, local_files_only=True).image_processor


def image_probes(steps: ImageSteps) -> list[dict[str, np.ndarray]]:
    """The image graph's two probe batches, as the lean worker computes them: every probe image, and one image alone."""
    images = probe_images()
    return [{"pixel_values": pixel_values(images, steps)}, {"pixel_values": pixel_values(images[-1:], steps)}]
