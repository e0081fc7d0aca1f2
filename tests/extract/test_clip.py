"""The CLIP adapter against `CLIPModel.get_text_features` / `get_image_features` on a tiny checkpoint (CPU)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, CLIPModel

from sie_worker.adapters.base import Adapter, BadInput, UnsupportedTask
from sie_worker.protocol import EncodeBatch, EncodeResult, ExtractBatch, InputItem
from tests.extract_server import declared_png, image_bytes

TEXTS = ["a photo of a cat", "a red square on a blue background, " * 30]  # the second is over 77 tokens


def encode(adapter: Adapter, items: list[InputItem], **options: Any) -> EncodeResult:
    batch = EncodeBatch(batch_id=1, items=items, output_types=["dense"], options=options)
    result = adapter.forward(adapter.prepare(batch))
    assert isinstance(result, EncodeResult) and result.dense is not None
    return result


@pytest.fixture(scope="module")
def reference(models: Callable[[str], Path]) -> tuple[Any, Any]:
    folder = models("clip")
    return CLIPModel.from_pretrained(folder, local_files_only=True).eval(), AutoProcessor.from_pretrained(folder)


def reference_text(reference: tuple[Any, Any], text: str, normalize: bool = True) -> torch.Tensor:
    model, processor = reference
    with torch.inference_mode():
        inputs = processor.tokenizer([text], truncation=True, max_length=77, return_tensors="pt")
        vector = model.get_text_features(**inputs).pooler_output[0]
    return F.normalize(vector, dim=-1) if normalize else vector


def reference_image(reference: tuple[Any, Any], data: bytes, normalize: bool = True) -> torch.Tensor:
    model, processor = reference
    with torch.inference_mode():
        inputs = processor(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")
        vector = model.get_image_features(**inputs).pooler_output[0]
    return F.normalize(vector, dim=-1) if normalize else vector


def test_text_and_images_match_the_towers(models: Callable[[str], Path], load: Callable[..., Adapter],
                                          reference: tuple[Any, Any]) -> None:
    images = {fmt: image_bytes(fmt, seed=i) for i, fmt in enumerate(["JPEG", "PNG", "WEBP"])}
    items = [InputItem(text=TEXTS[0]), *(InputItem(images=[data]) for data in images.values()),
             InputItem(text=TEXTS[1])]
    result = encode(load("clip", models("clip")), items)
    dense = torch.from_numpy(result.dense.numpy().copy())
    assert dense.shape == (5, 16) and dense.dtype == torch.float32
    want = [reference_text(reference, TEXTS[0]), *(reference_image(reference, d) for d in images.values()),
            reference_text(reference, TEXTS[1])]
    torch.testing.assert_close(dense, torch.stack(want), atol=1e-5, rtol=0)
    assert result.token_counts[1:4] == [0, 0, 0] and result.token_counts[4] == 77
    assert torch.linalg.vector_norm(dense, dim=1).tolist() == pytest.approx([1.0] * 5, abs=1e-5)


def test_unnormalised_and_multi_image_items(models: Callable[[str], Path], load: Callable[..., Adapter],
                                            reference: tuple[Any, Any]) -> None:
    first, second = image_bytes("PNG", seed=1), image_bytes("JPEG", (64, 64), seed=2)
    adapter = load("clip", models("clip"), options={"normalize": False})
    raw = encode(adapter, [InputItem(text=TEXTS[0]), InputItem(images=[first])])
    want = torch.stack([reference_text(reference, TEXTS[0], False), reference_image(reference, first, False)])
    torch.testing.assert_close(torch.from_numpy(raw.dense.numpy().copy()), want, atol=1e-5, rtol=0)
    pooled = encode(adapter, [InputItem(images=[first, second])], normalize=True).dense.numpy()[0]
    mean = (reference_image(reference, first) + reference_image(reference, second)) / 2
    np.testing.assert_allclose(pooled, F.normalize(mean, dim=-1).numpy(), atol=1e-5)


def test_load_reports_the_joint_width(models: Callable[[str], Path]) -> None:
    from sie_worker.adapters.clip import ClipAdapter
    from sie_worker.protocol import WorkerSpec

    spec = WorkerSpec(worker_id="w", model="m", adapter="clip", weights_dir=str(models("clip")),
                      to_worker_endpoint="x", from_worker_endpoint="x")
    info = ClipAdapter(spec).load()
    assert (info.dims, info.capabilities, info.max_sequence_length) == ({"dense": 16}, ["dense"], 77)


@pytest.mark.parametrize(("data", "message"), [
    (b"definitely not an image", "not a decodable image"),
    (declared_png(20_000, 20_000), "not a decodable image"),  # Pillow's decompression-bomb guard
    (declared_png(8_000, 6_000), "8000x6000 pixels, over the 40000000-pixel limit"),  # under Pillow's, over ours
    (image_bytes("JPEG")[:200], "not a decodable image"),  # a valid header, then nothing
])
def test_bad_images_are_bad_input(models: Callable[[str], Path], load: Callable[..., Adapter], data: bytes,
                                  message: str) -> None:
    adapter = load("clip", models("clip"))
    with pytest.raises(BadInput, match=message):
        adapter.prepare(EncodeBatch(batch_id=1, items=[InputItem(images=[data])], output_types=["dense"]))


def test_limits_and_modalities_are_enforced(models: Callable[[str], Path], load: Callable[..., Adapter]) -> None:
    def prepare(adapter: Adapter, item: InputItem) -> None:
        adapter.prepare(EncodeBatch(batch_id=1, items=[item], output_types=["dense"]))

    small = load("clip", models("clip"), options={"max_image_pixels": 1000, "max_image_bytes": 100_000})
    with pytest.raises(BadInput, match="48x40 pixels, over the 1000-pixel limit"):
        prepare(small, InputItem(images=[image_bytes("PNG")]))
    with pytest.raises(BadInput, match="over the 100000-byte limit"):
        prepare(small, InputItem(images=[b"\0" * 100_001]))
    with pytest.raises(BadInput, match="neither text nor images"):
        prepare(small, InputItem())
    images_only = load("clip", models("clip"), options={"inputs": {"text": False, "image": True}})
    with pytest.raises(BadInput, match="takes only \\['image'\\]"):
        prepare(images_only, InputItem(text="a cat"))
    with pytest.raises(UnsupportedTask):
        images_only.prepare(ExtractBatch(batch_id=1, items=[InputItem(text="x")]))
