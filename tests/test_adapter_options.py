"""Adapter options: each family's typed Struct, checked when a bundle loads."""

from __future__ import annotations

import pytest

from sie_router.models.config import parse_config


def test_adapter_options_are_checked_against_their_family_when_the_bundle_loads() -> None:
    base = {"sie_id": "a/b", "hf_id": "a/b"}
    good = {**base, "profiles": {"default": {"adapter": "dense", "adapter_options": {
        "loadtime": {"engine": "onnx"}, "runtime": {"pooling": "cls", "normalize": False}}}}}
    assert parse_config(good, "ok.yaml").profiles["default"].adapter_options.runtime["pooling"] == "cls"
    for options, problem in (({"runtime": {"poling": "cls"}}, "poling"),  # a typo
                             ({"runtime": {"pooling": "average"}}, "pooling"),  # not a pooling dense knows
                             ({"loadtime": {"normalize": "yes"}}, "normalize"),  # wrong type
                             ({"loadtime": {"pooling": "cls"}, "runtime": {"pooling": "mean"}}, "both")):
        bad = {**base, "profiles": {"default": {"adapter": "dense", "adapter_options": options}}}
        with pytest.raises(ValueError, match=problem) as caught:
            parse_config(bad, "bad.yaml")
        assert "bad.yaml: profile 'default'" in str(caught.value)
    threshold = {"adapter_options": {"runtime": {"threshold": 0.3}}}
    gliner = {**base, "profiles": {"default": {"adapter": "gliner", **threshold}}}
    assert parse_config(gliner, "g.yaml")
    with pytest.raises(ValueError, match="threshold"):  # a dense model has no threshold
        parse_config({**gliner, "profiles": {"default": {"adapter": "dense", "adapter_options": {
            "runtime": {"threshold": 0.3}}}}}, "d.yaml")
