"""The lean CLIP adapter against the torch one and `CLIPModel` on the tiny checkpoint, on each engine: text and image
embeddings, several images per item, unnormalised vectors; Pillow and numpy pixel values equal to transformers' image
processor; an image processor it does not reproduce is served by torch, with the reason logged."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessorPil, CLIPModel

from sie_worker.adapters.base import BadInput, InputTooLong
from sie_worker.adapters.clip import ClipAdapter
from sie_worker.adapters.clip_pixels import pixel_values
from sie_worker.adapters.lean_clip import LeanClipAdapter
from sie_worker.export_clip import PROBE_IMAGES, checked_steps, probe_images, steps_of
from sie_worker.protocol import EncodeBatch, EncodeResult, InputItem
from tests import declared, precision, tiny_extract_models
from tests.adapters.conftest import MakeAdapter
from tests.adapters.test_lean_families import ENGINES, lean
from tests.extract_server import image_bytes

declared.module("openvino")
declared.module("onnxruntime")

WIDTH = 256
TEXTS = ["a photo of a cat", "a red square on a blue background, " * 30, "hi"]  # the second is over 77 tokens
IMAGES = [image_bytes(fmt, size, seed=i) for i, (fmt, size) in enumerate(
    [("JPEG", (48, 40)), ("PNG", (17, 90)), ("WEBP", (120, 33)), ("PNG", (32, 32)), ("JPEG", (5, 7))])]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP with a 256-d joint space: the bf16 bars on each element are set for vectors of real width (a
    16-d unit vector's elements carry 4x the rounding of a 256-d one's; CLIP's are 512-d and wider)."""
    return tiny_extract_models.build_clip(tmp_path_factory.mktemp("clip") / "model", projection_dim=WIDTH)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("graphs")


@pytest.fixture(scope="module")
def reference(clip_dir: Path) -> tuple[Any, Any]:
    return CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval(), AutoProcessor.from_pretrained(clip_dir)


def encode(adapter: Any, items: list[InputItem], **options: Any) -> EncodeResult:
    result = adapter.forward(adapter.prepare(EncodeBatch(batch_id=1, items=items, output_types=["dense"],
                                                         options=options)))
    assert isinstance(result, EncodeResult) and result.dense is not None
    return result


