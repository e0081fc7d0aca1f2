"""Adapter options: each family's typed Struct, checked when a bundle loads and sent to the worker, each default
written once."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from sie_router.models.config import ModelConfig, Profile, parse_config
from sie_router.pool.batcher import BatchLimits
from sie_router.settings import Settings
from sie_worker.options import (
    DEFAULT_ENGINE,
    MAX_BATCH_TOKENS,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    ClipOptions,
    Common,
    DenseOptions,
    FakeOptions,
    FamilyOptions,
)
from sie_worker.protocol import WorkerSpec

REPO = Path(__file__).resolve().parents[1]


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


def test_the_profile_options_become_the_family_struct_over_the_server_settings() -> None:
    server = {"engine": "openvino", "onnx_lanes": 2, "max_image_pixels": 1000, "max_image_bytes": 5000}
    dense = parse_config({"sie_id": "a/b", "hf_id": "a/b", "profiles": {"default": {"adapter": "dense",
                          "adapter_options": {"loadtime": {"engine": "onnx"}, "runtime": {"pooling": "cls"}}}}}, "d")
    options = dense.options(server=server)
    assert options == DenseOptions(engine="onnx", onnx_lanes=2, pooling="cls")  # the profile's engine wins
    clip = parse_config({"sie_id": "c", "hf_id": "c", "profiles": {"default": {"adapter": "clip",
                         "adapter_options": {"loadtime": {"max_image_pixels": 10}}}}}, "c")
    # CLIP runs on the lean engine too, so the server's engine settings reach it.
    assert clip.options(server=server) == ClipOptions(engine="openvino", onnx_lanes=2, max_image_pixels=10,
                                                      max_image_bytes=5000)
    assert clip.options() == ClipOptions(max_image_pixels=10)  # the Struct's own default for the rest
    plain = parse_config({"sie_id": "p", "hf_id": "p", "profiles": {"default": {"adapter": "dense"}}}, "p")
    assert plain.options(server=server) == DenseOptions(engine="openvino", onnx_lanes=2)
    with pytest.raises(ValueError, match="engine"):  # a server setting the Struct refuses fails as a profile would
        plain.options(server={"engine": "tensorrt"})
    fake = parse_config({"sie_id": "f", "hf_id": "f", "profiles": {"default": {"adapter": "fake"}}}, "f")
    assert fake.options() == FakeOptions() and isinstance(fake.options(), FamilyOptions)


def test_each_default_is_written_once_and_the_workers_read_fields() -> None:
    """The token budget, the image limits and the engine are defined in the worker's options, and the server's defaults,
    the batcher's and the spec's are those; no worker reads an option by name from a dict."""
    assert Settings().engine == DenseOptions().engine == DEFAULT_ENGINE
    assert (Settings().max_image_bytes, Settings().max_image_pixels) == (MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS) == (
        ClipOptions().max_image_bytes, ClipOptions().max_image_pixels)
    spec = WorkerSpec(worker_id="w", model="m", adapter="dense", weights_dir="", to_worker_endpoint="",
                      from_worker_endpoint="")
    config = ModelConfig(sie_id="m", profiles={"default": Profile(adapter="dense")})
    assert spec.max_batch_tokens == BatchLimits().max_tokens == config.max_batch_tokens() == MAX_BATCH_TOKENS
    sources = {path: path.read_text() for folder in ("router", "worker", "sdk")
               for path in (REPO / folder).rglob("*.py")}
    for literal in (str(MAX_BATCH_TOKENS), "40_000_000", "20 * 1024 * 1024"):
        assert [p.name for p, text in sources.items() if literal in text] == ["options.py"], literal
    worker = {p: text for p, text in sources.items() if (REPO / "worker") in p.parents}
    assert not [p.name for p, text in worker.items() if "loadtime" in text and p.name != "options.py"]
    assert not [p.name for p, text in worker.items() if "SIE_MAX_IMAGE" in text], "image limits travel as options"


def test_a_spec_carries_its_family_struct_across_the_spawn() -> None:
    spec = WorkerSpec(worker_id="w", model="m", adapter="clip", weights_dir="", to_worker_endpoint="",
                      from_worker_endpoint="", options=ClipOptions(inputs=["image"], max_image_pixels=7))
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=WorkerSpec)  # as the supervisor spawns it
    assert back.options_as(ClipOptions) == ClipOptions(inputs=["image"], max_image_pixels=7)
    assert back.options_as(Common).warm_up is None
    with pytest.raises(TypeError, match="ClipOptions"):
        back.options_as(DenseOptions)
    bare = msgspec.structs.replace(spec, options=None)
    assert bare.options_as(ClipOptions) == ClipOptions()
