"""Bundles in the SIE model-config schema, config inference from folders, and offline-first weight resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sie_router.errors import SIEError
from sie_router.models.config import load_bundle, parse_config
from sie_router.models.inference import infer_family
from sie_router.models.registry import Registry, build_registry
from sie_router.models.weights import WeightsNotFound, WeightsQuery, resolve_weights

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def test_default_bundle_loads_and_serves_profiles_as_their_own_ids() -> None:
    registry = build_registry("default", (), (), offline=True)
    assert MINILM in registry.served
    config, profile = registry.lookup(MINILM)
    assert profile == "default" and config.dims == {"dense": 384} and config.family() == "dense"


def test_unknown_key_names_the_file_and_the_key() -> None:
    with pytest.raises(ValueError, match=r"x.yaml.*colour"):
        parse_config({"sie_id": "a", "hf_id": "a", "colour": "red", "profiles": {"default": {"adapter": "dense"}}},
                     "x.yaml")


def test_known_sie_keys_are_accepted_and_adapter_path_maps_to_a_family() -> None:
    cfg = parse_config({"sie_id": "a", "hf_id": "a", "routing": {}, "profiles": {
        "default": {"adapter_path": "sie_server.adapters.splade_flash:SpladeFlash", "max_batch_tokens": 10},
        "q": {"extends": "default", "adapter_options": {"runtime": {"is_query": True}}}}}, "x.yaml")
    assert cfg.family() == "sparse" and cfg.family("q") == "sparse"
    assert cfg.profiles["q"].max_batch_tokens == 10
    assert Registry([cfg]).lookup("a:q") == (cfg, "q")


def test_unknown_model_suggests_a_close_name() -> None:
    registry = build_registry("default", (), (), offline=True)
    with pytest.raises(SIEError) as caught:
        registry.lookup("sentence-transformers/all-MiniLM-L6-v3")
    assert caught.value.code == "MODEL_NOT_FOUND" and MINILM in caught.value.message


def test_test_bundle_parses() -> None:
    names = {c.sie_id for c in load_bundle(Path(__file__).parents[1] / "bundles/test")}
    assert "test/fake-dense" in names


def test_family_is_inferred_from_the_files(tmp_path: Path, minilm_dir: Path) -> None:
    assert infer_family(minilm_dir)[0] == "dense"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "vocab_size": 99}))
    assert infer_family(tmp_path)[:2] == ("sparse", {"encode": {"sparse": {"dim": 99}}})
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"],
                                                      "id2label": {"0": "LABEL_0"}}))
    assert infer_family(tmp_path)[0] == "cross_encoder"


def test_a_local_folder_comes_first_then_the_packaged_weights(minilm_dir: Path) -> None:
    folder, origin = resolve_weights(WeightsQuery(model_id=str(minilm_dir)), offline=True)
    assert folder == minilm_dir.resolve() and origin == "local folder"
    folder, origin = resolve_weights(WeightsQuery(model_id=MINILM), offline=True)
    assert (folder / "config.json").exists() and origin.startswith("package")


def test_missing_weights_name_every_place_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFound) as caught:
        resolve_weights(WeightsQuery(model_id="nobody/nothing"), offline=True)
    message = str(caught.value)
    for place in ("local folder", "Hugging Face cache", "installed packages", "hub download"):
        assert place in message


def test_a_served_name_replaces_the_id_and_keeps_the_weights(tmp_path: Path) -> None:
    registry = build_registry("default", (), (MINILM, "BAAI/bge-m3:sparse"), offline=True,
                              served_names=("mini",))
    assert set(registry.served) >= {"mini", "BAAI/bge-m3", "BAAI/bge-m3:sparse"} and MINILM not in registry.served
    assert registry.named == ("mini", "BAAI/bge-m3:sparse")
    config, _ = registry.lookup("mini")
    assert config.hf_id == MINILM and config.family() == "dense"  # found by its hub id, served as "mini"
    with pytest.raises(ValueError, match="pairs with one -m"):
        build_registry("default", (), (MINILM,), offline=True, served_names=("a", "b"))


def test_a_bundle_entry_is_found_by_its_hub_id_not_inferred(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "m.yaml").write_text("sie_id: my/model\nhf_id: upstream/model\ntasks: {encode: {dense: {dim: 4}}}"
                                           "\nprofiles: {default: {adapter: dense}}\n")
    registry = build_registry(str(tmp_path / "b"), (), ("upstream/model",), offline=True)
    assert list(registry.served) == ["my/model"] and registry.named == ("my/model",)
