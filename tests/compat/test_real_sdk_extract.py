"""The real PyPI sie-sdk 0.10.1 client against the tiny extraction and CLIP models: extract with labels, image encode.

References are computed in the project venv on the same checkpoints, and for images on the exact bytes the SDK sent.
"""

from __future__ import annotations

import base64
import json
import warnings

import numpy as np
import pytest
from transformers import pipeline

from tests.compat.conftest import RunScenario
from tests.extract_server import (
    CLIP,
    CLIP_DIM,
    ENTITY_LABELS,
    GLINER,
    LABELS,
    NLI,
    NLI_TEMPLATE,
    TEXTS,
    ExtractServer,
    clip_image,
    clip_reference,
    clip_text,
    image_bytes,
)

pytestmark = pytest.mark.compat


def test_real_sdk_extract_with_labels_matches_the_references(extract_server: ExtractServer,
                                                             real_sdk: RunScenario) -> None:
    got = real_sdk(extract_server.url, "extract_with_labels", nli=NLI, gliner=GLINER, texts=TEXTS, labels=LABELS,
                   entity_labels=ENTITY_LABELS)
    zero_shot = pipeline("zero-shot-classification", model=str(extract_server.folders[NLI]), device="cpu")
    for name, multi in (("nli", False), ("nli_multi", True)):
        want = zero_shot(TEXTS, candidate_labels=LABELS, hypothesis_template=NLI_TEMPLATE, multi_label=multi)
        results = json.loads(str(got[name]))
        assert [r["id"] for r in results] == [f"item-{i}" for i in range(len(TEXTS))]
        for result, expected in zip(results, want, strict=True):
            assert [c["label"] for c in result["classifications"]] == expected["labels"]
            assert [c["score"] for c in result["classifications"]] == pytest.approx(expected["scores"], abs=1e-5)
            assert result["entities"] == [] and result["relations"] == [] and result["objects"] == []

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from gliner import GLiNER
    gliner = GLiNER.from_pretrained(str(extract_server.folders[GLINER]), local_files_only=True)
    results = json.loads(str(got["gliner"]))
    assert [r["id"] for r in results] == [f"g{i}" for i in range(len(TEXTS))]
    total = 0
    for text, result in zip(TEXTS, results, strict=True):
        want = gliner.predict_entities(text, ENTITY_LABELS, threshold=0.3)
        entities = result["entities"]
        assert [(e["text"], e["label"], e["start"], e["end"]) for e in entities] == [
            (w["text"], w["label"], w["start"], w["end"]) for w in want]
        assert [e["score"] for e in entities] == pytest.approx([w["score"] for w in want], abs=1e-5)
        assert all(text[e["start"]:e["end"]] == e["text"] for e in entities)
        total += len(entities)
    assert total > 0
    one = json.loads(str(got["gliner_one"]))  # one item in, one result out (not a list)
    assert [e["text"] for e in one["entities"]] == [w["text"] for w in gliner.predict_entities(TEXTS[0],
                                                                                                ENTITY_LABELS)]
    assert int(got["no_labels_status"]) == 400 and str(got["no_labels_code"]) == "INVALID_INPUT"
    assert json.loads(str(got["sdk_warnings"])) == []


def test_real_sdk_encodes_images_like_the_clip_towers(extract_server: ExtractServer, real_sdk: RunScenario) -> None:
    png, webp = image_bytes("PNG", (64, 48), seed=7), image_bytes("WEBP", seed=8)
    got = real_sdk(extract_server.url, "encode_images", model=CLIP, text="a photo of a dog",
                   png=base64.b64encode(png).decode(), webp=base64.b64encode(webp).decode())
    jpeg = got["jpeg"].tobytes()  # what the SDK made of the PIL image and sent
    reference = clip_reference(extract_server.folders[CLIP])
    assert jpeg.startswith(b"\xff\xd8\xff")
    want = np.stack([clip_image(reference, png), clip_image(reference, jpeg),
                     clip_image(reference, webp), clip_text(reference, "a photo of a dog")])
    assert got["dense"].shape == (4, CLIP_DIM) and got["dense"].dtype == np.float32
    np.testing.assert_allclose(got["dense"], want, atol=1e-5)
    assert int(got["corrupt_status"]) == 400 and str(got["corrupt_code"]) == "INVALID_INPUT"
    assert json.loads(str(got["sdk_warnings"])) == []