def towers(reference: tuple[Any, Any], texts: list[str], images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """CLIPModel's unnormalised text and image features, as transformers computes them."""
    model, processor = reference
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    with torch.inference_mode():
        text = model.get_text_features(**processor.tokenizer(texts, padding=True, truncation=True, max_length=77,
                                                             return_tensors="pt")).pooler_output
        if not decoded:
            return text.numpy(), np.zeros((0, text.shape[1]), dtype=np.float32)
        image = model.get_image_features(**processor(images=decoded, return_tensors="pt")).pooler_output
    return text.numpy(), image.numpy()


@pytest.mark.numeric
@pytest.mark.parametrize(("engine", "dtype"), ENGINES)
def test_lean_clip_embeds_text_and_images_as_the_towers(make_adapter: MakeAdapter, clip_dir: Path, cache: Path,
                                                        reference: tuple[Any, Any], engine: str,
                                                        dtype: precision.Precision) -> None:
    adapter = lean(make_adapter, "clip", clip_dir, cache, engine, compute_precision=dtype)
    assert isinstance(adapter, LeanClipAdapter)
    assert adapter.load().dims == {"dense": WIDTH} and adapter.load().engine == engine
    items = [InputItem(text=TEXTS[0]), *(InputItem(images=[data]) for data in IMAGES), InputItem(text=TEXTS[1]),
             InputItem(text=TEXTS[2])]
    result = encode(adapter, items)
    text, image = towers(reference, TEXTS, IMAGES)
    want = F.normalize(torch.from_numpy(np.concatenate([text[:1], image, text[1:]])), dim=-1).numpy()
    tol = precision.tolerance(dtype)
    precision.assert_vectors_close(result.dense.numpy(), want, tol)
    assert result.token_counts[1:6] == [0] * 5 and result.token_counts[6] == 77
    torch_adapter = make_adapter("clip", clip_dir)
    assert isinstance(torch_adapter, ClipAdapter)
    assert result.token_counts == encode(torch_adapter, items).token_counts


@pytest.mark.numeric
@pytest.mark.parametrize(("engine", "dtype"), ENGINES)
def test_lean_clip_pools_several_images_and_leaves_vectors_unnormalised(make_adapter: MakeAdapter, clip_dir: Path,
                                                                        cache: Path, reference: tuple[Any, Any],
                                                                        engine: str,
                                                                        dtype: precision.Precision) -> None:
    """Many images, more than one call holds (three calls of at most `image.rows`), pooled per item as the torch
    adapter pools them; `normalize: false` from the profile, `normalize: true` from the request."""
    adapter = lean(make_adapter, "clip", clip_dir, cache, engine, compute_precision=dtype,
                   options={"normalize": False, "micro_batch_tokens": 64})
    assert isinstance(adapter, LeanClipAdapter) and adapter.image.rows < 5
    torch_adapter = make_adapter("clip", clip_dir, options={"normalize": False})
    items = [InputItem(text=TEXTS[0]), InputItem(images=IMAGES), InputItem(images=IMAGES[:2] * 3)]
    tol = precision.tolerance(dtype)
    for options in ({}, {"normalize": True}):
        want = encode(torch_adapter, items, **options).dense.numpy()
        assert_rows_close(encode(adapter, items, **options).dense.numpy(), want, tol)
    text, _ = towers(reference, TEXTS[:1], [])
    assert_rows_close(encode(adapter, items[:1]).dense.numpy(), text, tol)


def assert_rows_close(got: np.ndarray, want: np.ndarray, tol: precision.Tolerance) -> None:
    """Unnormalised rows, both divided by the reference row's norm: the bars are set for unit vectors (bf16 keeps
    digits relative to a value), and a length that differs from the reference's still shows."""
    norms = np.linalg.norm(want, axis=1, keepdims=True)
    precision.assert_vectors_close(got / norms, want / norms, tol)


def test_pixel_values_equal_the_image_processor(clip_dir: Path) -> None:
    """Bit for bit, on images of odd sizes and modes, for the checkpoint's processor and for others: a fixed-size
    resize, another filter, a crop larger than the resized image (zero-padded), no rescale."""
    processors = [AutoProcessor.from_pretrained(clip_dir).image_processor, CLIPImageProcessorPil(),
                  CLIPImageProcessorPil(size={"height": 40, "width": 30}, crop_size={"height": 50, "width": 20},
                                        resample=Image.Resampling.BILINEAR),
                  CLIPImageProcessorPil(crop_size={"height": 300, "width": 300}),
                  CLIPImageProcessorPil(do_rescale=False)]
    images = [*probe_images(), *(Image.open(io.BytesIO(data)).convert("RGB") for data in IMAGES)]
    assert len(images) == len(PROBE_IMAGES) + len(IMAGES)
    for processor in processors:
        steps = checked_steps(processor)
        for image in images:
            want = processor(images=[image], return_tensors="np")["pixel_values"]
            got = pixel_values([image], steps)
            assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
            assert np.array_equal(got, want), (processor, image.size)


@pytest.mark.parametrize(("change", "reason"), [
    ({"do_pad": True}, "pads images"),
    ({"size": {"longest_edge": 40}}, "resizes by ['longest_edge']"),
    ({"do_center_crop": False}, "neither crops nor resizes to a fixed size"),
])
def test_steps_it_does_not_reproduce_are_refused(change: dict[str, Any], reason: str) -> None:
    from sie_worker.adapters.clip_pixels import Unsupported

    with pytest.raises(Unsupported, match=reason.replace("[", "\\[").replace("]", "\\]")):
        steps_of(CLIPImageProcessorPil(**change))


def test_a_checkpoint_whose_image_processor_is_not_reproduced_is_served_by_torch(
        make_adapter: MakeAdapter, clip_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    weights = tmp_path / "clip"
    shutil.copytree(clip_dir, weights)
    config = json.loads((weights / "processor_config.json").read_text())
    config["image_processor"]["size"] = {"longest_edge": 40}
    (weights / "processor_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="sie.worker"):
        adapter = lean(make_adapter, "clip", weights, tmp_path / "graphs", "onnx")
    assert isinstance(adapter, ClipAdapter)
    assert any("resizes by ['longest_edge']" in r.getMessage() and "serving it with torch" in r.getMessage()
               for r in caplog.records)


def test_lean_clip_keeps_the_limits_and_refusals(make_adapter: MakeAdapter, clip_dir: Path, cache: Path) -> None:
    adapter = lean(make_adapter, "clip", clip_dir, cache, "onnx",
                   options={"max_image_pixels": 1000, "max_image_bytes": 100_000, "inputs": ["image"]})
    assert isinstance(adapter, LeanClipAdapter)
    for item, message in [(InputItem(images=[image_bytes("PNG")]), "48x40 pixels, over the 1000-pixel limit"),
                          (InputItem(images=[b"\0" * 100_001]), "over the 100000-byte limit"),
                          (InputItem(images=[b"not an image"]), "not a decodable image"),
                          (InputItem(), "neither text nor images"),
                          (InputItem(text="a cat"), "takes only \\['image'\\]")]:
        with pytest.raises(BadInput, match=message):
            adapter.prepare(EncodeBatch(batch_id=1, items=[item], output_types=["dense"]))



@pytest.mark.numeric
def test_both_clip_adapters_honour_truncate_and_its_direction(make_adapter: MakeAdapter, clip_dir: Path, cache: Path,
                                                              reference: tuple[Any, Any]) -> None:
    """`truncate: false` refuses a text over 77 tokens, stating its length, and leaves the others alone;
    `truncation_direction: left` keeps a long text's end, as the tokenizer's `truncation_side="left"` does."""
    model, processor = reference
    tokenizer = processor.tokenizer
    long_text = " ".join(f"word{i}" for i in range(120))  # its end differs from its beginning
    tokenizer.truncation_side = "left"
    try:
        encoded = tokenizer([long_text], padding=True, truncation=True, max_length=77, return_tensors="pt")
    finally:
        tokenizer.truncation_side = "right"
    with torch.inference_mode():
        left = model.get_text_features(**encoded).pooler_output.numpy()
    right, _ = towers(reference, [long_text], [])
    assert not np.allclose(left, right, atol=1e-3)  # the direction matters for this text
    tol = precision.tolerance("float32")
    for adapter in (make_adapter("clip", clip_dir), lean(make_adapter, "clip", clip_dir, cache, "onnx")):
        with pytest.raises(InputTooLong, match=r"input is \d+ tokens long, over this model's maximum of 77"):
            encode(adapter, [InputItem(text=TEXTS[0]), InputItem(text=long_text)], truncate=False)
        short = encode(adapter, [InputItem(text=TEXTS[0])], truncate=False, normalize=False).dense.numpy()
        assert_rows_close(short, towers(reference, TEXTS[:1], [])[0], tol)
        got = encode(adapter, [InputItem(text=long_text)], truncation_direction="left", normalize=False)
        assert got.token_counts == [77]
        assert_rows_close(got.dense.numpy(), left, tol)
